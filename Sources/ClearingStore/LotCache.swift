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
        guard slot != nil else { return }
        switch change {
        case .earned(let lot):
            precondition(slot!.last.map { $0.id < lot.id } ?? true, "lot ids are in acceptance order")
            if lotCount >= Limits.lotCacheLotsMax {
                lotCount -= slot!.count  // full: this member's lots are read again when next needed
                slot = nil
                return
            }
            slot!.append(lot)
            lotCount += 1
        case .took(let takes):
            for take in takes {
                guard let i = slot!.index(ofLot: take.lotID), slot![i].remaining.value >= take.points.value else {
                    lotCount -= slot!.count  // cannot happen (the takes were computed from these lots); read again
                    slot = nil
                    return
                }
                slot![i].remaining = Points(slot![i].remaining.value - take.points.value)
            }
            let before = slot!.count
            slot!.removeAll { $0.remaining.value == 0 }
            lotCount -= before - slot!.count
        case .reread:
            lotCount -= slot!.count  // read again when next needed
            slot = nil
        }
    }
}

extension Array where Element == OpenLot {
    /// The position of lot `id` among a member's open lots, which are in lot order (oldest
    /// first: as read from SQLite and as the cache keeps them), found by halves: a redemption
    /// that takes thousands of lots looks each up without scanning them all. Should the order
    /// ever be broken, a scan still finds it.
    func index(ofLot id: Int64) -> Int? {
        var low = 0, high = count
        while low < high {
            let mid = (low + high) / 2
            if self[mid].id < id { low = mid + 1 } else { high = mid }
        }
        if low < count, self[low].id == id { return low }
        return firstIndex { $0.id == id }
    }
}

/// What an accepted posting did to its member's open lots.
enum LotChange {
    case earned(OpenLot)
    case took([LotTake])
    /// Anything else (reversals): the member's lots are read again when next needed.
    case reread
}
