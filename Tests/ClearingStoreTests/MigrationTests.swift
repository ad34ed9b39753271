import ClearhouseTestSupport
import ClearingDomain
@testable import ClearingStore
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

        // The directory as v6 left it: the old index, no list, no record of v7 (or v8).
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        let raw = try MigrationTests.rawQueue(url)
        try raw.write { db in
            #expect(try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM lot_reopened") == 1, "the writer listed the lot")
            try MigrationTests.downgradeToV7(db)
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
    /// The coalition database with foreign keys off, as a migration runs (a table rebuild
    /// drops a table that others reference).
    static func rawQueue(_ url: URL) throws -> DatabaseQueue {
        var config = Configuration()
        config.foreignKeysEnabled = false
        return try DatabaseQueue(path: url.path, configuration: config)
    }

    /// Turns a current `coalition.sqlite` back into what v7 wrote: each lot's points left in
    /// its own row (`remaining`) with the partial `lot_open_by_member` index, no `lot_open`.
    static func downgradeToV7(_ db: Database) throws {
        try db.execute(sql: """
            CREATE TABLE lot_v7 (
              id INTEGER PRIMARY KEY NOT NULL REFERENCES journal(id),
              member TEXT NOT NULL,
              issuer TEXT NOT NULL,
              points INTEGER NOT NULL CHECK (points BETWEEN 1 AND 1000000000),
              remaining INTEGER NOT NULL CHECK (remaining >= 0 AND remaining <= points),
              reversed INTEGER NOT NULL DEFAULT 0 CHECK (reversed >= 0 AND reversed <= points),
              expired INTEGER NOT NULL DEFAULT 0 CHECK (expired >= 0),
              expires_at_ms INTEGER
            );
            INSERT INTO lot_v7 SELECT lot.id, lot.member, lot.issuer, lot.points, COALESCE(o.remaining, 0), lot.reversed, lot.expired, lot.expires_at_ms
              FROM lot LEFT JOIN lot_open o ON o.member = lot.member AND o.lot_id = lot.id;
            DROP TABLE lot_open;
            DROP TABLE lot;
            ALTER TABLE lot_v7 RENAME TO lot;
            CREATE INDEX lot_open_by_member ON lot(member, id) WHERE remaining > 0;
            CREATE INDEX lot_expiry ON lot(expires_at_ms) WHERE expires_at_ms IS NOT NULL;
            DROP TABLE coalition_currency;
            DROP TRIGGER run_immutable_u;
            ALTER TABLE run DROP COLUMN currency;
            CREATE TRIGGER run_immutable_u BEFORE UPDATE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
            DROP TABLE run_naming;
            DELETE FROM grdb_migrations WHERE identifier IN ('v8-open-lots', 'v9-open-lots-within-their-lot', 'v10-coalition-currency', 'v11-run-names-after-a-restore', 'v12-run-currency', 'v13-open-lot-check-on-growth', 'v14-webhook-id-aliases', 'v15-takes-and-moves-fixed');
                DROP TRIGGER lot_take_only_returned_changes; DROP TRIGGER lot_take_never_deleted; DROP TRIGGER lot_move_no_update; DROP TRIGGER lot_move_no_delete;
            DROP TABLE webhook_alias;
            """)
    }

    /// v10 records the currency: from the history when there is one (each run's from its
    /// notices, the coalition's from the last run), else the configured one; a configuration
    /// naming another is refused from then on, by writable and read-only stores alike (a closed
    /// run's statements would otherwise change currency), and the record never changes.
    /// A writable open with another currency is refused before the journal is opened for
    /// writing: not a byte of coalition.sqlite changes (SQLite's WAL set-up alone would write).
    @Test func anotherCurrencyIsRefusedWithoutWritingAByte() throws {
        let (h, url) = try Harness.closedWithOneEarn()
        for suffix in ["-wal", "-shm"] { try? FileManager.default.removeItem(atPath: url.path + suffix) }  // as a clean close leaves it
        let before = try Data(contentsOf: url)
        var usd = h.configuration
        usd.coalition.currency = "USD"
        #expect(throws: Store.CurrencyMismatch.self) { try Store(dataDirectory: h.dir.url, configuration: usd, clock: h.clock) }
        #expect(try Data(contentsOf: url) == before, "coalition.sqlite changed")
    }

    @Test func theCurrencyIsRecordedOnceFromTheHistoryAndNeverChanges() throws {
        let h = try expiredThenReopened()
        let statement = try h.store.statement(for: G, run: "R000001")
        #expect(statement?.notice.currency == "EUR")
        try h.store.close()
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        var usd = h.configuration
        usd.coalition.currency = "USD"
        func refusesUSD(readOnly: Bool) {
            do {
                _ = try Store(dataDirectory: h.dir.url, configuration: usd, clock: h.clock, readOnly: readOnly)
                Issue.record("a store opened in another currency (read-only: \(readOnly))")
            } catch {
                #expect("\(error)".contains("currency: is USD, but this coalition settles in EUR"), "\(error)")
            }
        }
        // As before v10: no record, no currency with the runs. A read-only open (a verb that
        // only reads) with another currency neither records it nor opens.
        try MigrationTests.rawQueue(url).write { db in
            try db.execute(sql: """
                DROP TABLE coalition_currency;
                DROP TRIGGER run_immutable_u;
                ALTER TABLE run DROP COLUMN currency;
                CREATE TRIGGER run_immutable_u BEFORE UPDATE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                DELETE FROM grdb_migrations WHERE identifier IN ('v10-coalition-currency', 'v11-run-names-after-a-restore', 'v12-run-currency', 'v13-open-lot-check-on-growth', 'v14-webhook-id-aliases', 'v15-takes-and-moves-fixed');
                DROP TRIGGER lot_take_only_returned_changes; DROP TRIGGER lot_take_never_deleted; DROP TRIGGER lot_move_no_update; DROP TRIGGER lot_move_no_delete;
                DROP TABLE webhook_alias;
                DROP TABLE run_naming;
                """)
        }
        #expect(throws: Store.NeedsWriting.self) { try Store(dataDirectory: h.dir.url, configuration: usd, clock: h.clock, readOnly: true) }
        // The first writable open migrates: the history (R000001's notices say EUR) refuses USD…
        refusesUSD(readOnly: false)
        let (runCurrency, recorded) = try MigrationTests.rawQueue(url).read { db in
            (try String.fetchOne(db, sql: "SELECT currency FROM run WHERE number = 1"), try String.fetchOne(db, sql: "SELECT currency FROM coalition_currency"))
        }
        #expect(runCurrency == "EUR", "each run's currency from its notices")
        #expect(recorded == nil, "nothing recorded by a refused open")
        // …and records EUR.
        try h.reopen()
        #expect(try h.store.coalition.read { try String.fetchOne($0, sql: "SELECT currency FROM coalition_currency") } == "EUR")
        try h.store.close()
        refusesUSD(readOnly: false)
        refusesUSD(readOnly: true)
        try h.reopen()
        #expect(try h.store.statement(for: G, run: "R000001") == statement, "the closed run's statement is as it was")
        #expect(throws: DatabaseError.self) {
            try h.store.coalition.write { try $0.execute(sql: "UPDATE coalition_currency SET currency = 'USD'") }
        }
        #expect(try h.verify().ok)

        // A directory v10 reached before v12 existed (a recorded currency, no run currency):
        // v12 adds it, and runs settle and statements read as before.
        try h.store.close()
        try MigrationTests.rawQueue(url).write { db in
            try db.execute(sql: """
                DROP TRIGGER run_immutable_u;
                ALTER TABLE run DROP COLUMN currency;
                CREATE TRIGGER run_immutable_u BEFORE UPDATE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                DELETE FROM grdb_migrations WHERE identifier IN ('v12-run-currency', 'v13-open-lot-check-on-growth', 'v14-webhook-id-aliases', 'v15-takes-and-moves-fixed');
                DROP TRIGGER lot_take_only_returned_changes; DROP TRIGGER lot_take_never_deleted; DROP TRIGGER lot_move_no_update; DROP TRIGGER lot_move_no_delete;
                DROP TABLE webhook_alias;
                """)
        }
        try h.reopen()
        h.clock.advance(milliseconds: 1_000)
        #expect(try h.store.settle().id == "R000002")
        #expect(try h.store.statement(for: G, run: "R000001") == statement)
        #expect(try h.store.statement(for: G, run: "R000002")?.notice.currency == "EUR")
        #expect(try h.verify().ok)
    }

    /// v8 moved each lot's points left out of the lot row into `lot_open`. A directory written
    /// by v7 (lots untouched, partly and wholly redeemed, reversed, expired by a run, reopened)
    /// must hold the same points in the same lots after it, pass `verify`, and go on posting
    /// and settling as if it had never been migrated.
    @Test func v8MovesEachLotsPointsLeftIntoOpenLots() throws {
        let h = try expiredThenReopened()
        h.clock.set(Instant(rfc3339: "2026-11-24T01:00:00Z")!)
        _ = h.post(G, "g2", Fixtures.earn("M2", 500, "G-2"))
        _ = h.post(F, "f1", Fixtures.earn("M2", 200, "F-1"))
        _ = h.post(C, "c3", Fixtures.redeem("M2", 600, "C-3"))          // empties G-2, takes 100 of F-1
        _ = h.post(F, "f2", Fixtures.reverseEarn("M2", 50, "F-2", of: "F-1"))
        _ = h.post(F, "f3", Fixtures.earn("M3", 70, "F-3"))
        let openLots = "SELECT member, lot_id, remaining FROM lot_open ORDER BY lot_id"
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        let before = try h.store.coalition.read { try Row.fetchAll($0, sql: openLots) }
        #expect(before.map { $0[0] as String } == ["M1", "M2", "M3"], "\(before)")
        #expect(before.map { $0[2] as Int64 } == [30, 50, 70])
        let balances = try ["M1", "M2", "M3"].map { try h.balance($0) }
        try h.store.close()

        let raw = try MigrationTests.rawQueue(url)
        try raw.write { try MigrationTests.downgradeToV7($0) }
        #expect(try raw.read { try Int64.fetchAll($0, sql: "SELECT remaining FROM lot ORDER BY id") } == [30, 0, 50, 70])
        try raw.close()
        // `verify` reads the directory as v7 left it, before any start migrates it; and finds a
        // tampered lot there too.
        #expect(try h.verify().ok)
        let tamper = try MigrationTests.rawQueue(url)
        try tamper.write { try $0.execute(sql: "UPDATE lot SET remaining = 49 WHERE id = 5") }
        #expect(try h.verify().breaches.contains { $0.contains("lot 5: differs from the journal in remaining") && $0.contains("holds 49 of 200") })
        try tamper.write { try $0.execute(sql: "UPDATE lot SET remaining = 50 WHERE id = 5") }
        try tamper.close()

        try h.reopen()
        let after = try h.store.coalition.read { try Row.fetchAll($0, sql: openLots) }
        #expect(after == before)
        #expect(try h.store.coalition.read { try Bool.fetchOne($0, sql: "SELECT COUNT(*) = 0 FROM sqlite_schema WHERE name = 'lot_open_by_member'") } == true)
        #expect(try ["M1", "M2", "M3"].map { try h.balance($0) } == balances)
        #expect(try h.verify().ok)
        // Posting and settling go on from the migrated lots.
        #expect(entry(h.post(C, "c4", Fixtures.redeem("M2", 50, "C-4")))?.memberBalance == Points(0))
        #expect(slug(h.post(C, "c5", Fixtures.redeem("M3", 71, "C-5"))) == "insufficient-points")
        h.clock.set(Instant(rfc3339: "2026-11-26T00:00:00Z")!)
        let run = try h.store.settle()
        #expect(figures(run, G)?.expiredPoints == Points(30), "the reopened lot expires")
        #expect(figures(run, F)?.expiredPoints == Points(70), "M3's lot expires")
        #expect(try h.balance("M1") == 0 && h.balance("M3") == 0)
        #expect(try h.store.coalition.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM lot_open") } == 0)
        #expect(try h.verify().ok)
    }

    /// A directory as v12 left it (v9's trigger on `lot_open`, no aliases) upgrades through v13
    /// to v15: the trigger checks as before where it can fail, aliases work, takes and moves are
    /// fixed, verify passes.
    @Test func aV12DirectoryUpgradesThroughV13ToV15() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 30, "C-1"))
        try h.store.close()
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        try MigrationTests.rawQueue(url).write { db in
            try db.execute(sql: """
                DROP TRIGGER lot_open_update_within_its_lot;
                CREATE TRIGGER lot_open_update_within_its_lot BEFORE UPDATE ON lot_open
                  WHEN NOT EXISTS (SELECT 1 FROM lot WHERE id = NEW.lot_id AND member = NEW.member AND points >= NEW.remaining)
                  BEGIN SELECT RAISE(ABORT, 'lot_open: points left must lie within a lot of the same member'); END;
                DROP TABLE webhook_alias;
                DELETE FROM grdb_migrations WHERE identifier IN ('v13-open-lot-check-on-growth', 'v14-webhook-id-aliases', 'v15-takes-and-moves-fixed');
                DROP TRIGGER lot_take_only_returned_changes; DROP TRIGGER lot_take_never_deleted; DROP TRIGGER lot_move_no_update; DROP TRIGGER lot_move_no_delete;
                """)
        }
        try h.reopen()
        let trigger = try h.store.coalition.read {
            try String.fetchOne($0, sql: "SELECT sql FROM sqlite_schema WHERE name = 'lot_open_update_within_its_lot'")
        }
        #expect(trigger?.contains("NEW.remaining > OLD.remaining") == true, "v13's trigger: \(trigger ?? "none")")
        #expect(h.post(C, "c2", Fixtures.redeem("M1", 20, "C-2")).httpStatus == 201, "a partial take under v13's trigger")
        #expect(h.post(C, "c3", Fixtures.redeem("M1", 20, "C-2")).httpStatus == 200, "a replay by reference binds c3")
        #expect(slug(h.post(C, "c3", Fixtures.redeem("M1", 5, "C-9"))) == "conflict")
        #expect(try h.balance("M1") == 50)
        #expect(try h.verify().ok)
        let fixed = try h.store.coalition.read {
            try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('lot_take_only_returned_changes', 'lot_take_never_deleted', 'lot_move_no_update', 'lot_move_no_delete')")
        }
        #expect(fixed == 4, "v15's triggers")
        // A v12 directory whose trigger was dropped by hand still upgrades (v13 recreates it).
        try h.store.close()
        try MigrationTests.rawQueue(url).write { db in
            try db.execute(sql: """
                DROP TRIGGER lot_open_update_within_its_lot;
                DELETE FROM grdb_migrations WHERE identifier = 'v13-open-lot-check-on-growth';
                """)
        }
        try h.reopen()
        #expect(try h.store.coalition.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'lot_open_update_within_its_lot'") } == 1)
    }

    /// `verify` reads each lot's points left from `lot_open`: a changed amount, or points held
    /// under a member the lot is not of, is a breach that names the lot.
    @Test func verifyNamesOpenLotsThatDisagree() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(G, "g2", Fixtures.earn("M2", 100, "G-2"))
        #expect(try h.verify().ok)
        let raw = try MigrationTests.rawQueue(h.dir.url.appendingPathComponent("coalition.sqlite"))
        try raw.write { try $0.execute(sql: "UPDATE lot_open SET remaining = 99 WHERE member = 'M1'") }
        var report = try h.verify()
        #expect(report.breaches.contains { $0.contains("lot 1: differs from the journal in remaining") && $0.contains("holds 99 of 100") }, "\(report.breaches)")
        // SQLite itself refuses points left beyond their lot or under another member...
        #expect(throws: DatabaseError.self) { try raw.write { try $0.execute(sql: "UPDATE lot_open SET remaining = 101 WHERE member = 'M1'") } }
        #expect(throws: DatabaseError.self) { try raw.write { try $0.execute(sql: "UPDATE lot_open SET remaining = 100, member = 'M2' WHERE member = 'M1'") } }
        #expect(throws: DatabaseError.self) { try raw.write { try $0.execute(sql: "INSERT INTO lot_open (member, lot_id, remaining) VALUES ('M1', 2, 5)") } }
        // (v13 checks an update only where it can fail: fewer points in the same lot of the
        // same member are within it; a move to another lot is checked, and refused here since
        // lot 2 is M2's.)
        #expect(throws: DatabaseError.self) { try raw.write { try $0.execute(sql: "UPDATE lot_open SET lot_id = 2, remaining = 50 WHERE member = 'M1'") } }
        try raw.write { try $0.execute(sql: "UPDATE lot_open SET remaining = 98 WHERE member = 'M1'") }
        #expect(try raw.read { try Int.fetchOne($0, sql: "SELECT remaining FROM lot_open WHERE member = 'M1'") } == 98)
        // ...so a hand that edits the file drops its triggers first; verify still names it.
        try raw.write { db in
            try db.execute(sql: "DROP TRIGGER lot_open_update_within_its_lot")
            try db.execute(sql: "UPDATE lot_open SET remaining = 100, member = 'M2' WHERE member = 'M1'")
        }
        report = try h.verify()
        #expect(report.breaches.contains { $0.contains("member M2 holds points in lot 1") }, "\(report.breaches)")
        try raw.close()
    }

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
