/// Lots and first-in-first-out consumption (CONTRACT §5), as pure functions over values.
/// The store feeds these from SQLite; `verify` and the tests feed them from memory.

/// An open lot as seen by a redemption: its id (the journal id of the earn, so ids are in
/// acceptance order), issuer, points left and expiry.
public struct OpenLot: Equatable, Sendable {
    public var id: Int64
    public var issuer: PartnerID
    public var remaining: Points
    public var expiresAt: Instant?

    public init(id: Int64, issuer: PartnerID, remaining: Points, expiresAt: Instant?) {
        self.id = id
        self.issuer = issuer
        self.remaining = remaining
        self.expiresAt = expiresAt
    }

    /// A lot counts towards a balance at `t` while its expiry is after `t`.
    public func isSpendable(at t: Instant) -> Bool {
        remaining.value > 0 && (expiresAt.map { $0 > t } ?? true)
    }
}

/// `k` points taken from one lot by a redemption, in the order taken.
public struct LotTake: Equatable, Sendable {
    public var lotID: Int64
    public var issuer: PartnerID
    public var points: Points
    /// How much of this take later reversals have already returned.
    public var returned: Points

    public init(lotID: Int64, issuer: PartnerID, points: Points, returned: Points = .zero) {
        self.lotID = lotID
        self.issuer = issuer
        self.points = points
        self.returned = returned
    }
}

/// Points given back to one lot by a redemption reversal.
public struct LotReturn: Equatable, Sendable {
    /// Index into the redemption's takes.
    public var takeIndex: Int
    public var lotID: Int64
    public var issuer: PartnerID
    public var points: Points
}

public enum FIFO {
    /// The spendable balance at `t`: the sum of the unexpired lots.
    public static func balance(_ lots: [OpenLot], at t: Instant) -> Points {
        var sum: Int64 = 0
        for lot in lots where lot.isSpendable(at: t) {
            sum += lot.remaining.value  // bounded: each lot <= 1e9, lots per member bounded by events
        }
        return Points(sum)
    }

    /// Takes `n` points from the spendable lots at `t`, oldest (smallest id) first.
    /// Returns nil when the balance is below `n`.
    public static func take(_ n: Points, from lots: [OpenLot], at t: Instant) -> [LotTake]? {
        precondition(n.value > 0)
        let ordered = lots.filter { $0.isSpendable(at: t) }.sorted { $0.id < $1.id }
        var left = n.value
        var takes: [LotTake] = []
        for lot in ordered where left > 0 {
            let k = min(left, lot.remaining.value)
            takes.append(LotTake(lotID: lot.id, issuer: lot.issuer, points: Points(k)))
            left -= k
        }
        return left == 0 ? takes : nil
    }

    /// What is left to reverse of a redemption.
    public static func reversible(_ takes: [LotTake]) -> Points {
        Points(takes.reduce(0) { $0 + $1.points.value - $1.returned.value })
    }

    /// Returns `n` points of a redemption to its lots, the last taken first. Returns nil when
    /// `n` exceeds what is left to reverse.
    public static func giveBack(_ n: Points, to takes: [LotTake]) -> [LotReturn]? {
        precondition(n.value > 0)
        guard n.value <= reversible(takes).value else { return nil }
        var left = n.value
        var returns: [LotReturn] = []
        for i in stride(from: takes.count - 1, through: 0, by: -1) where left > 0 {
            let open = takes[i].points.value - takes[i].returned.value
            guard open > 0 else { continue }
            let k = min(left, open)
            returns.append(LotReturn(takeIndex: i, lotID: takes[i].lotID, issuer: takes[i].issuer, points: Points(k)))
            left -= k
        }
        precondition(left == 0)
        return returns
    }
}
