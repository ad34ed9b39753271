import ClearingDomain

/// SplitMix64: a small, fast, seeded generator, so a simulated day is the same every run.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// One simulated posting: whose, under which webhook id, the event, and what the simulator
/// meant by it (a deliberately bad one says so).
public struct SimulatedPosting: Sendable {
    public var partner: PartnerID
    public var webhookID: WebhookID
    public var event: Event
    /// nil for an ordinary posting; otherwise the kind of trouble it was made to cause.
    public var intent: String?
}

/// Generates a realistic coalition day: members earn at grocery, fuel, pharmacy and cinema
/// partners, redeem elsewhere, some purchases are refunded (earn reversals) and some
/// redemptions undone; a few postings are deliberately bad (replays, reused references,
/// redemptions above the balance, reversals of unknown originals or another member's).
public struct DaySimulator: Sendable, IteratorProtocol {
    public let partners: [PartnerID]
    public let memberCount: Int
    public let eventCount: Int
    /// Fraction (per mille) of postings that are deliberately bad.
    public let badPerMille: Int
    private var rng: SeededGenerator
    private var produced = 0
    /// The simulator's own idea of each member's points, to make mostly valid redemptions.
    private var balances: [Int]
    private var recentEarns: [(PartnerID, MemberID, Reference, Int64)] = []
    private var recentRedemptions: [(PartnerID, MemberID, Reference, Int64)] = []
    private var recent: [SimulatedPosting] = []
    private let startMillis: Int64

    public init(partners: [PartnerID], members: Int, events: Int, seed: UInt64, badPerMille: Int = 20, start: Instant) {
        precondition(!partners.isEmpty && members > 0 && members <= Limits.simulatedMembersMax)
        precondition(events >= 0 && events <= Limits.simulatedEventsMax)
        self.partners = partners
        memberCount = members
        eventCount = events
        self.badPerMille = badPerMille
        rng = SeededGenerator(seed: seed)
        balances = Array(repeating: 0, count: members)
        startMillis = start.millisecondsSinceEpoch
    }

    private mutating func pick<T>(_ a: [T]) -> T { a[Int.random(in: 0..<a.count, using: &rng)] }

    private func member(_ i: Int) -> MemberID { MemberID("M\(100_000 + i)")! }

    private func ids(_ partner: PartnerID, _ n: Int) -> (WebhookID, Reference) {
        (WebhookID("msg_\(partner.rawValue)_\(n)")!, Reference("\(partner.rawValue.uppercased())-\(n)")!)
    }

    private func occurredAt(_ n: Int) -> Instant {
        // Spread over a day of trading: 86,400,000 ms across the events.
        Instant(millisecondsSinceEpoch: startMillis + Int64(n) * 86_400_000 / Int64(max(eventCount, 1)))
    }

    public mutating func next() -> SimulatedPosting? {
        guard produced < eventCount else { return nil }
        produced += 1
        let n = produced
        let posting: SimulatedPosting
        // A bad posting's victim is a recent ordinary earn: an earn is always accepted, so its
        // replay is always 200 and its reference always taken. (A refused posting writes
        // nothing: a "replay" of one is decided anew and may well be accepted.)
        if Int.random(in: 0..<1000, using: &rng) < badPerMille,
            case let earns = recent.filter({ $0.intent == nil && $0.event.kind == .earned }), !earns.isEmpty
        {
            posting = bad(n, victim: pick(earns))
        } else {
            posting = ordinary(n)
        }
        recent.append(posting)
        if recent.count > 64 { recent.removeFirst(32) }
        return posting
    }

    private mutating func ordinary(_ n: Int) -> SimulatedPosting {
        let partner = pick(partners)
        let (wid, ref) = ids(partner, n)
        let mi = Int.random(in: 0..<memberCount, using: &rng)
        let m = member(mi)
        let roll = Int.random(in: 0..<100, using: &rng)
        if roll < 8, let (p, om, oref, pts) = recentEarns.popLast() {
            // A refund: part of a recent purchase is returned, so part of its points go back.
            let (w2, r2) = ids(p, n)
            let k = max(1, pts / Int64(Int.random(in: 1...3, using: &rng)))
            return SimulatedPosting(
                partner: p, webhookID: w2,
                event: Event(kind: .earnReversed, member: om, points: Points(k), reference: r2, originalReference: oref, occurredAt: occurredAt(n)),
                intent: nil)
        }
        if roll < 12, let (p, om, oref, pts) = recentRedemptions.popLast() {
            let (w2, r2) = ids(p, n)
            return SimulatedPosting(
                partner: p, webhookID: w2,
                event: Event(kind: .redemptionReversed, member: om, points: Points(pts), reference: r2, originalReference: oref, occurredAt: occurredAt(n)),
                intent: nil)
        }
        if roll < 40, balances[mi] >= 50 {
            let k = Int.random(in: 50...min(balances[mi], 5_000), using: &rng)
            balances[mi] -= k
            recentRedemptions.append((partner, m, ref, Int64(k)))
            if recentRedemptions.count > 256 { recentRedemptions.removeFirst(128) }
            return SimulatedPosting(
                partner: partner, webhookID: wid,
                event: Event(kind: .redeemed, member: m, points: Points(Int64(k)), reference: ref, occurredAt: occurredAt(n)),
                intent: nil)
        }
        let amount = Int64.random(in: 199...25_000, using: &rng)  // a basket of 1.99 to 250.00
        let points = max(1, amount / 100)  // one point per euro
        balances[mi] += Int(points)
        recentEarns.append((partner, m, ref, points))
        if recentEarns.count > 256 { recentEarns.removeFirst(128) }
        return SimulatedPosting(
            partner: partner, webhookID: wid,
            event: Event(kind: .earned, member: m, points: Points(points), reference: ref, occurredAt: occurredAt(n), amountMinor: MoneyMinor(amount)),
            intent: nil)
    }

    private mutating func bad(_ n: Int, victim: SimulatedPosting) -> SimulatedPosting {
        let (wid, ref) = ids(victim.partner, n)
        switch Int.random(in: 0..<5, using: &rng) {
        case 0:
            var p = victim
            p.intent = "replay of a delivered webhook"
            return p
        case 1:
            var e = victim.event
            e.points = Points(e.points.value == 1 ? 2 : e.points.value - 1)
            return SimulatedPosting(partner: victim.partner, webhookID: wid, event: e, intent: "reference reused with other content")
        case 2:
            return SimulatedPosting(
                partner: victim.partner, webhookID: wid,
                event: Event(kind: .redeemed, member: victim.event.member, points: Points(900_000_000), reference: ref),
                intent: "redemption above the balance")
        case 3:
            return SimulatedPosting(
                partner: victim.partner, webhookID: wid,
                event: Event(kind: .earnReversed, member: victim.event.member, points: Points(10), reference: ref,
                             originalReference: Reference("NO-SUCH-RECEIPT-\(n)")!),
                intent: "reversal of an unknown original")
        default:
            let other = member(Int.random(in: 0..<memberCount, using: &rng))
            let kind: EventKind = .earnReversed
            guard other != victim.event.member else {
                var p = victim
                p.intent = "replay of a delivered webhook"
                return p
            }
            return SimulatedPosting(
                partner: victim.partner, webhookID: wid,
                event: Event(kind: kind, member: other, points: Points(1), reference: ref, originalReference: victim.event.reference),
                intent: "reversal naming another member")
        }
    }
}
