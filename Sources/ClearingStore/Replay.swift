import ClearingDomain

/// An in-memory replay of the journal: applies each entry's rule again, from nothing, with
/// the same pure FIFO functions, and says where an entry could not have been accepted. `verify`
/// compares what the database holds with what this replay derives.
struct ReplayBook {
    struct Lot {
        var member: MemberID
        var issuer: PartnerID
        var points: Int64
        var remaining: Int64
        var reversed: Int64
        var expired: Int64 = 0
        var expiresAt: Instant?
    }

    /// What the entries since the last run boundary add up to (for recomputing run figures).
    struct RunAccumulator {
        var issued: [PartnerID: Int64] = [:]
        var redeemed: [PartnerID: Int64] = [:]
        var flows: [FlowKey: Int64] = [:]
        var entries: Int64 = 0
    }

    private(set) var current = RunAccumulator()

    /// Expires every lot whose expiry is at or before `cutoff`, as a run does; returns the
    /// points expired per issuer, and starts a new run accumulator.
    /// Closes the run open at `cutoff`: what it accumulated, the points it expired by issuer,
    /// and lot by lot.
    mutating func closeRun(cutoff: Instant) -> (RunAccumulator, [PartnerID: Int64], lots: [Int64: Int64]) {
        var expired: [PartnerID: Int64] = [:]
        var expiredLots: [Int64: Int64] = [:]
        // The lots that may expire, soonest first (not every lot: a run's cost must not grow
        // with the lots of all the runs before it). A lot whose points are gone, or already
        // expired, may still be listed: it is passed over.
        while let next = expiring.first, next.expiresAt <= cutoff.millisecondsSinceEpoch {
            expiring.removeFirst()
            guard let lot = lots[next.lot], lot.remaining > 0, let at = lot.expiresAt, at <= cutoff else { continue }
            expired[lot.issuer, default: 0] += lot.remaining
            expiredLots[next.lot] = lot.remaining
            lots[next.lot]!.expired += lot.remaining
            setRemaining(of: next.lot, to: 0)
        }
        expiredPoints += expired.values.reduce(0, +)
        defer { current = RunAccumulator() }
        return (current, expired, expiredLots)
    }

    private(set) var expiredPoints: Int64 = 0

    struct FlowKey: Hashable {
        var issuer: PartnerID
        var redeemer: PartnerID
    }

    private(set) var lots: [Int64: Lot] = [:]
    /// Each member's lots with points left, oldest first (every member who ever earned has an
    /// entry, empty or not). Only these: a redemption reads them, and a member's spent lots
    /// would make each of its redemptions cost more as its history grows.
    private var lotsOfMember: [MemberID: [Int64]] = [:]
    /// Every lot with points left and an expiry, by expiry (and others already spent or
    /// expired, passed over when reached): what `closeRun` looks at.
    private var expiring = ExpiryQueue()
    private(set) var takes: [Int64: [LotTake]] = [:]
    /// Each redemption's and redemption reversal's moves of points between flows (`lot_move`),
    /// in position order: +k per take, −k per return.
    struct Move: Equatable {
        var lot: Int64
        var issuer: PartnerID
        var redeemer: PartnerID
        var points: Int64
    }
    /// A redemption's moves are its takes, +k each into its partner's flow: kept as its takes
    /// and its partner (`moves(of:)`), not a second copy. A redemption reversal's are its returns.
    private var redeemers: [Int64: PartnerID] = [:]
    private var returns: [Int64: [Move]] = [:]
    /// How many moves all entries made.
    private(set) var moveCount = 0

    /// One entry's moves (`lot_move`) in position order, or nil for an entry that made none.
    func moves(of entry: Int64) -> [Move]? {
        if let r = returns[entry] { return r }
        guard let redeemer = redeemers[entry], let t = takes[entry] else { return nil }
        return t.map { Move(lot: $0.lotID, issuer: $0.issuer, redeemer: redeemer, points: $0.points.value) }
    }
    /// Each partner's points by kind (earned, redeemed, earn_reversed, redemption_reversed)
    /// and its entries, over every entry replayed so far (`partner_head`, `run_snapshot`).
    private(set) var kindTotals: [PartnerID: (totals: [Int64], entries: Int64)] = [:]
    private(set) var flows: [FlowKey: Int64] = [:]
    private var originals: [PartnerID: [Reference: (id: Int64, kind: EventKind, member: MemberID)]] = [:]
    /// Σ over entries of earned − earn_reversed, and of redeemed − redemption_reversed.
    private(set) var issuedPoints: Int64 = 0
    private(set) var redeemedPoints: Int64 = 0

    func openLots(of member: MemberID) -> [OpenLot] {
        (lotsOfMember[member] ?? []).map { id in
            let l = lots[id]!
            return OpenLot(id: id, issuer: l.issuer, remaining: Points(l.remaining), expiresAt: l.expiresAt)
        }
    }

    /// Sets a lot's points left, keeping its member's open lots and the expiry queue in step:
    /// a lot leaves its member's open lots when nothing is left in it, and comes back (in id
    /// order, and into the queue again) when a redemption's reversal returns points to it.
    private mutating func setRemaining(of id: Int64, to remaining: Int64) {
        let lot = lots[id]!
        lots[id]!.remaining = remaining
        if lot.remaining > 0 && remaining == 0 {
            lotsOfMember[lot.member]!.removeAll { $0 == id }
        } else if lot.remaining == 0 && remaining > 0 {
            var open = lotsOfMember.removeValue(forKey: lot.member) ?? []
            open.insert(id, at: open.firstIndex { $0 > id } ?? open.endIndex)
            lotsOfMember[lot.member] = open
            if let at = lot.expiresAt { expiring.insert(expiresAt: at.millisecondsSinceEpoch, lot: id) }
        }
    }

    func openPoints(of member: MemberID) -> Int64 {
        (lotsOfMember[member] ?? []).reduce(0) { $0 + lots[$1]!.remaining }
    }

    var members: [MemberID] { Array(lotsOfMember.keys) }

    /// `points_expire_after_days` in force from each journal id on (from `expiry_terms`).
    var expiryTerms: [(fromJournalID: Int64, days: Int64)] = []

    func expiryDays(at journalID: Int64) -> Int64? {
        expiryTerms.last { $0.fromJournalID <= journalID }?.days
    }

    /// Applies one entry. Returns why it could not have been accepted, or nil.
    mutating func apply(_ e: Entry) -> String? {
        let n = e.event.points.value
        let member = e.event.member
        // Every journal entry counts in its partner's running totals, as the writer keeps them.
        var k = kindTotals[e.partner] ?? (totals: [0, 0, 0, 0], entries: 0)
        k.totals[e.event.kind.rawValue - 1] += n
        k.entries += 1
        kindTotals[e.partner] = k
        if originals[e.partner]?[e.event.reference] != nil { return "reference \(e.event.reference) appears twice" }
        switch e.event.kind {
        case .earned:
            guard let days = expiryDays(at: e.journalID) else { return "no expiry terms recorded for this earn" }
            // nil is "never" (points_expire_after_days = 0), not a failure: only a throw is.
            let expiry: Instant?
            do { expiry = try CoalitionTerms(currency: "XXX", pointsExpireAfterDays: days).lotExpiry(acceptedAt: e.acceptedAt) } catch {
                return "expiry overflows"
            }
            lots[e.journalID] = Lot(member: member, issuer: e.partner, points: n, remaining: n, reversed: 0, expiresAt: expiry)
            lotsOfMember[member, default: []].append(e.journalID)
            if let expiry { expiring.insert(expiresAt: expiry.millisecondsSinceEpoch, lot: e.journalID) }
            issuedPoints += n
            current.issued[e.partner, default: 0] += n
        case .redeemed:
            guard let taken = FIFO.take(e.event.points, from: openLots(of: member), at: e.acceptedAt) else {
                return "redemption of \(n) exceeds the member's balance"
            }
            for t in taken {
                setRemaining(of: t.lotID, to: lots[t.lotID]!.remaining - t.points.value)
                flows[FlowKey(issuer: t.issuer, redeemer: e.partner), default: 0] += t.points.value
                current.flows[FlowKey(issuer: t.issuer, redeemer: e.partner), default: 0] += t.points.value
            }
            takes[e.journalID] = taken
            redeemers[e.journalID] = e.partner
            moveCount += taken.count
            redeemedPoints += n
            current.redeemed[e.partner, default: 0] += n
        case .earnReversed, .redemptionReversed:
            guard let ref = e.event.originalReference, let o = originals[e.partner]?[ref], o.kind == e.event.kind.originalKind
            else { return "original_reference is not an earlier event of the matching kind" }
            guard o.member == member else { return "reversal names another member than its original" }
            if e.event.kind == .earnReversed {
                let lot = lots[o.id]!
                let left = (lot.expiresAt.map { $0 > e.acceptedAt } ?? true) ? lot.remaining : 0
                guard n <= left else { return "earn reversal exceeds what is left of the lot" }
                setRemaining(of: o.id, to: lot.remaining - n)
                lots[o.id]!.reversed += n
                issuedPoints -= n
                current.issued[e.partner, default: 0] -= n
            } else {
                guard let back = FIFO.giveBack(e.event.points, to: takes[o.id] ?? []) else {
                    return "redemption reversal exceeds what is left to reverse"
                }
                returns[e.journalID] = back.map { Move(lot: $0.lotID, issuer: $0.issuer, redeemer: e.partner, points: -$0.points.value) }
                moveCount += back.count
                for r in back {
                    takes[o.id]![r.takeIndex].returned = Points(takes[o.id]![r.takeIndex].returned.value + r.points.value)
                    setRemaining(of: r.lotID, to: lots[r.lotID]!.remaining + r.points.value)
                    flows[FlowKey(issuer: r.issuer, redeemer: e.partner), default: 0] -= r.points.value
                    current.flows[FlowKey(issuer: r.issuer, redeemer: e.partner), default: 0] -= r.points.value
                }
                redeemedPoints -= n
                current.redeemed[e.partner, default: 0] -= n
            }
        }
        originals[e.partner, default: [:]][e.event.reference] = (e.journalID, e.event.kind, member)
        current.entries += 1
        let balance = FIFO.balance(openLots(of: member), at: e.acceptedAt).value
        if balance != e.memberBalance.value {
            return "member_balance \(e.memberBalance) but the lots give \(balance)"
        }
        return nil
    }
}

/// Lots by expiry, soonest first (ties by lot id): a binary min-heap.
struct ExpiryQueue {
    struct Item: Comparable {
        var expiresAt: Int64
        var lot: Int64
        static func < (a: Item, b: Item) -> Bool { (a.expiresAt, a.lot) < (b.expiresAt, b.lot) }
    }

    private var heap: [Item] = []

    var first: Item? { heap.first }
    var count: Int { heap.count }

    mutating func insert(expiresAt: Int64, lot: Int64) {
        heap.append(Item(expiresAt: expiresAt, lot: lot))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard heap[i] < heap[parent] else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    mutating func removeFirst() {
        precondition(!heap.isEmpty)
        heap.swapAt(0, heap.count - 1)
        heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var least = i
            if l < heap.count && heap[l] < heap[least] { least = l }
            if r < heap.count && heap[r] < heap[least] { least = r }
            if least == i { return }
            heap.swapAt(i, least)
            i = least
        }
    }
}
