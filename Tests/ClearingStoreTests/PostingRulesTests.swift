import ClearhouseTestSupport
import ClearingDomain
import ClearingStore
import Foundation
import GRDB
import Logging
import Synchronization
import Testing

/// A store on a temporary directory with a hand-driven clock.
final class Harness {
    let dir = TemporaryDirectory()
    let clock = ManualClock()
    let configuration: ClearingConfiguration
    var store: Store!

    init(
        expireAfterDays: Int64 = 1095, faults: FaultInjector? = nil, walBufferBytes: Int = Limits.coalitionWALBufferBytes,
        lotCacheMembersMax: Int = Limits.lotCacheMembersMax
    ) throws {
        configuration = Fixtures.configuration(expireAfterDays: expireAfterDays)
        store = try Store(
            dataDirectory: dir.url, configuration: configuration, clock: clock, faults: faults, walBufferBytes: walBufferBytes,
            lotCacheMembersMax: lotCacheMembersMax)
    }

    deinit {
        try? store?.close()
        dir.remove()
    }

    func post(_ partner: PartnerID, _ webhookID: String, _ event: Event) -> PostingOutcome {
        post([(partner, webhookID, event)])[0]
    }

    /// Posts these as one batch (one group commit).
    func post(_ batch: [(PartnerID, String, Event)]) -> [PostingOutcome] {
        store.post(batch.map { Submission(partner: $0.0, webhookID: WebhookID($0.1)!, event: $0.2) })
    }

    /// Drops the store as a crash would (no clean-up) and opens it again, running recovery.
    func reopen(faults: FaultInjector? = nil) throws {
        try? store.close()
        store = try Store(dataDirectory: dir.url, configuration: configuration, clock: clock, faults: faults)
    }

    func verify() throws -> VerifyReport {
        try Verifier.verify(dataDirectory: dir.url)
    }

    func balance(_ m: String) throws -> Int64 { try store.balance(of: MemberID(m)!).value }

    /// A store with one earn of grocer's, closed: its `coalition.sqlite`, to look at or edit.
    static func closedWithOneEarn() throws -> (Harness, URL) {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 10, "G-1"))
        try h.store.close()
        h.store = nil
        return (h, h.dir.url.appendingPathComponent("coalition.sqlite"))
    }
}

func slug(_ o: PostingOutcome) -> String {
    switch o {
    case .created: "created"
    case .replayed: "replayed"
    case .rejected(let p): p.kind.rawValue
    }
}

func entry(_ o: PostingOutcome) -> Entry? {
    switch o {
    case .created(let e), .replayed(let e): e
    case .rejected: nil
    }
}

let G = Fixtures.grocer, F = Fixtures.fuel, C = Fixtures.cinema

@Suite struct PostingRulesTests {
    @Test func earnCreatesALotAndAnswersTheContractBody() throws {
        let h = try Harness()
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:01.123Z")!)
        let o = h.post(F, "w1", Fixtures.earn("M1", 100, "R-1"))
        #expect(o.httpStatus == 201)
        #expect(o.bodyJSON == #"{"partner":"fuel","sequence":1,"type":"points.earned","member":"M1","points":100,"reference":"R-1","accepted_at":"2026-11-22T10:00:01.123Z","member_balance":100}"#)
        #expect(try h.balance("M1") == 100)
        #expect(try h.balance("NEVER-EARNED") == 0)
    }

    @Test func replayByWebhookIDReturnsTheOriginalBodyUnchanged() throws {
        let h = try Harness()
        let first = h.post(F, "w1", Fixtures.earn("M1", 100, "R-1"))
        h.clock.advance(milliseconds: 5_000)
        _ = h.post(F, "w2", Fixtures.earn("M1", 50, "R-2"))  // balance moves on
        let again = h.post(F, "w1", Fixtures.earn("M1", 100, "R-1"))
        #expect(again.httpStatus == 200)
        #expect(again.bodyJSON == first.bodyJSON)
        #expect(try h.store.ledgerEntries(F).count == 2)
    }

    @Test func replayByReferenceUnderAnotherWebhookID() throws {
        let h = try Harness()
        let first = h.post(F, "w1", Fixtures.earn("M1", 100, "R-1"))
        let again = h.post(F, "w-other", Fixtures.earn("M1", 100, "R-1"))
        #expect(again.httpStatus == 200 && again.bodyJSON == first.bodyJSON)
    }

    /// A webhook-id answered 200 as a replay by reference is that entry's from then on: the
    /// same webhook-id with other content is a conflict (§3: reused with different content),
    /// never a new entry, and the partner's identical retry of the 200 replays again.
    @Test func aWebhookIDAnsweredAsAReplayIsBoundToThatEntry() throws {
        let h = try Harness()
        let first = h.post(F, "A", Fixtures.earn("M1", 10, "R-1"))
        #expect(h.post(F, "B", Fixtures.earn("M1", 10, "R-1")).bodyJSON == first.bodyJSON)
        #expect(slug(h.post(F, "B", Fixtures.earn("M1", 10, "R-2"))) == "conflict", "B was answered with R-1's entry")
        #expect(slug(h.post(F, "B", Fixtures.redeem("M1", 5_000, "R-3"))) == "conflict", "before a refusal of its own")
        let retry = h.post(F, "B", Fixtures.earn("M1", 10, "R-1"))
        #expect(retry.httpStatus == 200 && retry.bodyJSON == first.bodyJSON)
        // In another batch with other postings, after a reopen (the binding is in the
        // journal's database), and at another partner (webhook-ids are per partner).
        try h.reopen()
        let outcomes = h.store.post([
            Submission(partner: F, webhookID: WebhookID("C")!, event: Fixtures.earn("M2", 5, "R-4")),
            Submission(partner: F, webhookID: WebhookID("B")!, event: Fixtures.earn("M2", 5, "R-5")),
            Submission(partner: G, webhookID: WebhookID("B")!, event: Fixtures.earn("M2", 5, "R-5")),
        ])
        #expect(outcomes.map(\.httpStatus) == [201, 409, 201])
        #expect(try h.store.ledgerEntries(F).map(\.event.reference.rawValue) == ["R-1", "R-4"])
        #expect(try h.balance("M1") == 10 && h.balance("M2") == 10)
        var report = try h.verify()
        #expect(report.ok && report.checks.contains { $0.contains("webhook-id aliases: 1") }, "\(report)")
        // SQLite refuses an alias that repeats a journal webhook-id; one slipped in anyway is a breach.
        let raw = try MigrationTests.rawQueue(h.dir.url.appendingPathComponent("coalition.sqlite"))
        #expect(throws: DatabaseError.self) { try raw.write { try $0.execute(sql: "INSERT INTO webhook_alias VALUES ('fuel', 'C', 1)") } }
        #expect(throws: DatabaseError.self) { try raw.write { try $0.execute(sql: "DELETE FROM webhook_alias") } }
        try raw.write { db in
            try db.execute(sql: "DROP TRIGGER webhook_alias_of_a_journal_entry; INSERT INTO webhook_alias VALUES ('fuel', 'C', 1)")
        }
        try raw.close()
        report = try h.verify()
        #expect(report.breaches.contains { $0.contains(#"webhook_alias fuel "C": is also a webhook-id of an entry in the journal"#) }, "\(report.breaches)")
    }

    /// A posting the rules refuse is first a replay or a conflict if its webhook-id, its
    /// reference or an alias says so (CONTRACT §3): the refusal path asks the journal's unique
    /// indexes, each of them, before it answers with the rules' refusal. Alone and in a batch
    /// that another posting's storage failure sends down the savepoint path.
    @Test func aRefusedPostingIsStillAReplayOrAConflictFirst() throws {
        for isolated in [false, true] {
            let h = try Harness()
            if isolated {
                let raw = try GRDB.DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
                try raw.write { db in
                    try db.execute(sql: "CREATE TRIGGER poison BEFORE INSERT ON lot WHEN NEW.member = 'POISON' BEGIN SELECT RAISE(ABORT, 'poison'); END")
                }
                try raw.close()
            }
            /// Posts one event in a batch with a poisoned posting when `isolated` (decided again
            /// posting by posting in savepoints); the event's outcome.
            func post(_ webhookID: String, _ event: Event) -> PostingOutcome {
                guard isolated else { return h.post(F, webhookID, event) }
                let outcomes = h.post([(F, webhookID, event), (G, "poison-\(webhookID)", Fixtures.earn("POISON", 1, "P-\(webhookID)"))])
                #expect(outcomes[1].httpStatus == 503, "the poisoned posting fails alone")
                return outcomes[0]
            }
            let earned = post("w1", Fixtures.earn("M1", 10, "R-1"))
            let redeemed = post("w2", Fixtures.redeem("M1", 6, "R-2"))
            #expect(earned.httpStatus == 201 && redeemed.httpStatus == 201)
            #expect(entry(post("w3", Fixtures.redeem("M1", 4, "R-3")))?.memberBalance == Points(0), "nothing left")
            // Each of these is refused by the rules (no points left), but is first:
            #expect(slug(post("w1", Fixtures.redeem("M1", 5_000, "R-9"))) == "conflict", "webhook-id w1 holds R-1")
            #expect(slug(post("w9", Fixtures.redeem("M1", 5_000, "R-1"))) == "conflict", "reference R-1 is w1's earn")
            let again = post("w2", Fixtures.redeem("M1", 6, "R-2"))
            #expect(again.httpStatus == 200 && again.bodyJSON == redeemed.bodyJSON, "a replay of w2, refused if decided anew")
            // A retry of R-2 under a new webhook-id replays it and binds that webhook-id to it.
            let retry = post("w4", Fixtures.redeem("M1", 6, "R-2"))
            #expect(retry.httpStatus == 200 && retry.bodyJSON == redeemed.bodyJSON, "a replay by reference")
            #expect(slug(post("w4", Fixtures.redeem("M1", 7, "R-7"))) == "conflict", "w4 is bound to R-2 as an alias")
            #expect(slug(post("w5", Fixtures.redeem("M1", 7, "R-7"))) == "insufficient-points", "a new refusal is the rules'")
            #expect(try h.store.ledgerEntries(F).map(\.event.reference.rawValue) == ["R-1", "R-2", "R-3"])
            #expect(try h.verify().ok)
        }
    }

    @Test func conflicts() throws {
        let h = try Harness()
        _ = h.post(F, "w1", Fixtures.earn("M1", 100, "R-1"))
        #expect(slug(h.post(F, "w1", Fixtures.earn("M1", 101, "R-1"))) == "conflict", "same webhook id, other content")
        #expect(slug(h.post(F, "w1", Fixtures.earn("M1", 100, "R-9"))) == "conflict", "same webhook id, other reference")
        #expect(slug(h.post(F, "w2", Fixtures.earn("M1", 99, "R-1"))) == "conflict", "same reference, other content")
        #expect(slug(h.post(F, "w3", Fixtures.redeem("M1", 100, "R-1"))) == "conflict", "references are unique across event types")
        // The same reference at another partner is another transaction.
        #expect(slug(h.post(G, "w1", Fixtures.earn("M1", 7, "R-1"))) == "created")
        #expect(try h.balance("M1") == 107)
        #expect(try h.verify().ok)
    }

    @Test func unknownPartner() throws {
        let h = try Harness()
        let o = h.post(PartnerID("nobody")!, "w1", Fixtures.earn("M1", 1, "R-1"))
        #expect(o.httpStatus == 404 && slug(o) == "unknown-partner")
    }

    @Test func redemptionsNeedTheBalanceAndTakeFIFOAcrossIssuers() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 30, "G-1"))
        h.clock.advance(milliseconds: 1)
        _ = h.post(F, "f1", Fixtures.earn("M1", 50, "F-1"))
        let refused = h.post(C, "c0", Fixtures.redeem("M1", 81, "C-0"))
        #expect(refused.httpStatus == 422 && slug(refused) == "insufficient-points")
        let r = h.post(C, "c1", Fixtures.redeem("M1", 40, "C-1"))
        #expect(entry(r)?.memberBalance == Points(40))
        // 30 from the grocer's lot (oldest), then 10 from fuel's.
        #expect(try h.verify().ok)
        // A redemption reversal gives back last-taken first: 10 to fuel, then 5 to grocer.
        let rr = h.post(C, "c2", Fixtures.reverseRedemption("M1", 15, "C-2", of: "C-1"))
        #expect(entry(rr)?.memberBalance == Points(55))
        let next = h.post(C, "c3", Fixtures.redeem("M1", 5, "C-3"))
        #expect(slug(next) == "created")
        #expect(try h.verify().ok)
        #expect(slug(h.post(C, "c4", Fixtures.reverseRedemption("M1", 26, "C-4", of: "C-1"))) == "reversal-exceeds-original")
        #expect(slug(h.post(C, "c5", Fixtures.reverseRedemption("M1", 25, "C-5", of: "C-1"))) == "created")
        #expect(slug(h.post(C, "c6", Fixtures.reverseRedemption("M1", 1, "C-6", of: "C-1"))) == "reversal-exceeds-original")
    }

    @Test func earnReversalOnlyOfWhatIsLeftInTheLot() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 70, "C-1"))
        let tooMuch = h.post(G, "g2", Fixtures.reverseEarn("M1", 31, "G-2", of: "G-1"))
        #expect(slug(tooMuch) == "reversal-exceeds-original", "points already spent cannot be reversed")
        let ok = h.post(G, "g3", Fixtures.reverseEarn("M1", 30, "G-3", of: "G-1"))
        #expect(entry(ok)?.memberBalance == Points(0))
        #expect(slug(h.post(G, "g4", Fixtures.reverseEarn("M1", 1, "G-4", of: "G-1"))) == "reversal-exceeds-original")
        #expect(try h.verify().ok)
    }

    @Test func unknownOriginalAndMemberMismatch() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(G, "g2", Fixtures.redeem("M1", 10, "G-2"))
        #expect(slug(h.post(G, "a", Fixtures.reverseEarn("M1", 1, "X-1", of: "NOPE"))) == "unknown-original")
        #expect(slug(h.post(G, "b", Fixtures.reverseEarn("M1", 1, "X-2", of: "G-2"))) == "unknown-original", "a redemption is not an earn")
        #expect(slug(h.post(G, "c", Fixtures.reverseRedemption("M1", 1, "X-3", of: "G-1"))) == "unknown-original", "an earn is not a redemption")
        #expect(slug(h.post(F, "d", Fixtures.reverseEarn("M1", 1, "X-4", of: "G-1"))) == "unknown-original", "another partner's reference")
        #expect(slug(h.post(G, "e", Fixtures.reverseEarn("M1", 1, "X-5", of: "X-5"))) == "unknown-original", "itself")
        let mm = h.post(G, "f", Fixtures.reverseEarn("M2", 1, "X-6", of: "G-1"))
        #expect(mm.httpStatus == 422 && slug(mm) == "member-mismatch")
        #expect(slug(h.post(G, "g", Fixtures.reverseRedemption("M2", 1, "X-7", of: "G-2"))) == "member-mismatch")
        // Nothing was written by any refusal.
        #expect(try h.store.ledgerEntries(G).count == 2)
        #expect(try h.verify().ok)
    }

    @Test func expiredLotsLeaveTheBalanceAndCannotBeReversedOrSpent() throws {
        let h = try Harness(expireAfterDays: 1)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        h.clock.set(Instant(rfc3339: "2026-11-22T20:00:00Z")!)
        _ = h.post(F, "f1", Fixtures.earn("M1", 10, "F-1"))
        #expect(try h.balance("M1") == 110)
        // Exactly at expiry the lot no longer counts ("expiry at or before").
        h.clock.set(Instant(rfc3339: "2026-11-23T10:00:00Z")!)
        #expect(try h.balance("M1") == 10)
        #expect(slug(h.post(C, "c1", Fixtures.redeem("M1", 11, "C-1"))) == "insufficient-points")
        #expect(slug(h.post(G, "g2", Fixtures.reverseEarn("M1", 1, "G-2", of: "G-1"))) == "reversal-exceeds-original")
        let r = h.post(C, "c2", Fixtures.redeem("M1", 10, "C-2"))
        #expect(entry(r)?.memberBalance == Points(0))
        #expect(try h.verify().ok)
    }

    @Test func acceptanceTimesNeverGoBackwards() throws {
        let h = try Harness()
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        let a = entry(h.post(G, "g1", Fixtures.earn("M1", 1, "G-1")))!
        h.clock.set(Instant(rfc3339: "2026-11-22T09:00:00Z")!)  // the wall clock stepped back
        let b = entry(h.post(G, "g2", Fixtures.earn("M1", 1, "G-2")))!
        #expect(b.acceptedAt >= a.acceptedAt)
        #expect(try h.verify().ok)
    }

    /// The writer's two threads carry their names where operators look (`top -H`, `perf`):
    /// Linux refuses a name over 15 bytes, and the thread keeps the process's.
    @Test func theWritersThreadsAreNamed() throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store)
        defer { writer.shutdown() }
        // One posting through both threads: each has started (and named itself) by its answer.
        let answered = DispatchSemaphore(value: 0)
        writer.enqueue(Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 1, "G-1"))) { _ in answered.signal() }
        answered.wait()
        let names = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").compactMap {
            try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(names.contains("ch-decider") && names.contains("ch-ledgers"), "\(names)")
    }

    /// Another process (`clearhouse post` beside `serve`) decides an earn and dies before it
    /// copies it into the partner's ledger: the running writer, once idle, copies it, so that
    /// the ledger is whole (and `verify` passes) without waiting for that partner's next
    /// posting or the next start.
    @Test func aLedgerLeftBehindByAnotherProcessIsCaughtUpWhenTheWriterIsIdle() throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store, catchUpIdle: .milliseconds(100))
        defer { writer.shutdown() }
        let other = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, faults: { $0 == .afterJournalCommit })
        let died = other.post([Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 40, "G-1"))])
        #expect(died.first?.httpStatus == 503, "the other process stopped after its journal commit: \(died)")
        try? other.close()
        var waited = 0
        while try !h.verify().ok && waited < 100 {  // at most 5 s
            usleep(50_000)
            waited += 1
        }
        #expect(try h.verify().ok, "the idle writer copied the entry into its ledger")
        // The writer goes on as before: the next earn follows the copied one in the ledger.
        let answered = DispatchSemaphore(value: 0)
        let outcome = Mutex<PostingOutcome?>(nil)
        writer.enqueue(Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.earn("M1", 2, "G-2"))) { o in
            outcome.withLock { $0 = o }
            answered.signal()
        }
        answered.wait()
        guard case .created(let e) = outcome.withLock({ $0 }) else { Issue.record("not created"); return }
        #expect(e.sequence == 2)
        #expect(try h.verify().ok)
    }

    /// While the idle catch-up keeps failing (here: the ledger's last entry altered, so the
    /// trigger refuses the next one), its error is logged once, not every time the writer is
    /// idle; once it works again, that is said, and the ledger is whole.
    @Test func aFailingIdleCatchUpIsLoggedOnceAndItsRecoveryToo() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let configuration = Fixtures.configuration()
        let lines = LogLines()
        let store = try Store(dataDirectory: dir.url, configuration: configuration, clock: ManualClock(),
                              logger: Logger(label: "test") { _ in LogLines.Handler(lines: lines) })
        defer { try? store.close() }
        #expect(store.post([Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 40, "G-1"))])[0].httpStatus == 201)
        let other = try Store(dataDirectory: dir.url, configuration: configuration, clock: ManualClock(), faults: { $0 == .afterJournalCommit })
        #expect(other.post([Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.earn("M1", 2, "G-2"))])[0].httpStatus == 503)
        try? other.close()
        let hash = try SQLiteTool.run(store.ledgerURL(G), "SELECT hex(hash) FROM entry WHERE sequence = 1").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try SQLiteTool.run(store.ledgerURL(G), "DROP TRIGGER entry_append_only_update; UPDATE entry SET hash = zeroblob(32) WHERE sequence = 1").status == 0)

        let writer = PostingWriter(store: store, catchUpIdle: .milliseconds(20))
        defer { writer.shutdown() }
        usleep(600_000)  // about 30 idle looks, each failing
        #expect(lines.count(of: "ledger catch-up failed") == 1, "\(lines.all)")
        #expect(try !Verifier.verify(dataDirectory: dir.url).ok)

        #expect(try SQLiteTool.run(store.ledgerURL(G), "UPDATE entry SET hash = x'\(hash)' WHERE sequence = 1").status == 0)
        var waited = 0
        while lines.count(of: "ledger catch-up works again") == 0 && waited < 100 {
            usleep(50_000)
            waited += 1
        }
        #expect(lines.count(of: "ledger catch-up works again") == 1 && lines.count(of: "ledger catch-up failed") == 1, "\(lines.all)")
        #expect(try SQLiteTool.run(store.ledgerURL(G), "SELECT max(sequence) FROM entry").stdout.hasPrefix("2"))
    }

    @Test func groupCommitSharesCommitsAmongConcurrentPostings() async throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store)
        let before = h.store.commitCount
        let n = 3_000
        let outcomes = await withTaskGroup(of: PostingOutcome.self) { group in
            for i in 0..<n {
                group.addTask {
                    await writer.post(Submission(
                        partner: [G, F, C][i % 3], webhookID: WebhookID("w\(i)")!, event: Fixtures.earn("M\(i % 97)", 10, "R-\(i)")))
                }
            }
            var all: [PostingOutcome] = []
            for await o in group { all.append(o) }
            return all
        }
        writer.shutdown()
        #expect(outcomes.allSatisfy { $0.httpStatus == 201 })
        let stats = writer.batchStatistics
        #expect(stats.postings == n)
        #expect(stats.batches < n / 5, "postings must share batches: \(stats)")
        // One journal commit per batch plus one per touched ledger (at most 3).
        #expect(h.store.commitCount - before <= stats.batches * 4)
        #expect(try h.verify().ok)
        let total = try (0..<97).reduce(Int64(0)) { $0 + (try h.balance("M\($1)")) }
        #expect(total == Int64(n) * 10)
    }

    @Test func aFullQueueAnswersUnavailableAtOnce() async throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store, queueMax: 4)
        // Enqueue far more than the queue holds from one thread, faster than one batch commits.
        let refused = Mutex(0)
        let done = DispatchGroup()
        for i in 0..<400 {
            done.enter()
            writer.enqueue(Submission(partner: G, webhookID: WebhookID("q\(i)")!, event: Fixtures.earn("M1", 1, "Q-\(i)"))) { o in
                if case .rejected(let p) = o, p.kind == .unavailable, p.retryAfterSeconds != nil { refused.withLock { $0 += 1 } }
                done.leave()
            }
        }
        done.wait()
        writer.shutdown()
        let n = refused.withLock { $0 }
        #expect(n > 0, "a bounded queue must shed load")
        #expect(try h.store.ledgerEntries(G).count == 400 - n, "every posting not refused was written")
        #expect(try h.verify().ok)
    }

    @Test func aWriterThatIsBehindShedsNewPostingsAtOnce() throws {
        // Synchronous on purpose: an async test that sleeps can wait for a cooperative thread
        // far longer than the busy timeout when other tests keep the pool busy.
        let h = try Harness()
        let writer = PostingWriter(store: h.store, waitMax: .milliseconds(20))
        let outcomes = Mutex<[Int: PostingOutcome]>([:])
        let done = DispatchGroup()
        func send(_ i: Int) {
            done.enter()
            writer.enqueue(Submission(partner: G, webhookID: WebhookID("b\(i)")!, event: Fixtures.earn("M1", 1, "B-\(i)"))) { o in
                outcomes.withLock { $0[i] = o }
                done.leave()
            }
        }
        // Another connection holds the coalition's write lock: the writer's first batch waits
        // on it (busy timeout), so the queue behind it ages.
        try whileTheWriterWaitsForTheLock(h, writer, first: { send(0) }) {
            send(1)  // queued
            usleep(60_000)
            for i in 2..<10 { send(i) }  // the oldest queued posting waited 60 ms > 20 ms: shed
            #expect(writer.shedCount == 8)
        }
        done.wait()
        writer.shutdown()
        let o = outcomes.withLock { $0 }
        #expect(o[0]?.httpStatus == 201 && o[1]?.httpStatus == 201)
        for i in 2..<10 {
            guard case .rejected(let p) = o[i] else { Issue.record("posting \(i) was not shed"); continue }
            #expect(p.kind == .unavailable && p.retryAfterSeconds == Limits.overloadRetryAfterSeconds)
        }
        #expect(try h.store.ledgerEntries(G).count == 2, "nothing shed was written")
        // Once the writer caught up, postings are accepted again.
        let writer2 = PostingWriter(store: h.store, waitMax: .milliseconds(20))
        let again = DispatchSemaphore(value: 0)
        let status = Atomic<Int>(0)
        writer2.enqueue(Submission(partner: G, webhookID: WebhookID("b2")!, event: Fixtures.earn("M1", 1, "B-2"))) { o in
            status.store(o.httpStatus, ordering: .relaxed)
            again.signal()
        }
        again.wait()
        #expect(status.load(ordering: .relaxed) == 201)
        writer2.shutdown()
        #expect(try h.verify().ok)
    }

    @Test func underLoadTheWriterGathersABatchButALonePostingNeverWaits() throws {
        let h = try Harness()
        // A long delay, so that what is gathered does not depend on the machine's speed.
        let writer = PostingWriter(store: h.store, gatherMax: .seconds(30))
        let pending = DispatchGroup()
        let statuses = Mutex<[Int]>([])
        func send(_ i: Int) {
            pending.enter()
            writer.enqueue(Submission(partner: G, webhookID: WebhookID("l\(i)")!, event: Fixtures.earn("M\(i)", 1, "L-\(i)"))) { o in
                statuses.withLock { $0.append(o.httpStatus) }
                pending.leave()
            }
        }
        // Idle: a lone posting is decided at once, without waiting to gather.
        send(0)
        pending.wait()
        #expect(writer.gatheredBatches == 0)
        // A batch of several...
        try queueBehindTheLock(h, writer, send, count: 1 + Limits.postingBatchGatherFrom, from: 1)
        pending.wait()
        let before = writer.batchStatistics
        #expect(before.largest == Limits.postingBatchGatherFrom)
        // ...means load: the next posting waits for more, and the batch closes as soon as
        // `postingBatchGatherTo` postings are there (not after the 30 s).
        let gatherStarted = ContinuousClock.now
        send(100)
        let deadline = ContinuousClock.now + .seconds(10)
        while writer.gatheredBatches == 0 && ContinuousClock.now < deadline { usleep(1_000) }
        #expect(writer.queueDepth == 1, "the posting waits to gather")
        for i in 101..<(100 + Limits.postingBatchGatherTo) { send(i) }
        pending.wait()
        let after = writer.batchStatistics
        // Closed by the 48th posting, not by the end of the 30 s window (a wide margin: this
        // checks the rule, not the speed).
        #expect(ContinuousClock.now - gatherStarted < .seconds(20))
        #expect(writer.gatheredBatches == 1)
        #expect(after.batches == before.batches + 1 && after.largest == Limits.postingBatchGatherTo)
        #expect(statuses.withLock { $0 }.allSatisfy { $0 == 201 })
        writer.shutdown()
        #expect(try h.verify().ok)
    }

    @Test func afterAnIdlePauseLongerThanTheDelayAPostingDoesNotWaitToGather() throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store, gatherMax: .milliseconds(200))
        let pending = DispatchGroup()
        func send(_ i: Int) {
            pending.enter()
            writer.enqueue(Submission(partner: G, webhookID: WebhookID("i\(i)")!, event: Fixtures.earn("M\(i)", 1, "I-\(i)"))) { _ in pending.leave() }
        }
        // A batch of several: the writer has seen load.
        try queueBehindTheLock(h, writer, send, count: 1 + Limits.postingBatchGatherFrom, from: 0)
        pending.wait()
        #expect(writer.batchStatistics.largest == Limits.postingBatchGatherFrom)
        // Then idle for twice the delay: the next posting is decided at once.
        usleep(400_000)
        send(99)
        pending.wait()
        #expect(writer.gatheredBatches == 0)
        writer.shutdown()
    }

    @Test func aStopAfterOneLedgerCommitLeavesTheOtherLedgersOfTheBatchUnwritten() throws {
        let crash = CrashAt(.afterLedgerCommit, occurrence: 1)
        let h = try Harness(faults: crash.injector)
        let outcomes = h.store.post([
            Submission(partner: G, webhookID: WebhookID("x1")!, event: Fixtures.earn("M1", 5, "X-1")),
            Submission(partner: F, webhookID: WebhookID("x2")!, event: Fixtures.earn("M2", 5, "X-2")),
            Submission(partner: C, webhookID: WebhookID("x3")!, event: Fixtures.earn("M3", 5, "X-3")),
        ])
        #expect(crash.fired && outcomes.allSatisfy { $0.httpStatus == 503 })
        // As a process killed there: one ledger has its entry, the other two not yet.
        let written = try [G, F, C].map { try h.store.ledgerEntries($0).count }
        #expect(written.sorted() == [0, 0, 1])
        try h.reopen()
        #expect(try [G, F, C].map { try h.store.ledgerEntries($0).count } == [1, 1, 1])
        try requireVerified(h, "after a stop after one ledger commit")
    }

    @Test func aReplayIsAnsweredOnlyOnceItsEntryIsInTheLedger() throws {
        // Two stores on one data directory, as `serve` and `clearhouse post` are: the first
        // decides an earn and stops before its ledger commit; the second gets the retry.
        let h = try Harness(faults: CrashAt(.afterJournalCommit, occurrence: 1).injector)
        let other = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        let earn = Fixtures.earn("M1", 10, "R-1")
        #expect(h.post(F, "w1", earn).httpStatus == 503)
        #expect(try other.ledgerEntries(F).isEmpty, "decided in the journal, not yet in the ledger")
        let retry = other.post([Submission(partner: F, webhookID: WebhookID("w1")!, event: earn)])[0]
        guard case .replayed(let e) = retry else { Issue.record("retry: \(retry)"); return }
        #expect(try other.ledgerEntries(F) == [e], "the replay's entry is in the ledger before the 200")
        try other.close()
    }

    @Test func aLedgerThatCannotBeWrittenHoldsBackOnlyItsPartnerUntilItCatchesUp() async throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store)
        #expect(await writer.post(Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.earn("M1", 10, "F-1"))).httpStatus == 201)
        // The fuel ledger now refuses every insert (as a full or failing disk would).
        let ledger = try DatabaseQueue(path: h.store.ledgerURL(F).path)
        try await ledger.write { try $0.execute(sql: "CREATE TRIGGER broken BEFORE INSERT ON entry BEGIN SELECT RAISE(ABORT, 'disk trouble'); END") }
        async let fuel = writer.post(Submission(partner: F, webhookID: WebhookID("f2")!, event: Fixtures.earn("M1", 20, "F-2")))
        async let grocery = writer.post(Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M2", 5, "G-1")))
        let (f2, g1) = await (fuel, grocery)
        guard case .rejected(let p) = f2 else { Issue.record("f2 acknowledged without its ledger: \(f2)"); return }
        #expect(p.kind == .unavailable && p.retryAfterSeconds != nil)
        #expect(g1.httpStatus == 201, "another partner's ledger is not held back")
        // While the ledger still fails, the retry is not acknowledged either, and nothing new of
        // that partner is written: f3 is refused before it is decided, so its 40 points cannot
        // be spent elsewhere (M1 holds f1's 10 and the in-flight f2's 20, not 70).
        #expect(await writer.post(Submission(partner: F, webhookID: WebhookID("f2")!, event: Fixtures.earn("M1", 20, "F-2"))).httpStatus == 503)
        #expect(await writer.post(Submission(partner: F, webhookID: WebhookID("f3")!, event: Fixtures.earn("M1", 40, "F-3"))).httpStatus == 503)
        #expect(await writer.post(Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.redeem("M1", 70, "G-2"))).httpStatus == 422)
        #expect(try h.balance("M1") == 30)
        #expect(try h.store.ledgerEntries(F).map(\.webhookID.rawValue) == ["f1"])
        // Repaired: the next batch copies the missing entry, and the retry gets the original result.
        try await ledger.write { try $0.execute(sql: "DROP TRIGGER broken") }
        let retry = await writer.post(Submission(partner: F, webhookID: WebhookID("f2")!, event: Fixtures.earn("M1", 20, "F-2")))
        guard case .replayed(let e) = retry else { Issue.record("retry after repair: \(retry)"); return }
        #expect(e.sequence == 2 && e.memberBalance == Points(30))
        #expect(await writer.post(Submission(partner: F, webhookID: WebhookID("f3")!, event: Fixtures.earn("M1", 40, "F-3"))).httpStatus == 201)
        #expect(try h.store.ledgerEntries(F).map(\.webhookID.rawValue) == ["f1", "f2", "f3"])
        writer.shutdown()
        try ledger.close()
        #expect(try h.verify().ok)
    }

    @Test func everyWriterConnectionFsyncsEachCommit() throws {
        // GRDB's DatabasePool turns WAL on with synchronous = NORMAL (no fsync at commit);
        // the store must set FULL on each writer connection, the ledgers' included.
        let h = try Harness()
        #expect(h.post(G, "s1", Fixtures.earn("M1", 10, "S1")).httpStatus == 201)
        #expect(h.post(F, "s2", Fixtures.earn("M1", 10, "S2")).httpStatus == 201)
        let levels = try h.store.synchronousLevels()
        #expect(levels.count == 3, "the coalition and two ledgers: \(levels)")
        #expect(levels.values.allSatisfy { $0 == 2 }, "synchronous must be FULL (2) everywhere: \(levels)")
    }

    @Test func writerRefusesAfterShutdown() async throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store)
        writer.shutdown()
        let o = await writer.post(Submission(partner: G, webhookID: WebhookID("w")!, event: Fixtures.earn("M1", 1, "R")))
        #expect(o.httpStatus == 503)
    }
}

@Suite struct PoisonedPostingTests {
    /// A posting that fails in storage (here: a trigger planted in the coalition database)
    /// costs only itself: the batch is decided again posting by posting.
    @Test func oneStorageFailureDoesNotSinkItsBatch() throws {
        let h = try Harness()
        _ = h.post(G, "g0", Fixtures.earn("M1", 5, "G-0"))  // creates the schema and files
        let raw = try GRDB.DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        try raw.write { db in
            try db.execute(sql: "CREATE TRIGGER poison BEFORE INSERT ON lot WHEN NEW.member = 'POISON' BEGIN SELECT RAISE(ABORT, 'poison'); END")
        }
        try raw.close()
        let outcomes = h.store.post([
            Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 10, "G-1")),
            Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.earn("POISON", 10, "F-1")),
            Submission(partner: C, webhookID: WebhookID("c1")!, event: Fixtures.redeem("M1", 15, "C-1")),
        ])
        #expect(outcomes.map(\.httpStatus) == [201, 503, 201])
        #expect(try h.store.ledgerEntries(F).isEmpty, "nothing of the failed posting was written")
        #expect(try h.balance("M1") == 0)
        #expect(try h.verify().ok)
    }
}

@Suite struct ExpiryTermsTests {
    /// Changing points_expire_after_days applies to lots earned from then on; verify checks
    /// every lot against the terms in force when it was earned, so the change is no breach.
    @Test func changingTheExpiryTermsKeepsVerifyGreen() throws {
        let h = try Harness(expireAfterDays: 1095)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        try h.store.close()
        let shorter = Fixtures.configuration(expireAfterDays: 1)
        let store = try Store(dataDirectory: h.dir.url, configuration: shorter, clock: h.clock)
        defer { try? store.close() }
        _ = store.post([Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.earn("M1", 10, "G-2"))])
        h.clock.set(Instant(rfc3339: "2026-11-23T10:00:00Z")!)
        #expect(try store.balance(of: MemberID("M1")!).value == 100, "the second lot expired after 1 day, the first did not")
        let r = try Verifier.verify(dataDirectory: h.dir.url)
        #expect(r.ok, "\(r.breaches)")
    }
}

/// Runs `body` while another connection holds the coalition's write lock and the writer waits
/// for it with the batch `first` sent (so whatever `body` sends queues up behind), then lets go.
func whileTheWriterWaitsForTheLock(_ h: Harness, _ writer: PostingWriter, first: () -> Void, _ body: () throws -> Void) throws {
    var unsafe = Configuration()
    unsafe.allowsUnsafeTransactions = true  // the lock is held across two accesses
    let blocker = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path, configuration: unsafe)
    try blocker.inDatabase { try $0.execute(sql: "BEGIN IMMEDIATE") }
    first()
    // Taken by the writer, which waits for the lock; bounded, so a regression fails, not hangs.
    var waited = 0
    while writer.queueDepth > 0 && waited < 30_000 {
        usleep(1_000)
        waited += 1
    }
    #expect(writer.queueDepth == 0, "the writer did not take the postings within 30 s")
    try body()
    try blocker.inDatabase { try $0.execute(sql: "ROLLBACK") }
}

/// Sends `count` postings numbered from `from` so that the writer decides the first alone and
/// the others as one batch.
func queueBehindTheLock(_ h: Harness, _ writer: PostingWriter, _ send: (Int) -> Void, count: Int, from: Int) throws {
    try whileTheWriterWaitsForTheLock(h, writer, first: { send(from) }) {
        for i in (from + 1)..<(from + count) { send(i) }
    }
}

/// The all-time flows are written once per batch, from what its postings changed: a
/// redemption and its reversal in one batch, a return in a later batch, and a posting that
/// fails in storage (whose flow change must not be written) all leave the flow table equal to
/// the journal's lot moves.
@Suite struct FlowsPerBatchTests {
    func flows(_ h: Harness) throws -> [String] {
        let raw = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        defer { try? raw.close() }
        return try raw.read { try String.fetchAll($0, sql: "SELECT issuer || '>' || redeemer || '=' || points FROM flow ORDER BY issuer, redeemer") }
    }

    func submission(_ p: PartnerID, _ id: String, _ e: Event) -> Submission {
        Submission(partner: p, webhookID: WebhookID(id)!, event: e)
    }

    @Test func aBatchWritesTheNetOfItsTakesAndReturns() throws {
        let h = try Harness()
        let first = h.store.post([
            submission(G, "g1", Fixtures.earn("M1", 100, "G-1")),
            submission(F, "f1", Fixtures.earn("M1", 50, "F-1")),
            submission(C, "c1", Fixtures.redeem("M1", 120, "C-1")),                        // 100 of G, 20 of F
            submission(C, "c2", Fixtures.reverseRedemption("M1", 30, "C-2", of: "C-1")),   // 20 back to F, then 10 to G
            submission(F, "f2", Fixtures.redeem("M1", 10, "F-2")),                         // 10 of G (back from C-2)
        ])
        #expect(first.map(slug) == ["created", "created", "created", "created", "created"])
        #expect(try flows(h) == ["grocer>cinema=90", "grocer>fuel=10"], "fuel>cinema netted to 0 in the batch: no row")
        // A later batch returns the rest of C-1: the flow goes to 0 and stays.
        let second = h.store.post([submission(C, "c3", Fixtures.reverseRedemption("M1", 90, "C-3", of: "C-1"))])
        #expect(second.map(slug) == ["created"])
        #expect(try flows(h) == ["grocer>cinema=0", "grocer>fuel=10"])
        #expect(try h.verify().ok)
    }

    /// A flow that cannot take a posting's change (here a flow damaged below what a return
    /// takes back) fails the batch's single write at its end; decided again posting by
    /// posting, each posting writes its flow changes in its own savepoint, so only that
    /// posting fails.
    @Test func aFlowThatCannotTakeAReturnFailsThatPostingAlone() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 50, "C-1"))
        let raw = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        try raw.write { try $0.execute(sql: "UPDATE flow SET points = 10 WHERE issuer = 'grocer' AND redeemer = 'cinema'") }
        try raw.close()
        let outcomes = h.store.post([
            submission(G, "g2", Fixtures.earn("M2", 40, "G-2")),
            submission(C, "c2", Fixtures.reverseRedemption("M1", 30, "C-2", of: "C-1")),
            submission(F, "f1", Fixtures.earn("M3", 60, "F-1")),
        ])
        #expect(outcomes.map(\.httpStatus) == [201, 503, 201])
        #expect(try h.balance("M2") == 40 && h.balance("M3") == 60 && h.balance("M1") == 50)
        #expect(try flows(h) == ["grocer>cinema=10"])
    }

    @Test func aPostingThatFailsInStorageLeavesNoFlowChange() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(G, "g2", Fixtures.earn("M2", 100, "G-2"))
        let raw = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        try raw.write { db in
            try db.execute(sql: "CREATE TRIGGER poison BEFORE INSERT ON lot_take WHEN NEW.points = 13 BEGIN SELECT RAISE(ABORT, 'poison'); END")
        }
        try raw.close()
        let outcomes = h.store.post([
            submission(C, "c1", Fixtures.redeem("M1", 20, "C-1")),
            submission(F, "f1", Fixtures.redeem("M2", 13, "F-1")),   // fails in storage: 503, nothing of it written
            submission(F, "f2", Fixtures.redeem("M2", 7, "F-2")),
        ])
        #expect(outcomes.map(\.httpStatus) == [201, 503, 201])
        #expect(try flows(h) == ["grocer>cinema=20", "grocer>fuel=7"])
        #expect(try h.verify().ok)
    }
}

/// The messages a test's logger was given.
final class LogLines: Sendable {
    private let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    func count(of prefix: String) -> Int { lines.withLock { $0.filter { $0.hasPrefix(prefix) }.count } }

    struct Handler: LogHandler {
        let lines: LogLines
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) { lines.lines.withLock { $0.append("\(event.message)") } }
    }
}
