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
        }
        #expect(created == 200)
        let gathering = try h.store.coalitionWALGathering()
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
        try h.store.failCoalitionWALFlushes(2)
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
        for bytes in [Limits.coalitionWALBufferBytes, 0, 8 * 1024, 4 * 1024] {
            let h = try Harness(walBufferBytes: bytes)
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
            let gathering = try h.store.coalitionWALGathering()
            #expect((gathering.gathered > 0) == (bytes > 0), "\(bytes): \(gathering)")
            heads.append(try h.store.coalition.read { db in
                try Row.fetchAll(db, sql: "SELECT partner, last_sequence, hex(last_hash) FROM partner_head ORDER BY partner")
                    .map { "\($0[0] as String) \($0[1] as Int64) \($0[2] as String)" }
            })
            #expect(try h.verify().ok)
        }
        #expect(heads[0].count == 3)
        #expect(Set(heads).count == 1, "\(heads)")
    }
}
