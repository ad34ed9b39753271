import ClearhouseTestSupport
import ClearingDomain
@testable import ClearingStore
import Foundation
import GRDB
import GRDBSQLite
import Synchronization
import Testing

/// Progress-handler calls on the coalition's writer connection (one per SQLite VM instruction:
/// a larger interval is counted per statement, and misses short ones) while
/// `SettleCostTests.instructions` watches.
private let progressCalls = Atomic<Int>(0)

/// A settlement run's cost must grow with the run's own work (its entries, the lots expiring at
/// its cutoff), not with the history before it: a nightly run holds the journal's write lock,
/// so postings wait for it.
@Suite struct SettleCostTests {
    /// SQLite VM instructions the store's writer connection runs during `body`.
    func instructions(_ store: Store, _ body: () throws -> Void) throws -> Int {
        store.coalition.writeWithoutTransaction { db in
            sqlite3_progress_handler(db.sqliteConnection, 1, { _ in
                progressCalls.add(1, ordering: .relaxed)
                return 0
            }, nil)
        }
        defer { store.coalition.writeWithoutTransaction { sqlite3_progress_handler($0.sqliteConnection, 0, nil, nil) } }
        progressCalls.store(0, ordering: .relaxed)
        try body()
        return progressCalls.load(ordering: .relaxed)
    }

    /// A history of `n` earns (a fifth of them partly redeemed) expired by a first run, then `n`
    /// more that stay open; then the same small day in every case (earns, redemptions, and
    /// reversals that give points back to expired lots). Returns what settling that day costs.
    func costOfADayAfter(history n: Int) throws -> Int {
        let h = try Harness(expireAfterDays: 1)
        func post(_ items: [(PartnerID, String, Event)]) {
            for chunk in stride(from: 0, to: items.count, by: 500) {
                _ = h.post(Array(items[chunk..<min(chunk + 500, items.count)]))
            }
        }
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        post((0..<n).map { (G, "g\($0)", Fixtures.earn("M\($0 % 50)", 100, "G-\($0)")) })
        post((0..<n / 5).map { (C, "c\($0)", Fixtures.redeem("M\($0 % 50)", 30, "C-\($0)")) })
        h.clock.set(Instant(rfc3339: "2026-11-24T00:00:00Z")!)
        _ = try h.store.settle()
        h.clock.advance(milliseconds: 1_000)
        post((0..<n).map { (F, "f\($0)", Fixtures.earn("M\($0 % 50)", 100, "F-\($0)")) })
        h.clock.advance(milliseconds: 1_000)
        _ = try h.store.settle()
        // The day: the same in every case.
        h.clock.advance(milliseconds: 60_000)
        post((0..<20).map { (G, "day-g\($0)", Fixtures.earn("D\($0 % 5)", 50, "DAY-G-\($0)")) })
        post((0..<5).map { (C, "day-c\($0)", Fixtures.redeem("D\($0)", 20, "DAY-C-\($0)")) })
        post((0..<3).map { (C, "day-r\($0)", Fixtures.reverseRedemption("M\($0)", 30, "DAY-R-\($0)", of: "C-\($0)")) })
        h.clock.advance(milliseconds: 60_000)
        let cost = try instructions(h.store) {
            let run = try h.store.settle()
            #expect(run.entryCount == 28)
            #expect(figures(run, G)?.expiredPoints == Points(90), "the 3 × 30 points given back to expired lots expire again")
        }
        #expect(try h.verify().ok)
        return cost
    }

    @Test func aRunCostsWhatItsOwnDayCostsWhateverCameBefore() throws {
        let short = try costOfADayAfter(history: 200)
        let long = try costOfADayAfter(history: 4_000)
        // Twenty times the history; the run's own work is the same. Before this was fixed, four
        // statements walked the journal's index, every lot, every open lot, or every lot past
        // its expiry, and the long history cost about ten times as much.
        #expect(long < short + short / 2, "a run after 4,000 earns cost \(long) instructions, after 200: \(short)")
    }
}
