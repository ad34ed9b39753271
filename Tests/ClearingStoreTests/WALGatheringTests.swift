import ClearhouseTestSupport
import ClearingDomain
import ClearingSimulation
@testable import ClearingStore
import Foundation
import GRDB
import Testing

/// The coalition writer's WAL writes are gathered into one buffer and written at the commit's
/// fsync (`CSQLiteConfig/wal_buffer.c`). A commit that returned must be in the WAL file, a
/// write that fails must fail its commit, and gathering must change no byte of what is stored.
@Suite struct WALGatheringTests {
    /// A store holding two earns whose journal insert of reference B-1 fails with
    /// the trigger's `RAISE(raise, ...)`; `DROP TRIGGER temp.poison` heals it.
    private func poisonedAfterTwoEarns(raise: String) throws -> Harness {
        let h = try Harness()
        #expect(h.store.post(earns(2, prefix: "a")).allSatisfy { $0.httpStatus == 201 })
        try h.store.coalition.writeWithoutTransaction { db in
            try db.execute(sql: """
                CREATE TEMP TRIGGER poison BEFORE INSERT ON main.journal WHEN NEW.reference = 'B-1'
                BEGIN SELECT RAISE(\(raise), 'poisoned'); END
                """)
        }
        return h
    }

    private func earns(_ count: Int, from: Int = 0, prefix: String = "w") -> [Submission] {
        (from..<(from + count)).map { i in
            Submission(partner: G, webhookID: WebhookID("\(prefix)\(i)")!, event: Fixtures.earn("M\(i % 7)", Int64(10 + i), "\(prefix.uppercased())-\(i)"))
        }
    }

    /// A copy of the files taken right after the commits returned, with the store still open
    /// (as a power cut would leave them): every committed entry is in it. Were frames still
    /// in the buffer when the commit returned, the copy would lack them.
    @Test func aCommitThatReturnedIsInTheWALFile() throws {
        let h = try Harness()
        var created = 0
        for round in 0..<5 {
            created += h.store.post(earns(40, from: round * 40)).filter { $0.httpStatus == 201 }.count
            // Another connection (the pool's reader) sees the commit at once.
            #expect(try h.store.coalition.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM journal") } == created)
        }
        #expect(created == 200)
        let gathering = h.store.coalitionWALGathering()
        #expect(gathering.gathered > 0, "the writer's WAL writes went through the buffer")
        #expect(gathering.flushes > 0 && gathering.flushes < gathering.gathered, "\(gathering)")

        let copy = TemporaryDirectory("clearhouse-wal-copy")
        defer { copy.remove() }
        let fm = FileManager.default
        try fm.createDirectory(at: copy.url, withIntermediateDirectories: true)
        for name in ["coalition.sqlite", "coalition.sqlite-wal"] {
            try fm.copyItem(at: h.dir.url.appendingPathComponent(name), to: copy.url.appendingPathComponent(name))
        }
        // SQLite rebuilds the WAL index from the WAL file itself (no -shm was copied).
        let db = try DatabaseQueue(path: copy.url.appendingPathComponent("coalition.sqlite").path)
        let (entries, integrity) = try db.read { db in
            (try Int.fetchOne(db, sql: "SELECT count(*) FROM journal"), try String.fetchOne(db, sql: "PRAGMA integrity_check"))
        }
        try db.close()
        #expect(entries == 200)
        #expect(integrity == "ok")
    }

    /// The buffer's write to the file fails when the commit fsyncs (injected, as a full or
    /// failing disk would): the commit fails, and so does the writer's retry of the batch
    /// posting by posting; every posting is answered 503 and nothing of them is stored. The
    /// next batch commits, and the store reopens and verifies clean.
    @Test func aFailedWriteOfTheBufferFailsItsCommitAndWritesNothing() throws {
        let h = try Harness()
        #expect(h.store.post(earns(3, prefix: "a")).allSatisfy { $0.httpStatus == 201 })
        h.store.failCoalitionWALFlushes(2)
        let failed = h.store.post(earns(20, prefix: "b"))
        #expect(failed.allSatisfy { $0.httpStatus == 503 }, "\(failed.map(slug))")
        let next = h.store.post(earns(5, prefix: "c"))
        #expect(next.allSatisfy { $0.httpStatus == 201 }, "\(next.map(slug))")

        try h.reopen()
        #expect(try h.verify().ok)
        #expect(try h.store.ledgerEntries(G).map(\.webhookID.rawValue) == ["a0", "a1", "a2", "c0", "c1", "c2", "c3", "c4"])
        // Nothing of the failed batch was kept: sent again, its postings are new.
        #expect(h.store.post(earns(20, prefix: "b")).allSatisfy { $0.httpStatus == 201 })
        #expect(try h.verify().ok)
    }

    /// The same simulated day posted with gathering on and off stores the same entries, hash
    /// for hash (the clock is the same hand-driven one).
    @Test func gatheringChangesNothingThatIsStored() throws {
        var heads: [[String]] = []
        // The last run spills pages to the WAL mid-batch (a cache of 20 pages), so that frames
        // are read back, rewritten and rolled back while gathered.
        for (bytes, cachePages) in [(Limits.coalitionWALBufferBytes, 0), (0, 0), (8 * 1024, 0), (4 * 1024, 0), (Limits.coalitionWALBufferBytes, 20)] {
            let h = try Harness(walBufferBytes: bytes)
            if cachePages > 0 {
                try h.store.coalition.writeWithoutTransaction {
                    try $0.execute(sql: "PRAGMA cache_size = \(cachePages)")
                    try $0.execute(sql: "PRAGMA cache_spill = ON")  // the store turns it off
                }
            }
            let day = DaySimulator(partners: h.configuration.partnerIDs, members: 300, events: 3_000, seed: 7, start: h.clock.now())
            var batch: [Submission] = []
            for p in IteratorSequence(day) {
                batch.append(Submission(partner: p.partner, webhookID: p.webhookID, event: p.event))
                if batch.count == 500 {
                    _ = h.store.post(batch)
                    batch = []
                    h.clock.advance(milliseconds: 1_000)
                }
            }
            _ = h.store.post(batch)
            let gathering = h.store.coalitionWALGathering()
            #expect((gathering.gathered > 0) == (bytes > 0), "\(bytes): \(gathering)")
            #expect(try h.store.coalition.read { try String.fetchOne($0, sql: "PRAGMA integrity_check") } == "ok")
            heads.append(try h.store.coalition.read { db in
                try Row.fetchAll(db, sql: "SELECT partner, last_sequence, hex(last_hash) FROM partner_head ORDER BY partner")
                    .map { "\($0[0] as String) \($0[1] as Int64) \($0[2] as String)" }
            })
            #expect(try h.verify().ok)
        }
        #expect(heads[0].count == 3)
        #expect(Set(heads).count == 1, "\(heads)")
    }

    /// A transaction of the writer spills pages to the WAL and rolls back; another writer
    /// (a second store on the directory, as `clearhouse post` beside `serve`) then commits.
    /// Frames of the rolled-back transaction still in the buffer must not reach the file
    /// after that commit (they would overwrite it): they are written out before the write
    /// lock is released.
    @Test func framesOfARolledBackTransactionNeverOverwriteAnotherWritersCommit() throws {
        let h = try Harness()
        #expect(h.store.post(earns(3, prefix: "a")).allSatisfy { $0.httpStatus == 201 })
        // A reader holds a snapshot throughout, so that the WAL cannot start over: the other
        // writer's frames go where the rolled-back ones were.
        let reader = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        let pinned = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            try? reader.read { db in
                _ = try Int.fetchOne(db, sql: "SELECT count(*) FROM journal")
                pinned.signal()
                release.wait()
            }
        }
        pinned.wait()
        try h.store.coalition.writeWithoutTransaction { db in
            try db.execute(sql: "CREATE TABLE scratch (x BLOB)")
            try db.execute(sql: "PRAGMA cache_size = 20")
            try db.execute(sql: "PRAGMA cache_spill = ON")  // the store turns it off
            let before = h.store.gathering(db)
            try db.inTransaction {
                // ~60 pages through a 20-page cache: pages spill to the WAL and stay gathered.
                for _ in 0..<60 { try db.execute(sql: "INSERT INTO scratch VALUES (randomblob(3000))") }
                return .rollback
            }
            #expect(h.store.gathering(db).gathered > before.gathered, "the rolled-back transaction's frames were gathered")
            try db.execute(sql: "PRAGMA cache_size = -\(Limits.coalitionCacheKiBMax)")
        }
        let other = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        #expect(other.post(earns(5, prefix: "b")).allSatisfy { $0.httpStatus == 201 })
        #expect(h.store.post(earns(5, prefix: "c")).allSatisfy { $0.httpStatus == 201 })
        #expect(try h.store.coalition.read { try String.fetchOne($0, sql: "PRAGMA integrity_check") } == "ok")
        release.signal()
        try reader.close()
        try other.close()  // its closing checkpoint waits for no reader
        try h.reopen()
        #expect(try h.verify().ok)
        #expect(try h.store.ledgerEntries(G).count == 13)
    }

    /// The store's writer never spills a transaction's pages to the WAL before COMMIT, even
    /// with a cache far smaller than the transaction (SQLite 3.40.1's savepoint defect needs a
    /// spill; docs/DURABILITY.md).
    @Test func theWriterNeverSpillsMidTransaction() throws {
        let h = try Harness()
        try h.store.coalition.writeWithoutTransaction { db in
            #expect(try Int.fetchOne(db, sql: "PRAGMA cache_spill") == 0)
            try db.execute(sql: "CREATE TABLE scratch (x BLOB)")
            try db.execute(sql: "PRAGMA cache_size = 20")
            let before = h.store.gathering(db)
            try db.inTransaction {
                for _ in 0..<60 { try db.execute(sql: "INSERT INTO scratch VALUES (randomblob(3000))") }
                #expect(h.store.gathering(db).gathered == before.gathered, "no page reached the WAL before COMMIT")
                return .rollback
            }
            try db.execute(sql: "PRAGMA cache_size = -\(Limits.coalitionCacheKiBMax)")
        }
        #expect(h.post(G, "g1", Fixtures.earn("M1", 10, "G-1")).httpStatus == 201)
        // A settlement run may spill (it uses no savepoint); posting after it does not.
        _ = try h.store.settle()
        #expect(try h.store.coalition.writeWithoutTransaction { try Int.fetchOne($0, sql: "PRAGMA cache_spill") } == 0)
        try h.reopen()
        #expect(try h.verify().ok)
    }

    /// The buffer's write fails on a call other than the commit's sync (here pages spilled and
    /// read back mid-transaction): the transaction fails and nothing of it is stored.
    @Test func aFailedWriteOfTheBufferMidTransactionFailsTheTransaction() throws {
        let h = try Harness(walBufferBytes: 64 * 1024)
        try h.store.coalition.writeWithoutTransaction { db in
            try db.execute(sql: "CREATE TABLE scratch (x BLOB)")
            try db.execute(sql: "PRAGMA cache_size = 10")
            try db.execute(sql: "PRAGMA cache_spill = ON")  // the store turns it off
        }
        h.store.failCoalitionWALFlushes(1)
        #expect(throws: (any Error).self) {
            try h.store.coalition.writeWithoutTransaction { db in
                try db.inTransaction {
                    for _ in 0..<1_000 { try db.execute(sql: "INSERT INTO scratch VALUES (randomblob(1000))") }
                    _ = try Int.fetchOne(db, sql: "SELECT count(*) FROM scratch")
                    return .commit
                }
            }
        }
        #expect(try h.store.coalition.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM scratch") } == 0)
        try h.store.coalition.writeWithoutTransaction { db in
            try db.execute(sql: "PRAGMA cache_size = -\(Limits.coalitionCacheKiBMax)")
        }
        // The next batch commits (its first commit may meet the deferred error once, and the
        // writer then decides it again posting by posting).
        #expect(h.store.post(earns(5, prefix: "c")).allSatisfy { $0.httpStatus == 201 })
        try h.reopen()
        #expect(try h.verify().ok)
        #expect(try h.store.ledgerEntries(G).count == 5)
    }

    /// A posting whose storage error makes SQLite roll back the whole transaction (here a
    /// trigger's RAISE(ROLLBACK) on the writer's connection, as an I/O error would) while the
    /// batch is decided posting by posting: the earlier postings are gone with it, so the
    /// batch fails as a whole (503) and nothing of it is stored; the later postings never
    /// commit on their own, outside the batch's transaction.
    @Test func aTransactionRolledBackBySQLiteFailsTheWholeBatch() throws {
        let h = try poisonedAfterTwoEarns(raise: "ROLLBACK")
        let outcomes = h.store.post(earns(3, prefix: "b"))
        #expect(outcomes.allSatisfy { $0.httpStatus == 503 }, "\(outcomes.map(slug))")
        try h.store.coalition.writeWithoutTransaction { try $0.execute(sql: "DROP TRIGGER temp.poison") }
        #expect(try h.store.coalition.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM journal") } == 2)
        #expect(h.store.post(earns(3, prefix: "b")).map(\.httpStatus) == [201, 201, 201])
        #expect(try h.store.ledgerEntries(G).map(\.sequence) == [1, 2, 3, 4, 5])
        #expect(try h.verify().ok)
    }

    /// A posting fails in storage (here a trigger's RAISE(ABORT)) and undoing its savepoint
    /// fails too: what it wrote may still be in the transaction, so the batch must not commit.
    /// Every posting of it is answered 503 and nothing of it is stored; a retry is decided anew.
    /// Without the undo failing, the same batch costs the failing posting alone.
    @Test func aFailedSavepointUndoFailsTheWholeBatch() throws {
        let h = try poisonedAfterTwoEarns(raise: "ABORT")
        h.store.failSavepointUndos(1)
        let outcomes = h.store.post(earns(3, prefix: "b"))
        #expect(outcomes.allSatisfy { $0.httpStatus == 503 }, "\(outcomes.map(slug))")
        #expect(try h.store.coalition.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM journal") } == 2)
        #expect(try h.store.ledgerEntries(G).count == 2)

        // The same batch, the undo working: only the poisoned posting fails.
        #expect(h.store.post(earns(3, prefix: "b")).map(\.httpStatus) == [201, 503, 201])
        try h.store.coalition.writeWithoutTransaction { try $0.execute(sql: "DROP TRIGGER temp.poison") }
        #expect(h.store.post(earns(3, prefix: "b")).map(\.httpStatus) == [200, 201, 200])
        #expect(try h.store.ledgerEntries(G).map(\.event.reference.rawValue) == ["A-0", "A-1", "B-0", "B-2", "B-1"])
        #expect(try h.verify().ok)
    }
}
