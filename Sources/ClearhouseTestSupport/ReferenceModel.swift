import ClearingDomain

/// A deliberately plain, independent model of CONTRACT §3 and §5, written from the contract
/// and not from the store: lists of lots per member, walked by hand. Tests post the same
/// events to the store and to this model and require the same outcomes.
public struct ReferenceModel {
    public enum Result: Equatable {
        case created(sequence: Int64, balance: Int64)
        case replayed(sequence: Int64)
        case refused(String)  // the problem slug
    }

    struct Lot {
        var order: Int
        var issuer: String
        var remaining: Int64
        var expires: Int64?  // ms; nil = never
    }

    struct Accepted {
        var sequence: Int64
        var event: Event
        var lotOrder: Int?  // for earns
        var takes: [(order: Int, issuer: String, points: Int64, returned: Int64)]  // for redemptions
    }

    let expireAfterDays: Int64
    let partners: Set<String>
    var lots: [String: [Lot]] = [:]  // member -> lots in acceptance order
    var byReference: [String: [String: Accepted]] = [:]  // partner -> reference -> entry
    var byWebhook: [String: [String: String]] = [:]  // partner -> webhook id -> reference
    var sequences: [String: Int64] = [:]
    var nextOrder = 0
    public private(set) var flows: [String: Int64] = [:]  // "issuer>redeemer"
    public private(set) var issued: Int64 = 0
    public private(set) var redeemed: Int64 = 0
    public private(set) var acceptedCount = 0

    public init(expireAfterDays: Int64, partners: [PartnerID]) {
        self.expireAfterDays = expireAfterDays
        self.partners = Set(partners.map(\.rawValue))
    }

    /// How many entries the model accepted for a partner.
    public func entries(of partner: String) -> Int64 { sequences[partner] ?? 0 }

    func spendable(_ member: String, at now: Int64) -> Int64 {
        (lots[member] ?? []).filter { $0.remaining > 0 && ($0.expires == nil || $0.expires! > now) }.reduce(0) { $0 + $1.remaining }
    }

    public func balance(_ member: String, at now: Int64) -> Int64 { spendable(member, at: now) }

    /// Total points left in all lots, expired by time or not (nothing is expired by a run here).
    public var remainingInLots: Int64 { lots.values.flatMap { $0 }.reduce(0) { $0 + $1.remaining } }

    public mutating func post(partner: String, webhookID: String, event e: Event, now: Int64) -> Result {
        guard partners.contains(partner) else { return .refused("unknown-partner") }
        if let ref = byWebhook[partner]?[webhookID] {
            let earlier = byReference[partner]![ref]!
            return earlier.event == e ? .replayed(sequence: earlier.sequence) : .refused("conflict")
        }
        if let earlier = byReference[partner]?[e.reference.rawValue] {
            guard earlier.event == e else { return .refused("conflict") }
            // Answered with that entry: from now on this webhook-id is that entry's (§3).
            byWebhook[partner, default: [:]][webhookID] = e.reference.rawValue
            return .replayed(sequence: earlier.sequence)
        }
        let member = e.event_member
        let n = e.points.value
        var accepted = Accepted(sequence: 0, event: e, lotOrder: nil, takes: [])
        switch e.kind {
        case .earned:
            nextOrder += 1
            let expires: Int64? = expireAfterDays == 0 ? nil : now + expireAfterDays * 86_400_000
            lots[member, default: []].append(Lot(order: nextOrder, issuer: partner, remaining: n, expires: expires))
            accepted.lotOrder = nextOrder
            issued += n
        case .redeemed:
            guard spendable(member, at: now) >= n else { return .refused("insufficient-points") }
            var left = n
            for i in lots[member]!.indices where left > 0 {
                let l = lots[member]![i]
                guard l.remaining > 0, l.expires == nil || l.expires! > now else { continue }
                let k = min(left, l.remaining)
                lots[member]![i].remaining -= k
                accepted.takes.append((l.order, l.issuer, k, 0))
                flows["\(l.issuer)>\(partner)", default: 0] += k
                left -= k
            }
            redeemed += n
        case .earnReversed:
            guard let o = byReference[partner]?[e.originalReference!.rawValue], o.event.kind == .earned else {
                return .refused("unknown-original")
            }
            guard o.event.event_member == member else { return .refused("member-mismatch") }
            let i = lots[member]!.firstIndex { $0.order == o.lotOrder }!
            let l = lots[member]![i]
            let left = (l.expires == nil || l.expires! > now) ? l.remaining : 0
            guard n <= left else { return .refused("reversal-exceeds-original") }
            lots[member]![i].remaining -= n
            issued -= n
        case .redemptionReversed:
            guard var o = byReference[partner]?[e.originalReference!.rawValue], o.event.kind == .redeemed else {
                return .refused("unknown-original")
            }
            guard o.event.event_member == member else { return .refused("member-mismatch") }
            let open = o.takes.reduce(0) { $0 + $1.points - $1.returned }
            guard n <= open else { return .refused("reversal-exceeds-original") }
            var left = n
            for t in o.takes.indices.reversed() where left > 0 {
                let k = min(left, o.takes[t].points - o.takes[t].returned)
                guard k > 0 else { continue }
                o.takes[t].returned += k
                let i = lots[member]!.firstIndex { $0.order == o.takes[t].order }!
                lots[member]![i].remaining += k
                flows["\(o.takes[t].issuer)>\(partner)", default: 0] -= k
                left -= k
            }
            byReference[partner]![o.event.reference.rawValue] = o
            redeemed -= n
        }
        let seq = (sequences[partner] ?? 0) + 1
        sequences[partner] = seq
        accepted.sequence = seq
        byReference[partner, default: [:]][e.reference.rawValue] = accepted
        byWebhook[partner, default: [:]][webhookID] = e.reference.rawValue
        acceptedCount += 1
        return .created(sequence: seq, balance: spendable(member, at: now))
    }
}

extension Event {
    var event_member: String { member.rawValue }
}
