import ArgumentParser
import ClearingDomain
import ClearingSimulation
import ClearingStore
import Foundation

/// Posts a generated coalition day through the posting API and prints what happened.
struct Simulate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate a realistic coalition day and post it through the writer.",
        discussion: """
            Members earn at every configured partner and redeem elsewhere; refunds reverse \
            earns, some redemptions are undone, and a few postings are deliberately bad. The \
            day is the same for the same --seed.
            """)

    @OptionGroup var locations: Locations

    @Option(parsing: .unconditional, help: "How many members.") var members: Int = 3_000
    @Option(parsing: .unconditional, help: "How many postings.") var events: Int = 30_000
    @Option(parsing: .unconditional, help: "Seed of the generator.") var seed: UInt64 = 20_261_122
    @Option(parsing: .unconditional, help: "Postings in flight at once.") var inFlight: Int = 1_024
    @Flag(help: "Print the day as JSON lines (partner, webhook_id, body, intent) instead of posting it.") var emit = false
    @Flag(help: "Post into a data directory that already holds a coalition (simulated entries are real there: permanent, and settled).")
    var force = false

    func validate() throws {
        guard (1...Limits.simulatedMembersMax).contains(members) else { throw ValidationError("--members must be 1...\(Limits.simulatedMembersMax)") }
        guard (0...Limits.simulatedEventsMax).contains(events) else { throw ValidationError("--events must be 0...\(Limits.simulatedEventsMax)") }
        guard (1...Limits.postingQueueMax).contains(inFlight) else { throw ValidationError("--in-flight must be 1...\(Limits.postingQueueMax)") }
    }

    func run() async throws {
        let configuration = try locations.loadConfiguration()
        if emit {
            let sim = DaySimulator(
                partners: configuration.partnerIDs, members: members, events: events, seed: seed, start: SystemClock().now())
            var out = ""
            for p in IteratorSequence(sim) {
                var w = JSONWriter()
                w.string("partner", p.partner.rawValue)
                w.string("webhook_id", p.webhookID.rawValue)
                w.string("body", p.event.jsonBody)
                if let intent = p.intent { w.string("intent", intent) } else { w.null("intent") }
                out += w.finish() + "\n"
                if out.utf8.count > 1 << 20 {
                    try writeStandardOutput(out, verb: "simulate")
                    out = ""
                }
            }
            try writeStandardOutput(out, verb: "simulate")
            return
        }
        // Fake entries in a real ledger can never be taken out (ledgers are append-only) and
        // would be settled: only into a new data directory, unless asked.
        if !force, Store.hasJournal(locations.dataURL) {
            printError("clearhouse simulate: \(locations.data) already holds a coalition; simulated entries would stay in its ledgers for good and be settled. Use a new --data, or --force")
            throw ExitCode(2)
        }
        let store = try locations.openStore(configuration, creating: true)
        let writer = PostingWriter(store: store, waitMax: nil)  // bounded by its own window
        let sim = DaySimulator(
            partners: configuration.partnerIDs, members: members, events: events, seed: seed, start: SystemClock().now())
        let tally = Tally()
        let started = DispatchTime.now()
        let window = DispatchSemaphore(value: inFlight)
        for p in IteratorSequence(sim) {
            window.wait()
            writer.enqueue(Submission(partner: p.partner, webhookID: p.webhookID, event: p.event)) { outcome in
                tally.record(p, outcome)
                window.signal()
            }
        }
        writer.shutdown()
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        try store.close()
        print(tally.summary(partners: configuration, seconds: seconds, batches: writer.batchStatistics))
        if tally.unexpected > 0 { throw ExitCode(1) }
    }
}

/// Counts outcomes of a simulated day.
final class Tally: @unchecked Sendable {
    private let lock = NSLock()
    private var created: [PartnerID: [EventKind: (entries: Int, points: Int64)]] = [:]
    private var replayed = 0
    private var rejected: [String: Int] = [:]
    private var intended: [String: [String: Int]] = [:]
    private(set) var unexpected = 0

    func record(_ p: SimulatedPosting, _ outcome: PostingOutcome) {
        lock.lock()
        defer { lock.unlock() }
        switch outcome {
        case .created(let e):
            var c = created[e.partner, default: [:]][e.event.kind, default: (0, 0)]
            c.entries += 1
            c.points += e.event.points.value
            created[e.partner, default: [:]][e.event.kind] = c
            if p.intent != nil { unexpected += 1 }
        case .replayed: replayed += 1
        case .rejected(let problem):
            rejected[problem.kind.rawValue, default: 0] += 1
            if problem.kind == .unavailable { unexpected += 1 }
        }
        if let intent = p.intent {
            let slug: String
            switch outcome {
            case .created: slug = "ACCEPTED (unexpected)"
            case .replayed: slug = "200 replay"
            case .rejected(let problem): slug = "\(problem.status) \(problem.kind.rawValue)"
            }
            intended[intent, default: [:]][slug, default: 0] += 1
        }
    }

    func summary(partners c: ClearingConfiguration, seconds: Double, batches: (batches: Int, postings: Int, largest: Int)) -> String {
        lock.lock()
        defer { lock.unlock() }
        var out = "Accepted entries by partner (points):\n"
        out += pad("partner", 18) + pad("earned", 18) + pad("redeemed", 18) + pad("earn reversed", 18) + pad("redemption rev.", 18) + "\n"
        for id in c.partnerIDs {
            let row = created[id] ?? [:]
            out += pad(id.rawValue, 18)
            for k in EventKind.allCases {
                let v = row[k] ?? (0, 0)
                out += pad("\(v.entries) (\(v.points))", 18)
            }
            out += "\n"
        }
        let total = created.values.reduce(0) { $0 + $1.values.reduce(0) { $0 + $1.entries } }
        out += "\naccepted: \(total)   replayed (200): \(replayed)   refused: \(rejected.values.reduce(0, +))\n"
        for (slug, n) in rejected.sorted(by: { $0.key < $1.key }) { out += "  refused \(slug): \(n)\n" }
        out += "\nDeliberately bad postings and what they got:\n"
        for (intent, outcomes) in intended.sorted(by: { $0.key < $1.key }) {
            out += "  \(intent): " + outcomes.sorted(by: { $0.key < $1.key }).map { "\($0.value) × \($0.key)" }.joined(separator: ", ") + "\n"
        }
        let rate = seconds > 0 ? Int(Double(total + replayed + rejected.values.reduce(0, +)) / seconds) : 0
        let avg = batches.batches > 0 ? batches.postings / batches.batches : 0
        out += "\n\(batches.postings) postings in \(String(format: "%.2f", seconds)) s (\(rate)/s); \(batches.batches) group commits, \(avg) postings each on average, largest \(batches.largest)"
        if unexpected > 0 { out += "\nUNEXPECTED OUTCOMES: \(unexpected)" }
        return out
    }

    private func pad(_ s: String, _ w: Int) -> String { s.count >= w ? s + " " : s + String(repeating: " ", count: w - s.count) }
}
