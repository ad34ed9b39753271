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
        for (id, lot) in lots where lot.remaining > 0 && (lot.expiresAt.map { $0 <= cutoff } ?? false) {
            expired[lot.issuer, default: 0] += lot.remaining
            expiredLots[id] = lot.remaining
            lots[id]!.expired += lot.remaining
            lots[id]!.remaining = 0
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
    private var lotsOfMember: [MemberID: [Int64]] = [:]
    private(set) var takes: [Int64: [LotTake]] = [:]
    /// Each redemption's and redemption reversal's moves of points between flows (`lot_move`),
    /// in position order: +k per take, −k per return.
    struct Move: Equatable {
        var lot: Int64
        var issuer: PartnerID
        var redeemer: PartnerID
        var points: Int64
    }
    private(set) var moves: [Int64: [Move]] = [:]
    /// Each partner's points by kind (earned, redeemed, earn_reversed, redemption_reversed)
    /// and its entries, over every entry replayed so far (`partner_head`, `run_snapshot`).
    private(set) var kindTotals: [PartnerID: (totals: [Int64], entries: Int64)] = [:]
    private(set) var flows: [FlowKey: Int64] = [:]
    private var originals: [PartnerID: [Reference: (id: Int64, kind: EventKind, member: MemberID)]] = [:]
    /// Σ over entries of earned − earn_reversed, and of redeemed − redemption_reversed.
    private(set) var issuedPoints: Int64 = 0
    private(set) var redeemedPoints: Int64 = 0

    func openLots(of member: MemberID) -> [OpenLot] {
        (lotsOfMember[member] ?? []).compactMap { id in
            guard let l = lots[id], l.remaining > 0 else { return nil }
            return OpenLot(id: id, issuer: l.issuer, remaining: Points(l.remaining), expiresAt: l.expiresAt)
        }
    }

    func openPoints(of member: MemberID) -> Int64 {
        (lotsOfMember[member] ?? []).reduce(0) { $0 + (lots[$1]?.remaining ?? 0) }
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
            issuedPoints += n
            current.issued[e.partner, default: 0] += n
        case .redeemed:
            guard let taken = FIFO.take(e.event.points, from: openLots(of: member), at: e.acceptedAt) else {
                return "redemption of \(n) exceeds the member's balance"
            }
            for t in taken {
                lots[t.lotID]!.remaining -= t.points.value
                flows[FlowKey(issuer: t.issuer, redeemer: e.partner), default: 0] += t.points.value
                current.flows[FlowKey(issuer: t.issuer, redeemer: e.partner), default: 0] += t.points.value
            }
            takes[e.journalID] = taken
            moves[e.journalID] = taken.map { Move(lot: $0.lotID, issuer: $0.issuer, redeemer: e.partner, points: $0.points.value) }
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
                lots[o.id]!.remaining -= n
                lots[o.id]!.reversed += n
                issuedPoints -= n
                current.issued[e.partner, default: 0] -= n
            } else {
                guard let back = FIFO.giveBack(e.event.points, to: takes[o.id] ?? []) else {
                    return "redemption reversal exceeds what is left to reverse"
                }
                moves[e.journalID] = back.map { Move(lot: $0.lotID, issuer: $0.issuer, redeemer: e.partner, points: -$0.points.value) }
                for r in back {
                    takes[o.id]![r.takeIndex].returned = Points(takes[o.id]![r.takeIndex].returned.value + r.points.value)
                    lots[r.lotID]!.remaining += r.points.value
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
