import ClearhouseTestSupport
import ClearingDomain
import ClearingNotices
import ClearingStore
import Foundation
import PartnerTransport
import StandardWebhooks
import Synchronization
import Testing

let G = Fixtures.grocer, F = Fixtures.fuel, C = Fixtures.cinema

/// A partner endpoint in memory: answers from a script, records every request.
final class FakeTransport: OutboundTransport {
    let answers: Mutex<[String: [OutboundResponse]]>  // by URL; the last answer repeats
    let seen = Mutex<[OutboundRequest]>([])

    init(_ answers: [String: [OutboundResponse]] = [:]) { self.answers = Mutex(answers) }

    static func status(_ s: Int, retryAfter: Int64? = nil) -> OutboundResponse {
        OutboundResponse(result: .success(s), retryAfterSeconds: retryAfter, latencyMilliseconds: 3, httpVersion: "1.1")
    }

    func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse] {
        seen.withLock { $0 += requests }
        return requests.map { r in
            answers.withLock { a in
                guard var list = a[r.url], !list.isEmpty else { return FakeTransport.status(200) }
                let first = list.count > 1 ? list.removeFirst() : list[0]
                a[r.url] = list
                return first
            }
        }
    }

    var requests: [OutboundRequest] { seen.withLock { $0 } }
}

/// Answers 200 and cancels the task that is delivering, as the end of `serve`'s grace period
/// would, while its first batch is in flight.
final class CancellingTransport: OutboundTransport {
    let seen = Mutex(0)

    func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse] {
        seen.withLock { $0 += requests.count }
        withUnsafeCurrentTask { $0?.cancel() }
        return requests.map { _ in FakeTransport.status(200) }
    }
}

func header(_ r: OutboundRequest, _ name: String) -> String? { r.headers.first { $0.name == name }?.value }

/// A store with a settled run, and a dispatcher on a manual clock with no jitter.
final class NoticeHarness {
    let dir = TemporaryDirectory("clearhouse-notices")
    let clock = ManualClock(Instant(rfc3339: "2026-11-23T09:00:00Z")!)
    let configuration = Fixtures.configuration()
    var store: Store!

    init() throws {
        store = try Store(dataDirectory: dir.url, configuration: configuration, clock: clock)
    }

    deinit {
        try? store?.close()
        dir.remove()
    }

    func post(_ partner: PartnerID, _ webhookID: String, _ event: Event) {
        _ = store.post([Submission(partner: partner, webhookID: WebhookID(webhookID)!, event: event)])
    }

    /// grocer issues, cinema redeems, fuel earns and reverses it all (activity, zero figures).
    func settleADay() throws -> SettlementRun {
        post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
        post(C, "c1", Fixtures.redeem("M1", 400, "C-1"))
        post(F, "f1", Fixtures.earn("M2", 50, "F-1"))
        post(F, "f2", Fixtures.reverseEarn("M2", 50, "F-2", of: "F-1"))
        clock.advance(milliseconds: 60_000)
        return try store.settle()
    }

    func dispatcher(_ transport: any OutboundTransport, options: NoticeDeliveryOptions = .init(), jitter: Int64 = 0) -> NoticeDispatcher {
        NoticeDispatcher(store: store, transport: transport, clock: clock, options: options, jitterPPM: { jitter })
    }

    func reopen() throws {
        try store.close()
        store = try Store(dataDirectory: dir.url, configuration: configuration, clock: clock)
    }

    func notice(_ id: String) throws -> (NoticeRecord, [NoticeAttemptRecord]) { try #require(try store.notice(id)) }

    /// Waits (up to 10 s) until every one of these notices is delivered; false if they are not.
    func delivered(_ ids: String...) async throws -> Bool {
        for _ in 0..<1_000 {
            if try ids.allSatisfy({ try store.notice($0)?.0.state == .delivered }) { return true }
            try await Task.sleep(for: .milliseconds(10))
        }
        return false
    }
}

@Suite struct OutboxTests {
    @Test func aRunCommitsWithOneNoticePerPartnerWithActivity() throws {
        let h = try NoticeHarness()
        let run = try h.settleADay()
        let notices = try h.store.notices()
        #expect(notices.map(\.id) == ["R000001:cinema", "R000001:fuel", "R000001:grocer"])
        #expect(notices.allSatisfy { $0.state == .pending && $0.nextAttemptAt == h.clock.now() && $0.attempts == 0 })
        // fuel's earn and reversal cancel out: it still had activity, so it hears about the run.
        let fuel = try #require(notices.first { $0.partner == F })
        let body = try JSONSerialization.jsonObject(with: Data(fuel.body)) as! [String: Any]
        #expect(body["type"] as? String == "settlement.notice")
        let data = body["data"] as! [String: Any]
        #expect(data["run"] as? String == run.id && data["net_minor"] as? Int == 0 && data["partner"] as? String == "fuel")
        #expect(data["statement"] as? String == "/v1/partners/fuel/statements/R000001.csv")
        let cinema = try JSONSerialization.jsonObject(with: Data(notices[0].body)) as! [String: Any]
        let cd = cinema["data"] as! [String: Any]
        #expect(cd["redeemed_points"] as? Int == 400 && cd["receivable_minor"] as? Int == 440 && cd["currency"] as? String == "EUR")
        #expect(try h.store.noticeCounts() == [.pending: 3, .delivered: 0, .dead: 0])
        // An empty run sends nothing.
        h.clock.advance(milliseconds: 1000)
        _ = try h.store.settle()
        #expect(try h.store.notices().count == 3)
        #expect(try Verifier.verify(dataDirectory: h.dir.url).ok)
    }

    @Test func aRunNeverExistsWithoutItsNotices() throws {
        let h = try NoticeHarness()
        h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
        h.clock.advance(milliseconds: 1000)
        // Make the outbox refuse a row: the whole run must roll back with it.
        let db = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(db, "CREATE TRIGGER no_outbox BEFORE INSERT ON notice BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;").status == 0)
        #expect(throws: (any Error).self) { try h.store.settle() }
        #expect(try h.store.runs().isEmpty)
        #expect(try h.store.notices().isEmpty)
        #expect(try SQLiteTool.run(db, "DROP TRIGGER no_outbox;").status == 0)
        let run = try h.store.settle()
        #expect(run.id == "R000001" && run.entryCount == 1)
        #expect(try h.store.notices().map(\.id) == ["R000001:grocer"])
    }

    @Test func verifyChecksTheStatementRangesOfEachRun() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        #expect(try Verifier.verify(dataDirectory: h.dir.url).ok)
        let db = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(db, """
            DROP TRIGGER run_partner_immutable_u;
            UPDATE run_partner SET last_sequence = last_sequence + 1 WHERE partner = 'fuel';
            """).status == 0)
        let report = try Verifier.verify(dataDirectory: h.dir.url)
        #expect(report.breaches.contains("run R000001: partner fuel's statement range differs from its entries in the run"), "\(report.breaches)")
    }

    @Test func noticeContentCannotBeChangedOrDeleted() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let db = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(db, "UPDATE notice SET body = x'00' WHERE id = 'R000001:grocer';").status != 0)
        #expect(try SQLiteTool.run(db, "DELETE FROM notice;").status != 0)
        #expect(try Verifier.verify(dataDirectory: h.dir.url).ok)
        // Someone with file access drops the guard and edits a notice: verify says so.
        #expect(try SQLiteTool.run(db, """
            DROP TRIGGER notice_content_immutable;
            UPDATE notice SET body = CAST(replace(body, '"net_minor":440', '"net_minor":99440') AS BLOB) WHERE id = 'R000001:cinema';
            DROP TRIGGER notice_never_deleted;
            DELETE FROM notice_attempt; DELETE FROM notice WHERE id = 'R000001:grocer';
            """).status == 0)
        let report = try Verifier.verify(dataDirectory: h.dir.url)
        #expect(report.breaches.contains("notice R000001:cinema: net_minor differs from the run's figures"), "\(report.breaches)")
        #expect(report.breaches.contains("run 1: partner grocer has no settlement notice"), "\(report.breaches)")
    }

    /// What a partner pays by beyond the figures (the direction, the prices, the currency) is
    /// checked too: the body must be byte for byte the notice its run makes.
    @Test(arguments: [
        ("'partner pays'", "'coalition pays'"), ("'\"EUR\"'", "'\"USD\"'"), ("'\"issue_price_per_1000\":1000'", "'\"issue_price_per_1000\":1001'"),
    ])
    func aNoticeWhoseWordsOrPricesChangedIsABreach(find: String, replace: String) throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let db = h.dir.url.appendingPathComponent("coalition.sqlite")
        let body = try SQLiteTool.run(db, "SELECT CAST(body AS TEXT) FROM notice WHERE id = 'R000001:grocer'").stdout
        #expect(body.contains(String(find.dropFirst().dropLast())), "\(body)")
        #expect(try SQLiteTool.run(db, """
            DROP TRIGGER notice_content_immutable;
            UPDATE notice SET body = CAST(replace(CAST(body AS TEXT), \(find), \(replace)) AS BLOB) WHERE id = 'R000001:grocer';
            """).status == 0)
        let report = try Verifier.verify(dataDirectory: h.dir.url)
        #expect(report.breaches == ["notice R000001:grocer: its body is not the notice its run's figures, prices and currency make"], "\(report.breaches)")
    }
}

@Suite struct DispatcherTests {
    @Test func noticesAreSignedWithTheRunAndPartnerAsWebhookID() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = FakeTransport()
        let pass = try await h.dispatcher(transport).deliverDue()
        #expect(pass.attempted == 3 && pass.delivered == 3)
        #expect(transport.requests.count == 3)
        for r in transport.requests {
            let id = try #require(header(r, "webhook-id"))
            let partner = PartnerID(String(id.split(separator: ":")[1]))!
            #expect(id.hasPrefix("R000001:"))
            #expect(r.url == h.configuration.partners[partner]!.noticeURL)
            #expect(header(r, "webhook-timestamp") == String(h.clock.now().millisecondsSinceEpoch / 1000))
            #expect(WebhookSignature.verifies(r, secret: h.configuration.partners[partner]!.noticeSecret))
            #expect(!WebhookSignature.verifies(r, secret: h.configuration.partners[partner == G ? F : G]!.noticeSecret))
        }
        #expect(try h.store.noticeCounts() == [.pending: 0, .delivered: 3, .dead: 0])
        // Delivered notices are not sent again.
        #expect(try await h.dispatcher(transport).deliverDue().attempted == 0)
    }

    /// A stopping sender starts no new batch: the batch in flight is recorded, the rest stays
    /// due in the outbox for the next start.
    @Test func aCancelledPassStopsAfterTheBatchInFlight() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = CancellingTransport()
        var options = NoticeDeliveryOptions()
        options.inFlightMax = 1
        let dispatcher = h.dispatcher(transport, options: options)
        let pass = try await Task { try await dispatcher.deliverDue() }.value
        #expect(pass.attempted == 1 && pass.delivered == 1)
        #expect(transport.seen.withLock { $0 } == 1)
        #expect(try h.store.noticeCounts() == [.pending: 2, .delivered: 1, .dead: 0])
        // The next start sends the rest.
        #expect(try await h.dispatcher(FakeTransport()).deliverDue().delivered == 2)
    }

    @Test func failuresBackOffOnTheScheduleUntilADeadLetterThenTheOperatorRetries() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let grocerURL = h.configuration.partners[G]!.noticeURL
        let transport = FakeTransport([grocerURL: [FakeTransport.status(500)]])
        let d = h.dispatcher(transport)
        var bodies = Set<[UInt8]>()
        for attempt in 1...10 {
            let pass = try await d.deliverDue()
            #expect(pass.attempted == (attempt == 1 ? 3 : 1), "attempt \(attempt)")
            let (n, attempts) = try h.notice("R000001:grocer")
            #expect(attempts.count == attempt)
            #expect(attempts.last?.httpStatus == 500)
            if attempt < 10 {
                let delay = Limits.noticeRetryDelaysSeconds[attempt] * 1000
                #expect(n.state == .pending)
                #expect(n.nextAttemptAt == Instant(millisecondsSinceEpoch: h.clock.now().millisecondsSinceEpoch + delay))
                // Not a moment early.
                h.clock.advance(milliseconds: delay - 1)
                #expect(try await d.deliverDue().attempted == 0)
                h.clock.advance(milliseconds: 1)
            } else {
                #expect(n.state == .dead && n.nextAttemptAt == nil && attempts.last?.outcome == .dead)
            }
        }
        // Every attempt at grocer's URL carries the same webhook-id and the same body.
        let toGrocer = transport.requests.filter { $0.url == grocerURL }
        #expect(toGrocer.count == Limits.noticeAttemptsMax, "one request per attempt")
        for r in toGrocer {
            bodies.insert(r.body)
            #expect(header(r, "webhook-id") == "R000001:grocer")
        }
        #expect(bodies.count == 1, "the same body on every attempt")
        #expect(try h.store.notices(state: .dead).map(\.id) == ["R000001:grocer"])
        // Nothing more happens to a dead letter, however long we wait.
        h.clock.advance(milliseconds: 30 * 86_400_000)
        #expect(try await d.deliverDue().attempted == 0)
        // The operator retries it: a new round, sent at once.
        transport.answers.withLock { $0[grocerURL] = [FakeTransport.status(204)] }
        #expect(throws: NoticeError.self) { try h.store.retryDeadNotice("R000001:cinema", now: h.clock.now()) }
        #expect(throws: NoticeError.self) { try h.store.retryDeadNotice("R000009:nobody", now: h.clock.now()) }
        try h.store.retryDeadNotice("R000001:grocer", now: h.clock.now())
        #expect(try await d.deliverDue(only: "R000001:grocer").delivered == 1)
        let (n, attempts) = try h.notice("R000001:grocer")
        #expect(n.state == .delivered && n.attempts == 11 && n.roundAttempts == 1 && attempts.count == 11)
    }

    /// `410 Gone` is a failure like any other (CONTRACT §7: failures are retried, and only the
    /// last try makes a dead letter); `retry-after` on 429 and 503 is honoured.
    @Test func goneIsRetriedAndRetryAfterIsHonoured() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = FakeTransport([
            h.configuration.partners[G]!.noticeURL: [FakeTransport.status(410)],
            h.configuration.partners[C]!.noticeURL: [FakeTransport.status(503, retryAfter: 3600), FakeTransport.status(200)],
            h.configuration.partners[F]!.noticeURL: [FakeTransport.status(429, retryAfter: 2), FakeTransport.status(200)],
        ])
        let d = h.dispatcher(transport)
        let start = h.clock.now().millisecondsSinceEpoch
        try await d.deliverDue()
        #expect(try h.notice("R000001:grocer").0.state == .pending)
        #expect(try h.notice("R000001:grocer").0.nextAttemptAt?.millisecondsSinceEpoch == start + 5_000)
        #expect(try h.notice("R000001:cinema").0.nextAttemptAt?.millisecondsSinceEpoch == start + 3_600_000)
        // retry-after shorter than the schedule: the schedule wins.
        #expect(try h.notice("R000001:fuel").0.nextAttemptAt?.millisecondsSinceEpoch == start + 5_000)
        h.clock.advance(milliseconds: 3_600_000)
        #expect(try await d.deliverDue().delivered == 2)
        #expect(try h.store.noticeCounts() == [.pending: 1, .delivered: 2, .dead: 0])
        #expect(try h.notice("R000001:grocer").1.map(\.httpStatus) == [410, 410], "grocer's second attempt, 410 again")
    }

    @Test func jitterSpreadsRetries() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = FakeTransport([h.configuration.partners[G]!.noticeURL: [FakeTransport.status(500)]])
        try await h.dispatcher(transport, jitter: 100_000).deliverDue()
        #expect(try h.notice("R000001:grocer").0.nextAttemptAt?.millisecondsSinceEpoch == h.clock.now().millisecondsSinceEpoch + 5_500)
    }

    @Test func theScheduleSurvivesARestart() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = FakeTransport([h.configuration.partners[C]!.noticeURL: [FakeTransport.status(500), FakeTransport.status(200)]])
        try await h.dispatcher(transport).deliverDue()
        let due = try #require(try h.notice("R000001:cinema").0.nextAttemptAt)
        try h.reopen()
        #expect(try await h.dispatcher(transport).deliverDue().attempted == 0, "not before it is due")
        h.clock.set(due)
        #expect(try await h.dispatcher(transport).deliverDue().delivered == 1)
        #expect(try h.notice("R000001:cinema").1.map(\.outcome) == [.retry, .delivered])
    }

    @Test func aNoticeLeftInFlightByADeadProcessIsSentAgainAtOnce() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        // A process that has exited: its pid is free.
        let gone = Process()
        gone.executableURL = URL(fileURLWithPath: "/bin/true")
        try gone.run()
        gone.waitUntilExit()
        let claimed = try h.store.claimDueNotices(
            clock: h.clock, limit: 8, owner: gone.processIdentifier, leaseMilliseconds: 60_000,
            ownerAlive: { _ in false })
        #expect(claimed.count == 3)
        // The "killed" sender never recorded an answer; a new one takes over at once.
        let transport = FakeTransport()
        #expect(try await h.dispatcher(transport).deliverDue().delivered == 3)
        let (n, attempts) = try h.notice("R000001:grocer")
        #expect(n.state == .delivered && attempts.map(\.outcome) == [.interrupted, .delivered])
        #expect(transport.requests.compactMap { header($0, "webhook-id") }.sorted() == ["R000001:cinema", "R000001:fuel", "R000001:grocer"])
    }

    @Test func aLiveSendersLeaseIsRespectedUntilItRunsOut() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        _ = try h.store.claimDueNotices(clock: h.clock, limit: 1, owner: getppid(), leaseMilliseconds: 40_000, ownerAlive: { _ in true })
        let transport = FakeTransport()
        #expect(try await h.dispatcher(transport).deliverDue().attempted == 2, "the leased one is left alone")
        h.clock.advance(milliseconds: 40_001)
        #expect(try await h.dispatcher(transport).deliverDue().attempted == 1, "a lease that ran out is void")
    }

    /// One notice at a time per partner across processes too: while another live sender (a
    /// `notices send` beside `serve`) holds grocer's first notice, grocer's next one waits, is
    /// not due before that lease runs out, and the other partners' notices go.
    @Test func anotherSendersLeaseHoldsBackThePartnersOtherNotices() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        h.post(G, "g2", Fixtures.earn("M1", 10, "G-2"))
        h.clock.advance(milliseconds: 60_000)
        #expect(try h.store.settle().id == "R000002")
        let leaseEnd = h.clock.now().millisecondsSinceEpoch + 40_000
        let other = try h.store.claimDueNotices(
            clock: h.clock, limit: 1, owner: getppid(), leaseMilliseconds: 40_000, ownerAlive: { _ in true }, only: "R000001:grocer")
        #expect(other.map(\.id) == ["R000001:grocer"])
        let transport = FakeTransport()
        _ = try await h.dispatcher(transport).deliverDue()
        #expect(transport.requests.compactMap { header($0, "webhook-id") }.sorted() == ["R000001:cinema", "R000001:fuel"])
        #expect(try h.notice("R000002:grocer").1.isEmpty, "not attempted while the other sender holds grocer")
        #expect(try h.store.nextNoticeDue()?.millisecondsSinceEpoch == leaseEnd, "grocer's next notice is not due before the lease ends")
        h.clock.advance(milliseconds: 40_001)
        _ = try await h.dispatcher(transport).deliverDue()
        #expect(try h.notice("R000002:grocer").0.state == .delivered)
        #expect(try h.notice("R000001:grocer").0.state == .delivered)
    }

    /// Another sender holding a partner with a long backlog hides no other partner's notice:
    /// the held partner is left out of the claim's query, not filtered after its limit.
    @Test func aHeldPartnersBacklogHidesNoOtherPartnersNotice() async throws {
        let h = try NoticeHarness()
        for i in 1...(Limits.noticeClaimReadFactor + Limits.noticeClaimReadMargin + 5) {
            h.post(G, "g\(i)", Fixtures.earn("M1", 10, "G-\(i)"))
            h.clock.advance(milliseconds: 60_000)
            _ = try h.store.settle()
        }
        h.post(C, "c1", Fixtures.earn("M2", 10, "C-1"))
        h.clock.advance(milliseconds: 60_000)
        let last = try h.store.settle()
        _ = try h.store.claimDueNotices(
            clock: h.clock, limit: 1, owner: getppid(), leaseMilliseconds: 40_000, ownerAlive: { _ in true }, only: "R000001:grocer")
        let transport = FakeTransport()
        _ = try await h.dispatcher(transport).deliverDue()
        #expect(transport.requests.compactMap { header($0, "webhook-id") } == ["\(last.id):cinema"])
    }

    /// A notice whose run row was removed (tampering, which `verify` reports) is still listed
    /// and shown, under its run's number: the operator must see every notice.
    @Test func aNoticeWithoutItsRunIsStillListed() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        try h.store.close()
        let edit = try SQLiteTool.run(
            h.dir.url.appendingPathComponent("coalition.sqlite"), "PRAGMA foreign_keys = OFF; DROP TRIGGER run_immutable_d; DELETE FROM run")
        #expect(edit.status == 0, "\(edit.stderr)")
        try h.reopen()
        let listed = try h.store.notices()
        #expect(listed.count == 3 && listed.allSatisfy { $0.run == "R000001" }, "\(listed.map(\.id))")
        #expect(try h.store.notice("R000001:grocer") != nil)
    }

    @Test func aSenderWhoseLeaseRanOutCannotOverwriteTheNextSendersClaim() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        // A slow sender (alive) claims every notice with a short lease...
        let slow = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getppid(), leaseMilliseconds: 1_000, ownerAlive: { _ in true })
        let grocer = try #require(slow.first { $0.id == "R000001:grocer" })
        // ...which runs out; another sender takes over and gets a 500 from grocer.
        h.clock.advance(milliseconds: 1_001)
        let transport = FakeTransport([h.configuration.partners[G]!.noticeURL: [FakeTransport.status(500)]])
        #expect(try await h.dispatcher(transport).deliverDue().retrying == 1)
        let pending = try h.notice("R000001:grocer").0
        // The slow sender's answer arrives at last: its attempt is recorded, the notice is not touched.
        try h.store.finishNoticeAttempt(
            grocer, finishedAt: h.clock.now(), latencyMilliseconds: 1_500, httpStatus: 410, error: nil,
            decision: .dead(reason: "no success after 10 attempts"))
        let (after, attempts) = try h.notice("R000001:grocer")
        #expect(after == pending, "still the second sender's pending retry")
        #expect(attempts.map(\.outcome) == [.dead, .retry])
        #expect(attempts.first?.httpStatus == 410)
    }

    /// A lease runs on the host's boot clock: the wall clock stepping forward by an hour while
    /// another live sender's attempts are in flight does not let a second sender take them (it
    /// did: both sent the same notice at once).
    @Test func aStepOfTheWallClockDoesNotEndALease() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let taken = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getppid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true })
        #expect(taken.count == 3)
        h.clock.step(milliseconds: 3_600_000)
        #expect(try !h.store.claimableNoticeExists(clock: h.clock, owner: getpid(), ownerAlive: { _ in true }))
        #expect(try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getpid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true }).isEmpty)
        // Once the lease's 45 s have passed (the first sender hung), another sender takes over.
        h.clock.advance(milliseconds: 45_001)
        #expect(try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getpid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true }).count == 3)
    }

    /// A lease holds while either clock says so: a process whose boot clock is faked or
    /// offset (libfaketime fakes CLOCK_BOOTTIME, not the boot id) still sees a live sender's
    /// lease by the wall clock (it took it and sent the notice a second time, at once).
    @Test func aLeaseHoldsForAProcessWhoseBootClockReadsOtherwise() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        _ = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getppid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true })
        h.clock.stepLeaseClock(milliseconds: 1_700_000_000_000)
        #expect(try !h.store.claimableNoticeExists(clock: h.clock, owner: getpid(), ownerAlive: { _ in true }))
        h.clock.step(milliseconds: 45_001)
        #expect(try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getpid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true }).count == 3,
                "run out by both clocks")
    }

    /// A lease of another boot, or one an earlier build took (no boot), ends by the wall clock.
    @Test func aLeaseOfAnotherBootOrWithoutOneEndsByTheWallClock() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        _ = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getppid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true })
        try h.store.close()
        let file = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(file, "UPDATE notice SET lease_boot = 'an-earlier-boot' WHERE partner = 'grocer'").status == 0)
        #expect(try SQLiteTool.run(file, "UPDATE notice SET lease_boot = NULL, lease_until_boot_ms = NULL WHERE partner <> 'grocer'").status == 0)
        try h.reopen()
        let claim = { try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getpid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true }) }
        #expect(try claim().isEmpty, "all still held by the wall clock")
        h.clock.step(milliseconds: 45_001)
        #expect(try claim().count == 3)
    }

    @Test func aLeasedNoticeIsNotDueBeforeItsLeaseRunsOut() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let now = h.clock.now().millisecondsSinceEpoch
        _ = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getppid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true })
        #expect(try h.store.nextNoticeDue()?.millisecondsSinceEpoch == now + 45_000)
    }

    @Test func aPartnerRemovedFromTheConfigurationIsRetriedNotLost() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        var smaller = h.configuration
        smaller.partners[G] = nil
        try h.store.close()
        h.store = try Store(dataDirectory: h.dir.url, configuration: smaller, clock: h.clock)
        let pass = try await h.dispatcher(FakeTransport()).deliverDue()
        #expect(pass.delivered == 2 && pass.retrying == 1)
        #expect(try h.notice("R000001:grocer").1.last?.error?.contains("not in the configuration") == true)
    }
}

/// Holds the requests to one URL until released (a partner that answers slowly); answers
/// every other request with 200 at once.
final class SlowPartnerTransport: OutboundTransport {
    let slowURL: String
    let released = Mutex(false)
    let seen = Mutex<[String]>([])

    init(slowURL: String) { self.slowURL = slowURL }

    /// Requests to the slow URL in flight now, and the most at once.
    let slowInFlight = Mutex((now: 0, most: 0))

    func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse] {
        seen.withLock { $0 += requests.map(\.url) }
        let slow = requests.filter { $0.url == slowURL }.count
        if slow > 0 {
            slowInFlight.withLock { $0.now += slow; $0.most = max($0.most, $0.now) }
            // Bounded: a test that never releases still ends (after 60 s).
            for _ in 0..<6_000 where !released.withLock({ $0 }) { try? await Task.sleep(for: .milliseconds(10)) }
            slowInFlight.withLock { $0.now -= slow }
        }
        return requests.map { _ in FakeTransport.status(200) }
    }
}

/// Advances the clock as a slow transfer would, and answers 500: each notice's retry falls
/// due while the same pass is still sending the others.
final class SlowFailingTransport: OutboundTransport {
    let clock: ManualClock
    let seen = Mutex(0)

    init(clock: ManualClock) { self.clock = clock }

    func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse] {
        seen.withLock { $0 += requests.count }
        clock.advance(milliseconds: 20_000)
        return requests.map { _ in FakeTransport.status(500) }
    }
}

/// Answers 200, except at `stopAt`'s URL the first time: there the sender is stopped (its
/// task cancelled, as at the end of `serve`'s grace period) and the transfer comes back
/// cancelled, as libcurl's does.
final class StoppingTransport: OutboundTransport {
    let stopAt: String
    let sender = Mutex<Task<DeliveryPass, any Error>?>(nil)
    let stopped = Mutex(false)

    init(stopAt: String) { self.stopAt = stopAt }

    func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse] {
        var answers: [OutboundResponse] = []
        for r in requests {
            guard r.url == stopAt, !stopped.withLock({ s in defer { s = true }; return s }) else {
                answers.append(FakeTransport.status(200))
                continue
            }
            // The test hands over the sender's task just after starting it.
            for _ in 0..<500 where sender.withLock({ $0 == nil }) { try? await Task.sleep(for: .milliseconds(10)) }
            sender.withLock { $0?.cancel() }
            answers.append(OutboundResponse(result: .failure(TransportFailure(.cancelled, "cancelled: the sender is stopping")), latencyMilliseconds: 0))
        }
        return answers
    }
}

@Suite struct DeliveryLaneTests {
    /// A partner that answers slowly holds up its own notice only: the others are sent and
    /// recorded while it is still in flight (with fewer lanes than notices, so that a batch
    /// waiting for its slowest member would hold them back).
    @Test func aSlowPartnerHoldsUpNoOtherPartnersNotice() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        // A second run gives the slow partner a backlog: R000002:cinema waits for R000001:cinema
        // (one notice at a time per partner) instead of taking a second lane.
        h.post(C, "c2", Fixtures.redeem("M1", 100, "C-2"))
        h.clock.advance(milliseconds: 60_000)
        _ = try h.store.settle()
        #expect(try h.store.notices().filter { $0.partner == C }.count == 2)
        let transport = SlowPartnerTransport(slowURL: h.configuration.partners[C]!.noticeURL)
        var options = NoticeDeliveryOptions()
        options.inFlightMax = 3
        let dispatcher = h.dispatcher(transport, options: options)
        let pass = Task { try await dispatcher.deliverDue() }
        let othersDelivered = try await h.delivered("R000001:fuel", "R000001:grocer")
        let cinemaWhileOthersDelivered = try h.notice("R000001:cinema").0.state
        transport.released.withLock { $0 = true }
        let result = try await pass.value
        #expect(othersDelivered, "fuel and grocer are delivered while cinema's partner is still answering")
        #expect(cinemaWhileOthersDelivered == .pending)
        let counts = try h.store.noticeCounts()
        #expect(result.attempted == counts[.delivered]! && result.delivered == counts[.delivered]! && counts[.pending] == 0)
        #expect(transport.slowInFlight.withLock { $0.most } == 1, "one notice at a time to a partner")
    }

    /// `serve`'s lanes: while one waits on a slow partner, a new run's notices to the others
    /// go out at once (not after the slow one's pass).
    @Test func serveSendsANewRunsNoticesWhileASlowPartnerIsBusy() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = SlowPartnerTransport(slowURL: h.configuration.partners[C]!.noticeURL)
        var options = NoticeDeliveryOptions()
        options.pollIntervalMilliseconds = 50
        let dispatcher = h.dispatcher(transport, options: options)
        let worker = Task { await dispatcher.run() }
        let grocer = try await h.delivered("R000001:grocer"), fuel = try await h.delivered("R000001:fuel")
        #expect(grocer && fuel)
        // A second run while cinema's partner still holds its first notice.
        h.post(G, "g2", Fixtures.earn("M3", 70, "G-2"))
        h.clock.advance(milliseconds: 60_000)
        _ = try h.store.settle()
        #expect(try await h.delivered("R000002:grocer"), "sent while cinema's lane waits")
        #expect(try h.notice("R000001:cinema").0.state == .pending)
        transport.released.withLock { $0 = true }
        #expect(try await h.delivered("R000001:cinema"))
        worker.cancel()
        await worker.value
    }

    /// A transfer cut short because this sender is stopping is no attempt at the partner: it
    /// is recorded as interrupted, the round keeps its attempts, and the next start sends it.
    @Test func aTransferCancelledByAStopDoesNotCountAgainstTheRound() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = StoppingTransport(stopAt: h.configuration.partners[G]!.noticeURL)
        var options = NoticeDeliveryOptions()
        options.inFlightMax = 1
        let dispatcher = h.dispatcher(transport, options: options)
        let pass = Task { try await dispatcher.deliverDue() }
        transport.sender.withLock { $0 = pass }
        let first = try await pass.value
        #expect(first.delivered == 2 && first.retrying == 0 && first.dead == 0)
        var (n, attempts) = try h.notice("R000001:grocer")
        #expect(n.state == .pending && n.roundAttempts == 0 && n.attempts == 1 && n.nextAttemptAt == h.clock.now())
        #expect(attempts.map(\.outcome) == [.interrupted])
        #expect(try h.store.nextNoticeDue() == h.clock.now(), "no lease left behind")
        #expect(try await h.dispatcher(transport).deliverDue().delivered == 1)
        (n, attempts) = try h.notice("R000001:grocer")
        #expect(n.state == .delivered && n.roundAttempts == 1 && attempts.map(\.outcome) == [.interrupted, .delivered])
    }

    /// A lease in this process's own name on a notice it is not sending was left by an earlier
    /// process with the same pid (a restarted container's pid 1): taken over at once, its
    /// attempt recorded as interrupted.
    @Test func aLeaseInThisProcesssOwnNameIsAnEarlierProcesss() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        _ = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getpid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true })
        let pass = try await h.dispatcher(FakeTransport()).deliverDue()
        #expect(pass.delivered == 3)
        #expect(try h.notice("R000001:grocer").1.map(\.outcome) == [.interrupted, .delivered])
    }

    /// What wakes an idle lane: a notice it may take. Notices of partners other lanes are
    /// sending to, or leased by another live sender, do not (else idle lanes would poll at
    /// their floor, and write, for as long as a slow partner's backlog lasts).
    @Test func idleLanesAreNotWokenByNoticesTheyMayNotTake() throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let now = h.clock.now()
        #expect(try h.store.nextNoticeDue(skippingPartners: [C, F, G]) == nil)
        #expect(try h.store.nextNoticeDue(skippingPartners: [C]) == now)
        #expect(try h.store.claimableNoticeExists(clock: h.clock, owner: getpid(), ownerAlive: { _ in true }, skippingPartners: [C, F]))
        #expect(try !h.store.claimableNoticeExists(clock: h.clock, owner: getpid(), ownerAlive: { _ in true }, skippingPartners: [C, F, G]))
        // Leased by another live sender: not claimable, and not due before the lease runs out.
        _ = try h.store.claimDueNotices(clock: h.clock, limit: 8, owner: getppid(), leaseMilliseconds: 45_000, ownerAlive: { _ in true })
        #expect(try !h.store.claimableNoticeExists(clock: h.clock, owner: getpid(), ownerAlive: { _ in true }))
        #expect(try h.store.claimableNoticeExists(clock: h.clock, owner: getpid(), ownerAlive: { _ in false }), "a dead sender's lease is void")
        #expect(try h.store.nextNoticeDue()?.millisecondsSinceEpoch == now.millisecondsSinceEpoch + 45_000)
    }

    /// One pass attempts each notice once, however long it lasts (`notices send`: one pass
    /// over everything due); a retry that fell due meanwhile is for the next pass.
    /// Attempts made while the wall clock ran ahead (and was then set back) do not hold a notice
    /// back until the clock catches up: the operator's retry of the dead letter they made is
    /// sent at once.
    @Test func attemptsMadeWhileTheClockRanAheadDoNotHoldANoticeBack() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let rightTime = h.clock.now()
        let grocerURL = h.configuration.partners[G]!.noticeURL
        let transport = FakeTransport([grocerURL: [FakeTransport.status(500)]])
        let d = h.dispatcher(transport)
        for attempt in 1...Limits.noticeAttemptsMax {
            #expect(try await d.deliverDue(only: "R000001:grocer").attempted == 1, "attempt \(attempt)")
            if attempt < Limits.noticeAttemptsMax { h.clock.step(milliseconds: Limits.noticeRetryDelaysSeconds[attempt] * 1000) }
        }
        #expect(try h.notice("R000001:grocer").0.state == .dead)
        h.clock.set(Instant(millisecondsSinceEpoch: rightTime.millisecondsSinceEpoch + 60_000))  // days back: the right time, a minute on
        transport.answers.withLock { $0[grocerURL] = [FakeTransport.status(200)] }
        try h.store.retryDeadNotice("R000001:grocer", now: h.clock.now())
        #expect(try await d.deliverDue(only: "R000001:grocer").delivered == 1)
        #expect(try h.notice("R000001:grocer").0.state == .delivered)
    }

    /// A next attempt scheduled while the wall clock ran a month ahead is due at once when the
    /// clock is set back: it lies further ahead than any schedule can put it.
    @Test func aRetryScheduledByAClockThatRanAheadIsDueOnceTheClockIsSetBack() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let rightTime = h.clock.now()
        let grocerURL = h.configuration.partners[G]!.noticeURL
        let transport = FakeTransport([grocerURL: [FakeTransport.status(500), FakeTransport.status(200)]])
        let d = h.dispatcher(transport)
        h.clock.step(milliseconds: 30 * 86_400_000)
        #expect(try await d.deliverDue(only: "R000001:grocer").attempted == 1)
        #expect(try h.notice("R000001:grocer").0.state == .pending)
        h.clock.set(Instant(millisecondsSinceEpoch: rightTime.millisecondsSinceEpoch + 60_000))
        #expect(try h.store.noticeDue(at: h.clock.now()))
        #expect(try await d.deliverDue(only: "R000001:grocer").delivered == 1)
        // A retry scheduled within reach is not due early.
        let fuelURL = h.configuration.partners[F]!.noticeURL
        transport.answers.withLock { $0[fuelURL] = [FakeTransport.status(500)] }
        #expect(try await d.deliverDue(only: "R000001:fuel").attempted == 1)
        #expect(try await d.deliverDue(only: "R000001:fuel").attempted == 0)
    }

    @Test func aPassAttemptsEachNoticeOnce() async throws {
        let h = try NoticeHarness()
        _ = try h.settleADay()
        let transport = SlowFailingTransport(clock: h.clock)
        var options = NoticeDeliveryOptions()
        options.inFlightMax = 1
        let pass = try await h.dispatcher(transport, options: options).deliverDue()
        #expect(pass.attempted == 3 && pass.retrying == 3)
        #expect(transport.seen.withLock { $0 } == 3)
        for id in ["R000001:cinema", "R000001:fuel", "R000001:grocer"] {
            #expect(try h.notice(id).1.count == 1, "\(id): one attempt")
        }
        // The next pass takes them again once each is due (the last retry falls 5 s after the
        // pass's end).
        h.clock.advance(milliseconds: 5_000)
        #expect(try await h.dispatcher(transport, options: options).deliverDue().attempted == 3)
    }
}

extension WebhookSignature {
    static func verifies(_ r: OutboundRequest, secret: SecretBytes) -> Bool {
        var headers: [String: String] = [:]
        for x in r.headers { headers[x.name] = x.value }
        return verify(
            id: headers["webhook-id"], timestamp: headers["webhook-timestamp"], signatures: headers["webhook-signature"],
            body: r.body, secrets: [secret], now: Instant(millisecondsSinceEpoch: Int64(headers["webhook-timestamp"]!)! * 1000)) == nil
    }
}
