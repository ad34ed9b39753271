import ArgumentParser
import ClearingDomain
import ClearingNotices
import ClearingStore
import Foundation
import PartnerTransport
import Synchronization

/// `clearhouse notices`: the settlement notices' outbox (CONTRACT §7).
struct Notices: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Watch and send settlement notices: list, show, retry, send.",
        discussion: """
            Every run writes one notice per partner with activity into the outbox, in the same \
            transaction as the run. `clearhouse serve` delivers them (and retries on the Standard \
            Webhooks schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h); \
            after the last attempt a notice is a dead letter until an operator retries it.
            """,
        subcommands: [List.self, Show.self, Retry.self, Send.self], defaultSubcommand: List.self)

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List notices, oldest run first.")
        @OptionGroup var locations: Locations
        @Option(help: "Only notices in this state: pending, delivered or dead.") var state: String?

        func run() async throws {
            let wanted = try state.map { s in
                guard let st = NoticeState(rawValue: s) else {
                    printError("clearhouse notices list: --state \(JSONWriter.quote(s)) is not one of pending, delivered, dead")
                    throw ExitCode(1)
                }
                return st
            }
            let store = try locations.openStore(try locations.loadConfiguration(), readOnly: true)
            defer { try? store.close() }
            print("notice                     state      attempts  next attempt / finished   last result")
            var shown = try store.notices(state: wanted, limit: Limits.noticeListRowsMax + 1)
            let more = shown.count > Limits.noticeListRowsMax
            if more { shown.removeLast() }
            defer {
                if more { print("… only the oldest \(Limits.noticeListRowsMax) are listed; narrow with --state") }
            }
            for n in shown {
                let when = (n.nextAttemptAt ?? n.finishedAt)?.rfc3339 ?? "-"
                print("\(padRight(n.id, 26)) \(padRight(n.state.rawValue, 10)) \(padLeft(String(n.attempts), 8))  \(padRight(when, 25)) \(n.lastResult ?? "-")")
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one notice, its body and every attempt.")
        @OptionGroup var locations: Locations
        @Argument(help: "The notice id, <run>:<partner>, e.g. R000001:fuelco.") var id: String

        func run() async throws {
            let store = try locations.openStore(try locations.loadConfiguration(), readOnly: true)
            defer { try? store.close() }
            guard let (n, attempts) = try store.notice(id) else {
                printError("clearhouse notices show: no notice \(JSONWriter.quote(id))")
                throw ExitCode(1)
            }
            print("notice      \(n.id) (webhook-id of every attempt)")
            print("partner     \(n.partner)")
            print("state       \(n.state.rawValue)")
            print("created     \(n.createdAt.rfc3339)")
            if let next = n.nextAttemptAt { print("next        \(next.rfc3339)") }
            if let done = n.finishedAt { print("finished    \(done.rfc3339)") }
            print("attempts    \(n.attempts) (\(n.roundAttempts) in this round of at most \(Limits.noticeAttemptsMax))")
            print("body        \(String(decoding: n.body, as: UTF8.self))")
            print("")
            print("#    started                   latency  status  outcome      next attempt              error")
            for a in attempts {
                print(
                    "\(padRight(String(a.number), 4)) \(padRight(a.startedAt.rfc3339, 25)) \(padLeft(a.latencyMilliseconds.map { "\($0) ms" } ?? "-", 7))  \(padRight(a.httpStatus.map(String.init) ?? "-", 6))  \(padRight(a.outcome.rawValue, 12)) \(padRight(a.nextAttemptAt?.rfc3339 ?? "-", 25)) \(a.error ?? "")"
                )
            }
        }
    }

    /// Runs a delivery pass that SIGTERM or SIGINT stops as `serve`'s shutdown does: no more
    /// claims, transfers in flight cut short and recorded as interrupted (not counted against
    /// their round: the notice is due again at once), every answer already in recorded.
    /// Without this a signal killed the process, which counts as a crash. Whether it was
    /// stopped comes back with the pass.
    static func stoppable(_ pass: @escaping @Sendable () async throws -> DeliveryPass) async throws -> (DeliveryPass, Bool) {
        let stopping = StopBox()
        // The handlers first, then the pass.
        let trap = SignalTrap { _ in stopping.stop() }
        defer { trap.end() }
        let task = Task { try await pass() }
        stopping.watch(task)
        let result = try await task.value
        return (result, stopping.stopped)
    }

    /// Whether a signal asked the pass to stop, and the pass to cancel when it did (the signal
    /// may come before the pass's task exists).
    final class StopBox: Sendable {
        private let state = Mutex<(task: Task<DeliveryPass, any Error>?, stopped: Bool)>((nil, false))
        func stop() { state.withLock { $0.stopped = true; $0.task?.cancel() } }
        func watch(_ task: Task<DeliveryPass, any Error>) { state.withLock { $0.task = task; if $0.stopped { task.cancel() } } }
        var stopped: Bool { state.withLock { $0.stopped } }
    }

    static func sayStopped(_ verb: String) {
        printError("clearhouse notices \(verb): stopped by a signal; attempts cut short are recorded as interrupted and are due again (not counted against their round)")
    }

    struct Retry: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send a dead letter again now (a new round of attempts if it fails again).",
            discussion: "Exit 0 when the notice is delivered now, 1 when it is not (it stays pending, with later attempts, or dead).")
        @OptionGroup var locations: Locations
        @Argument(help: "The notice id, <run>:<partner>.") var id: String

        func run() async throws {
            let configuration = try locations.loadConfiguration()
            let store = try locations.openStore(configuration)
            defer { try? store.close() }
            // A retry for a partner without terms would only spend a new round of attempts.
            if let (n, _) = try store.notice(id), configuration.partners[n.partner] == nil {
                printError("clearhouse notices retry: partner \(n.partner) is not in \(locations.partners): put its file back (or check --partners); nothing was attempted")
                throw ExitCode(1)
            }
            do { try store.retryDeadNotice(id, now: SystemClock().now()) } catch let e as NoticeError {
                printError("clearhouse notices retry: \(e)")
                throw ExitCode(1)
            }
            let dispatcher = NoticeDispatcher(store: store, transport: CurlTransport(), logger: CLILog.logger("clearhouse.notices"))
            let (pass, stopped) = try await Notices.stoppable { try await dispatcher.deliverDue(only: id) }
            if stopped { Notices.sayStopped("retry") }
            guard let (n, _) = try store.notice(id) else { throw ExitCode(1) }
            print("\(n.id): \(n.state.rawValue) after \(pass.attempted) attempt(s) now; \(n.lastResult ?? "")")
            // Success is the partner having it: a retry that failed again (dead, or pending
            // with later attempts scheduled) is exit 1, so `retry && ...` means delivered.
            if n.state != .delivered { throw ExitCode(1) }
        }
    }

    struct Send: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send every notice that is due now, once, and exit (serve does this continuously).")
        @OptionGroup var locations: Locations

        func run() async throws {
            let configuration = try locations.loadConfiguration()
            let store = try locations.openStore(configuration)
            defer { try? store.close() }
            // A notice whose partner has no terms fails its attempt (docs/NOTICES.md: a partner
            // that left, whose notice ends as a dead letter). When no partner of any notice is
            // configured, the --partners given is the wrong one: refused before any attempt.
            let (waiting, all) = try store.noticePartners()
            let configured = { (p: String) in PartnerID(p).map { configuration.partners[$0] != nil } ?? false }
            let unknown = waiting.filter { !configured($0) }
            if !unknown.isEmpty && !all.contains(where: configured) {
                printError("clearhouse notices send: no partner with a notice (\(all.joined(separator: ", "))) is in \(locations.partners): check --partners; nothing was attempted")
                throw ExitCode(2)
            }
            if !unknown.isEmpty {
                printError("clearhouse notices send: warning: \(unknown.joined(separator: ", ")) not in \(locations.partners): their notices fail their attempts until their files are back (docs/NOTICES.md)")
            }
            let dispatcher = NoticeDispatcher(store: store, transport: CurlTransport(), logger: CLILog.logger("clearhouse.notices"))
            let (pass, stopped) = try await Notices.stoppable { try await dispatcher.deliverDue() }
            if stopped { Notices.sayStopped("send") }
            let counts = try store.noticeCounts()
            print(
                "notices: \(pass.attempted) attempted, \(pass.delivered) delivered, \(pass.retrying) to retry later, \(pass.dead) dead letters now; outbox: \(counts[.pending] ?? 0) pending, \(counts[.delivered] ?? 0) delivered, \(counts[.dead] ?? 0) dead"
            )
            if stopped { throw ExitCode(1) }
        }
    }
}
