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
        // Changed in place through the dictionary's one look-up (its `_modify`), never copied;
        // a member whose lots cannot be kept current is dropped (read again when next needed).
        LotCache.apply(change, to: &lots[member], count: &lotCount)
    }

    private static func apply(_ change: LotChange, to slot: inout [OpenLot]?, count lotCount: inout Int) {
        // Moved out of its slot (left empty, so the array is not shared and changes in place),
        // put back unless the member is dropped.
        guard var open = slot else { return }
        slot = nil
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
                guard let i = open.index(ofLot: take.lotID), open[i].remaining.value >= take.points.value else {
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
        slot = open
    }
}

extension Array where Element == OpenLot {
    /// The position of lot `id` among a member's open lots, which are in lot order (oldest
    /// first: as read from SQLite and as the cache keeps them), found by halves: a redemption
    /// that takes thousands of lots looks each up without scanning them all. Should the order
    /// ever be broken, a scan still finds it.
    func index(ofLot id: Int64) -> Int? {
        let low = lowerBound(of: id) { $0.id }
        if low < count, self[low].id == id { return low }
        return firstIndex { $0.id == id }
    }
}

extension Array {
    /// The first position whose element's key is not below `key`, in an array in key order
    /// (where `key` is, or would go), found by halves.
    func lowerBound(of key: Int64, by keyOf: (Element) -> Int64) -> Int {
        var low = 0, high = count
        while low < high {
            let mid = (low + high) / 2
            if keyOf(self[mid]) < key { low = mid + 1 } else { high = mid }
        }
        return low
    }
}

/// What an accepted posting did to its member's open lots.
enum LotChange {
    case earned(OpenLot)
    case took([LotTake])
    /// Anything else (reversals): the member's lots are read again when next needed.
    case reread
}
