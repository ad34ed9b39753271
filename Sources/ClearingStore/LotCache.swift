import ClearingDomain
import GRDB

/// The open lots of recently active members, as the decider last left them in
/// `coalition.sqlite`, so that deciding an earn or a redemption reads no lot from SQLite.
///
/// The database stays the truth; this is a copy that is thrown away whenever it might differ:
/// - it lives in the writer only between its own commits: a batch takes it and gives it back
///   after COMMIT; a batch that rolls back (or stops at a fault point) drops it;
/// - another connection or process that commits to `coalition.sqlite` changes the writer
///   connection's `PRAGMA data_version`, read inside each batch's IMMEDIATE transaction: a
///   cache filled under another version is dropped;
/// - settlement (which expires lots on the writer connection itself) drops it;
/// - a batch decided posting by posting in savepoints runs without it;
/// - after a reversal the member's lots are read again from SQLite (reversals are rare, and
///   this keeps the cache's own bookkeeping to earns and redemptions).
///
/// In debug builds (every test) the decider compares the member's cached lots with SQLite
/// after each posting (`Store.checksBalancesInline`). Memory is bounded by
/// `Limits.lotCacheMembersMax` and `Limits.lotCacheLotsMax`: past either, it starts empty.
struct LotCache {
    /// `PRAGMA data_version` of the writer connection when this cache was valid.
    let dataVersion: Int64
    /// False in savepoint mode: every read goes to SQLite and nothing is kept.
    let enabled: Bool
    /// The most members it holds (`Limits.lotCacheMembersMax`, or fewer in tests).
    let membersMax: Int
    private var lots: [MemberID: [OpenLot]] = [:]
    private var lotCount = 0

    init(dataVersion: Int64, enabled: Bool = true, membersMax: Int = Limits.lotCacheMembersMax) {
        self.dataVersion = dataVersion
        self.enabled = enabled
        self.membersMax = membersMax
    }

    /// A member's lots with points left, oldest first (as `Lookup.openLots` reads them).
    mutating func openLots(_ w: WriterStatements, _ member: MemberID) throws -> [OpenLot] {
        if let cached = lots[member] { return cached }
        let stored = try Lookup.openLots(w, member)
        guard enabled else { return stored }
        if lots.count >= membersMax || lotCount + stored.count > Limits.lotCacheLotsMax {
            lots.removeAll(keepingCapacity: true)
            lotCount = 0
        }
        lots[member] = stored
        lotCount += stored.count
        return stored
    }

    /// The member's lots, if cached (for the debug cross-check).
    func cached(_ member: MemberID) -> [OpenLot]? { lots[member] }

    /// The members cached (for `Store.checkLotCache`).
    var members: [MemberID] { Array(lots.keys) }

    /// Applies what an accepted posting did to the member's lots, once its writes succeeded.
    mutating func apply(_ change: LotChange, member: MemberID) {
        // Taken out of the dictionary while it changes, so that it is changed in place (read
        // out and written back, the dictionary's copy made every change copy the whole array).
        guard var open = lots.removeValue(forKey: member) else { return }
        switch change {
        case .earned(let lot):
            precondition(open.last.map { $0.id < lot.id } ?? true, "lot ids are in acceptance order")
            if lotCount >= Limits.lotCacheLotsMax {
                lotCount -= open.count  // full: this member's lots are read again when next needed
                return
            }
            open.append(lot)
            lotCount += 1
        case .took(let takes):
            for take in takes {
                guard let i = open.firstIndex(where: { $0.id == take.lotID }), open[i].remaining.value >= take.points.value else {
                    lotCount -= open.count  // cannot happen (the takes were computed from these lots); read again
                    return
                }
                open[i].remaining = Points(open[i].remaining.value - take.points.value)
            }
            let before = open.count
            open.removeAll { $0.remaining.value == 0 }
            lotCount -= before - open.count
        case .reread:
            lotCount -= open.count  // read again when next needed
            return
        }
        lots[member] = open
    }
}

/// What an accepted posting did to its member's open lots.
enum LotChange {
    case earned(OpenLot)
    case took([LotTake])
    /// Anything else (reversals): the member's lots are read again when next needed.
    case reread
}
