import ClearhouseTestSupport
import ClearingDomain
import ClearingStore
import Foundation
import GRDB
import Testing

/// Migrations that move state, not just shape: a data directory written before them must
/// give the same figures after.
@Suite struct MigrationTests {
    /// Grocer's lot of 100 (30 redeemed at the cinema) expired by a run (70 points), then
    /// given the 30 back by the redemption's reversal: a lot listed in `lot_reopened`.
    func expiredThenReopened() throws -> Harness {
        let h = try Harness(expireAfterDays: 1)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 30, "C-1"))
        h.clock.set(Instant(rfc3339: "2026-11-24T00:00:00Z")!)
        #expect(figures(try h.store.settle(), G)?.expiredPoints == Points(70))
        _ = h.post(C, "c2", Fixtures.reverseRedemption("M1", 30, "C-2", of: "C-1"))
        return h
    }

    /// v7 replaced the partial `lot_expiring` index by `lot_expiry` and `lot_reopened`. A lot
    /// expired by a run and given points back by a reversed redemption before the upgrade
    /// must still be expired by the next run after it.
    @Test func v7ListsLotsReopenedBeforeTheUpgrade() throws {
        let h = try expiredThenReopened()
        try h.store.close()

        // The directory as v6 left it: the old index, no list, no record of v7.
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        let raw = try DatabaseQueue(path: url.path)
        try raw.write { db in
            #expect(try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM lot_reopened") == 1, "the writer listed the lot")
            try db.execute(sql: """
                DROP TABLE lot_reopened;
                DROP INDEX lot_expiry;
                CREATE INDEX lot_expiring ON lot(expires_at_ms) WHERE remaining > 0 AND expires_at_ms IS NOT NULL;
                DELETE FROM grdb_migrations WHERE identifier = 'v7-lot-expiry-index';
                """)
        }
        try raw.close()

        try h.reopen()
        let lots = try DatabaseQueue(path: url.path)
        #expect(try lots.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM lot_reopened") } == 1, "the migration listed the lot")
        #expect(try lots.read { try Bool.fetchOne($0, sql: "SELECT COUNT(*) = 0 FROM sqlite_schema WHERE name = 'lot_expiring'") } == true)
        try lots.close()
        h.clock.set(Instant(rfc3339: "2026-11-25T00:00:00Z")!)
        let after = try h.store.settle()
        #expect(figures(after, G)?.expiredPoints == Points(30), "the returned points expire in the next run")
        #expect(try h.balance("M1") == 0)
        #expect(try h.verify().ok)
    }

    /// A data directory migrated by a newer Clearhouse is not opened (this binary would write
    /// it by older rules), and is not migrated either.
    @Test func aDirectoryMigratedByANewerVersionIsRefused() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        try h.store.close()
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        let raw = try DatabaseQueue(path: url.path)
        try raw.write { try $0.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v99-from-the-future')") }
        try raw.close()
        #expect {
            _ = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        } throws: { error in
            "\(error)".contains("v99-from-the-future") && "\(error)".contains("newer Clearhouse")
        }
        let check = try DatabaseQueue(path: url.path)
        #expect(try check.read { try String.fetchAll($0, sql: "SELECT identifier FROM grdb_migrations ORDER BY identifier").last } == "v99-from-the-future")
        #expect(try check.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM journal") } == 1, "nothing was written")
        try check.close()
    }
}

extension MigrationTests {
    /// `verify` names a lot that holds points past the last run's cutoff without being listed
    /// in `lot_reopened`, before a run under-expires it.
    @Test func verifyNamesAnExpiredLotMissingFromTheList() throws {
        let h = try expiredThenReopened()
        #expect(try h.verify().ok)
        let raw = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        try raw.write { try $0.execute(sql: "DELETE FROM lot_reopened") }
        try raw.close()
        let report = try h.verify()
        #expect(!report.ok)
        #expect(report.breaches.contains { $0.contains("not in lot_reopened") }, "\(report.breaches)")
    }
}
