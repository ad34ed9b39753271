import ClearhouseTestSupport
import ClearingDomain
import ClearingSimulation
import ClearingStore
import Foundation
import GRDB
import Synchronization
import Testing

/// Random but reproducible event streams: earns, redemptions (some above the balance),
/// reversals (some of unknown originals or another member's), replays and conflicts, over
/// few members so that they collide.
struct StreamGenerator {
    var rng: SeededGenerator
    let partners = [G, F, C]
    let members: [String]
    var sent: [(PartnerID, String, Event)] = []
    var counter = 0

    init(seed: UInt64, members: Int = 6) {
        rng = SeededGenerator(seed: seed)
        self.members = (0..<members).map { "M\($0)" }
    }

    mutating func pick<T>(_ a: [T]) -> T { a[Int.random(in: 0..<a.count, using: &rng)] }

    mutating func next() -> (PartnerID, String, Event) {
        counter += 1
        let p = pick(partners)
        let wid = "w\(counter)"
        let ref = "R-\(counter)"
        let m = pick(members)
        let pts = Int64.random(in: 1...120, using: &rng)
        let roll = Int.random(in: 0..<100, using: &rng)
        let item: (PartnerID, String, Event)
        if roll < 5, !sent.isEmpty {
            item = pick(sent)  // a replay
        } else if roll < 9, !sent.isEmpty {
            var (op, _, oe) = pick(sent)  // reference reused with other content
            oe.points = Points(oe.points.value % 1000 + 1)
            op = op == G ? op : op
            item = (op, wid, oe)
        } else if roll < 22, let (op, _, oe) = sent.last(where: { $0.2.kind == .earned && Int.random(in: 0..<3, using: &rng) == 0 }) {
            let who = Int.random(in: 0..<10, using: &rng) == 0 ? pick(members) : oe.member.rawValue
            let target = Int.random(in: 0..<15, using: &rng) == 0 ? "NOPE-\(counter)" : oe.reference.rawValue
            item = (op, wid, Fixtures.reverseEarn(who, Int64.random(in: 1...oe.points.value + 5, using: &rng), ref, of: target))
        } else if roll < 32, let (op, _, oe) = sent.last(where: { $0.2.kind == .redeemed && Int.random(in: 0..<3, using: &rng) == 0 }) {
            let who = Int.random(in: 0..<10, using: &rng) == 0 ? pick(members) : oe.member.rawValue
            item = (op, wid, Fixtures.reverseRedemption(who, Int64.random(in: 1...oe.points.value + 5, using: &rng), ref, of: oe.reference.rawValue))
        } else if roll < 62 {
            item = (p, wid, Fixtures.redeem(m, pts * Int64.random(in: 1...3, using: &rng), ref))
        } else {
            item = (p, wid, Fixtures.earn(m, pts, ref))
        }
        sent.append(item)
        return item
    }
}

/// Crashes at the k-th time the writer reaches one fault point.
final class CrashAt: Sendable {
    let point: FaultPoint
    let occurrence: Int
    let seen = Atomic<Int>(0)

    init(_ point: FaultPoint, occurrence: Int) {
        self.point = point
        self.occurrence = occurrence
    }

    var injector: FaultInjector {
        { [self] p in
            guard p == point else { return false }
            return seen.add(1, ordering: .relaxed).newValue == occurrence
        }
    }

    var fired: Bool { seen.load(ordering: .relaxed) >= occurrence }
}

/// Posts a batch to the store and to the model and requires the same outcomes.
func postAndCompare(_ h: Harness, _ model: inout ReferenceModel, _ batch: [(PartnerID, String, Event)]) {
    let now = h.clock.now().millisecondsSinceEpoch
    let outcomes = h.store.post(batch.map { Submission(partner: $0.0, webhookID: WebhookID($0.1)!, event: $0.2) })
    for (item, outcome) in zip(batch, outcomes) {
        let expected = model.post(partner: item.0.rawValue, webhookID: item.1, event: item.2, now: now)
        switch (expected, outcome) {
        case (.created(let seq, let bal), .created(let e)):
            #expect(e.sequence == seq && e.memberBalance.value == bal, "\(item)")
        case (.replayed(let seq), .replayed(let e)):
            #expect(e.sequence == seq, "\(item)")
        case (.refused(let s), .rejected(let p)):
            #expect(p.kind.rawValue == s, "\(item): \(p)")
        default:
            Issue.record("model says \(expected), store says \(outcome) for \(item)")
        }
    }
}

func requireVerified(_ h: Harness, _ context: String) throws {
    let r = try h.verify()
    #expect(r.ok, "\(context): \(r.breaches.prefix(5))")
}

@Suite struct PropertyTests {
    /// Thousands of random sequences against the reference model, with time moving so lots
    /// expire, invariants verified after every batch, and a crash plus recovery in some.
    @Test func randomStreamsMatchTheModelAndKeepEveryInvariant() throws {
        let sequences = Int(ProcessInfo.processInfo.environment["CLEARHOUSE_PROPERTY_SEQUENCES"] ?? "") ?? 1_000
        var checkedBatches = 0
        for seed in 1...UInt64(sequences) {
            var gen = StreamGenerator(seed: seed)
            var rng = SeededGenerator(seed: seed &* 7919)
            let crash: CrashAt? = seed % 5 == 0
                ? CrashAt(FaultPoint.allCases[Int(seed / 5) % 3], occurrence: Int.random(in: 1...3, using: &rng)) : nil
            // Points that live a day (so lots expire as time moves), or for ever (0 = never).
            let days: Int64 = seed % 4 == 3 ? 0 : 1
            let h = try Harness(expireAfterDays: days, faults: crash?.injector)
            var model = ReferenceModel(expireAfterDays: days, partners: [G, F, C])
            var posted = 0
            let length = Int.random(in: 20...60, using: &rng)
            while posted < length {
                let size = min(Int.random(in: 1...8, using: &rng), length - posted)
                let batch = (0..<size).map { _ in gen.next() }
                posted += size
                if let crash, !crash.fired {
                    let outcomes = h.store.post(batch.map { Submission(partner: $0.0, webhookID: WebhookID($0.1)!, event: $0.2) })
                    if crash.fired {
                        // The writer died in this batch. Before the journal commit nothing was
                        // decided; after it, the whole batch was.
                        #expect(outcomes.allSatisfy { $0.httpStatus == 503 })
                        try h.reopen()
                        try requireVerified(h, "seed \(seed) after crash at \(crash.point)")
                        if crash.point != .beforeJournalCommit {
                            let now = h.clock.now().millisecondsSinceEpoch
                            for item in batch { _ = model.post(partner: item.0.rawValue, webhookID: item.1, event: item.2, now: now) }
                        }
                        // The partner retries the same batch: replays where it was decided.
                        postAndCompare(h, &model, batch)
                    } else {
                        var replay = model  // no crash: compare as usual
                        let now = h.clock.now().millisecondsSinceEpoch
                        for (item, o) in zip(batch, outcomes) {
                            let exp = replay.post(partner: item.0.rawValue, webhookID: item.1, event: item.2, now: now)
                            #expect(sameOutcome(exp, o), "seed \(seed): \(exp) vs \(o)")
                        }
                        model = replay
                    }
                } else {
                    postAndCompare(h, &model, batch)
                }
                h.clock.advance(milliseconds: Int64.random(in: 0...(6 * 3_600_000), using: &rng))
                if seed <= 100 || posted >= length {
                    try requireVerified(h, "seed \(seed) after \(posted) events")
                    checkedBatches += 1
                }
            }
            let now = h.clock.now()
            for m in gen.members {
                #expect(try h.store.balance(of: MemberID(m)!, at: now).value == model.balance(m, at: now.millisecondsSinceEpoch), "seed \(seed) member \(m)")
            }
            #expect(model.issued - model.redeemed == model.remainingInLots, "the model's own invariant 2")
            // The flows issuer → redeemer, against the model's own FIFO (verify replays with the
            // store's FIFO, so only an independent model can catch a wrong order of lots).
            var config = GRDB.Configuration()
            config.readonly = true
            let coalition = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path, configuration: config)
            let stored = try coalition.read { db in
                try Row.fetchAll(db, sql: "SELECT issuer, redeemer, points FROM flow WHERE points <> 0").reduce(into: [String: Int64]()) {
                    $0["\($1[0] as String)>\($1[1] as String)"] = $1[2] as Int64
                }
            }
            try coalition.close()
            #expect(stored == model.flows.filter { $0.value != 0 }, "seed \(seed): flows")
        }
        #expect(checkedBatches > sequences)
    }

    func sameOutcome(_ e: ReferenceModel.Result, _ o: PostingOutcome) -> Bool {
        switch (e, o) {
        case (.created(let s, let b), .created(let x)): x.sequence == s && x.memberBalance.value == b
        case (.replayed(let s), .replayed(let x)): x.sequence == s
        case (.refused(let slug), .rejected(let p)): p.kind.rawValue == slug
        default: false
        }
    }
}

/// `verify` replays each run's expiry from a queue of the lots that may expire (not from every
/// lot ever made) and keeps only each member's lots with points left. Settlement finds the lots
/// it expires its own way (`lot_expiry`, `lot_reopened`) and records each one (`run_expiry`),
/// which verify compares with its replay lot by lot: over random streams with runs between
/// them, the two must agree, lots given points back after they expired included.
@Suite struct VerifyRunsTests {
    @Test func randomStreamsWithRunsAreVerifiedRunByRun() throws {
        var runsThatExpired = 0
        var lotsReopened = 0
        for seed in UInt64(1)...120 {
            var gen = StreamGenerator(seed: seed &* 104_729, members: 4)
            var rng = SeededGenerator(seed: seed &* 6_007)
            let h = try Harness(expireAfterDays: 1)
            for _ in 0..<Int.random(in: 10...30, using: &rng) {
                _ = h.post((0..<Int.random(in: 1...6, using: &rng)).map { _ in gen.next() })
                h.clock.advance(milliseconds: Int64.random(in: 1...(9 * 3_600_000), using: &rng))
                if Int.random(in: 0..<3, using: &rng) == 0 {
                    let run = try h.store.settle()
                    if run.partners.contains(where: { $0.expiredPoints.value > 0 }) { runsThatExpired += 1 }
                }
            }
            h.clock.advance(milliseconds: 1)
            _ = try h.store.settle()
            let r = try h.verify()
            #expect(r.ok, "seed \(seed): \(r.breaches.prefix(5))")
            let coalition = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
            // Lots expired by one run, given points back, and expired again by a later one.
            lotsReopened += try coalition.read {
                try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM (SELECT lot_id FROM run_expiry GROUP BY lot_id HAVING COUNT(*) > 1)")
            } ?? 0
            try coalition.close()
        }
        // What the streams must have had in them for the check to mean anything.
        #expect(runsThatExpired > 50)
        #expect(lotsReopened > 5)
    }
}

@Suite struct CrashRecoveryTests {
    /// Stops the writer at every write boundary, at several moments of a workload, then
    /// reopens: recovery must restore every invariant, keep every acknowledged entry exactly
    /// once, and make the interrupted batch either wholly decided or wholly absent.
    @Test(arguments: FaultPoint.allCases)
    func crashAtEveryBoundaryThenRecover(point: FaultPoint) throws {
        for occurrence in [1, 2, 4, 7] {
            let crash = CrashAt(point, occurrence: occurrence)
            let h = try Harness(faults: crash.injector)
            var gen = StreamGenerator(seed: UInt64(occurrence * 31 + point.rawValue.count))
            var model = ReferenceModel(expireAfterDays: 1095, partners: [G, F, C])
            var acknowledged: [(PartnerID, Entry)] = []
            var crashedBatch: [(PartnerID, String, Event)] = []
            while !crash.fired {
                let batch = (0..<12).map { _ in gen.next() }
                let outcomes = h.store.post(batch.map { Submission(partner: $0.0, webhookID: WebhookID($0.1)!, event: $0.2) })
                if crash.fired { crashedBatch = batch; break }
                let now = h.clock.now().millisecondsSinceEpoch
                for (item, o) in zip(batch, outcomes) {
                    _ = model.post(partner: item.0.rawValue, webhookID: item.1, event: item.2, now: now)
                    if let e = entry(o) { acknowledged.append((item.0, e)) }
                }
                h.clock.advance(milliseconds: 1000)
            }
            #expect(crashedBatch.count == 12)
            // The store refuses to write after the fault: as a dead process would.
            #expect(h.store.post([Submission(partner: G, webhookID: WebhookID("late")!, event: Fixtures.earn("Z", 1, "Z-1"))])[0].httpStatus == 503)
            try h.reopen()
            try requireVerified(h, "\(point) #\(occurrence)")

            // Before the journal commit nothing of the batch was decided; after it, all of it
            // was, and recovery has copied it into the ledgers.
            if point != .beforeJournalCommit {
                let now = h.clock.now().millisecondsSinceEpoch
                for item in crashedBatch { _ = model.post(partner: item.0.rawValue, webhookID: item.1, event: item.2, now: now) }
            }
            var ledgers: [PartnerID: [Entry]] = [:]
            for p in [G, F, C] {
                ledgers[p] = try h.store.ledgerEntries(p)
                #expect(Int64(ledgers[p]!.count) == model.entries(of: p.rawValue), "\(point) #\(occurrence): ledger \(p)")
            }
            // Every acknowledged entry is in its ledger exactly once, unchanged.
            for (p, e) in acknowledged {
                #expect(ledgers[p]!.filter { $0.sequence == e.sequence } == [e], "\(point): \(p) #\(e.sequence)")
            }
            // The partners retry the interrupted batch: replayed where it had been decided,
            // decided now where it had not.
            postAndCompare(h, &model, crashedBatch)
            try requireVerified(h, "\(point) #\(occurrence) after retry")
        }
    }

    /// Copying a ledger tail is idempotent: recovery run twice, or by two processes, adds
    /// nothing twice.
    @Test func recoveryIsIdempotent() throws {
        let crash = CrashAt(.afterJournalCommit, occurrence: 1)
        let h = try Harness(faults: crash.injector)
        _ = h.post(G, "g1", Fixtures.earn("M1", 10, "G-1"))
        #expect(crash.fired)
        try h.reopen()
        try h.store.recover()
        try h.reopen()
        #expect(try h.store.ledgerEntries(G).map(\.event.reference.rawValue) == ["G-1"])
        try requireVerified(h, "recovered twice")
    }
}

@Suite struct TwoProcessTests {
    /// Two writers on one data directory (say `serve` and `clearhouse post`): when one died
    /// between its journal and ledger commits, the other copies the missing entries first
    /// and still answers 201 for its own.
    @Test func aSecondWriterCompletesTheLedgerOfOneThatDied() throws {
        let crash = CrashAt(.afterJournalCommit, occurrence: 1)
        let a = try Harness(faults: crash.injector)
        let b = try Store(dataDirectory: a.dir.url, configuration: a.configuration, clock: a.clock)
        defer { try? b.close() }
        _ = a.post(G, "a1", Fixtures.earn("M1", 10, "A-1"))
        #expect(crash.fired)
        let o = b.post([Submission(partner: G, webhookID: WebhookID("b1")!, event: Fixtures.earn("M1", 5, "B-1"))])[0]
        #expect(o.httpStatus == 201, "\(o)")
        #expect(try b.ledgerEntries(G).map(\.event.reference.rawValue) == ["A-1", "B-1"])
        #expect(try a.verify().ok)
    }
}
