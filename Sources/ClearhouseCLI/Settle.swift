import ArgumentParser
import ClearingDomain
import ClearingStore
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `clearhouse settle [--through <instant>] [--json]` (CONTRACT §6).
struct Settle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Close a settlement run: net every partner's issued and redeemed points into money.",
        discussion: "Covers every entry accepted after the previous run's cutoff and at or before --through (default now), in every partner's ledger, and expires lots whose expiry is at or before it. A run with nothing in it is recorded too: it closes the period with zero figures.")

    @OptionGroup var locations: Locations
    @Option(help: "The cutoff, an RFC 3339 instant (default: now).") var through: String?
    @Flag(help: "Print the run as one JSON object.") var json = false

    func run() async throws {
        let configuration = try locations.loadConfiguration()
        let cutoff = try instantOption(through, verb: "settle", option: "--through")
        let store = try locations.openStore(configuration)
        let run: SettlementRun
        // A progress bar on a terminal (stderr), for long runs; nothing when piped.
        let bar: (@Sendable (Int64, Int64) -> Void)? = isatty(2) == 1 ? ProgressBar.draw : nil
        // Ctrl-C (or SIGTERM) while the run is being made: it rolls back, and the operator is
        // told so. (A second one ends the process at once: a run whose COMMIT was under way
        // may then be recorded or not, whole either way; `clearhouse runs` says which.)
        let interruption = Interruption { store.interruptSettlement() }
        // Once the run is recorded, the verb says so: a signal then is noted and ignored (with
        // its default action, the process would end with 130 or 143, "nothing was settled",
        // and without the run it printed), until the process exits.
        defer {
            // Tests: CLEARHOUSE_SETTLE_SIGNAL_AFTER_COMMIT=1 sends SIGTERM once the run is
            // printed, just before the store closes, as a night job's timeout could.
            if interruption.isSettled, ProcessInfo.processInfo.environment["CLEARHOUSE_SETTLE_SIGNAL_AFTER_COMMIT"] == "1" {
                interruption.raiseAndWait(SIGTERM)
            }
            try? store.close()
        }
        // Tests: CLEARHOUSE_SETTLE_SIGNAL_BEFORE_COMMIT=1 sends this process SIGINT just before
        // the run's COMMIT, as an operator's Ctrl-C at the last moment would.
        let beforeCommit: (() -> Void)? = ProcessInfo.processInfo.environment["CLEARHOUSE_SETTLE_SIGNAL_BEFORE_COMMIT"] == "1"
            ? { interruption.raiseAndWait(SIGINT) } : nil
        do {
            run = try store.settle(through: cutoff, progress: bar, beforeCommit: beforeCommit)
            interruption.settled()
        } catch where interruption.caught != 0 {
            if bar != nil { FileHandle.standardError.write(Data("\n".utf8)) }
            printError("clearhouse settle: interrupted (\(interruption.caught == SIGINT ? "SIGINT" : "SIGTERM")): nothing was settled; the run's transaction was rolled back and the journal was not changed. Run `clearhouse settle` again to close the run.")
            throw ExitCode(128 + interruption.caught)
        } catch let e as SettlementError {
            printError("clearhouse settle: \(e)")
            throw ExitCode(1)
        } catch let e as ArithmeticOverflow {
            // Figures past 64-bit integers (CONTRACT §6: an error, never a wrap): the data is
            // sound, the period or a price is too large.
            printError("clearhouse settle: nothing was settled: the run's figures do not fit in 64-bit integers (\(e)). Settle a shorter period (`--through` an earlier instant), or check the prices (issue_price_per_1000, redeem_credit_per_1000) in \(locations.partners)")
            throw ExitCode(1)
        } catch {
            // A storage error (an unreadable page of coalition.sqlite, a full disk): the run's
            // transaction rolled back. SQLite often says only "disk I/O error": a full or
            // read-only disk is named, and the operator is not sent to a backup, which would
            // lose what was accepted since it was taken.
            if let condition = store.diskCondition() {
                printError("clearhouse settle: nothing was settled: \(error): \(condition). Nothing is damaged: free some space (or make the file system writable) and run `clearhouse settle` again")
            } else {
                printError("clearhouse settle: nothing was settled: \(error). If coalition.sqlite in \(locations.data) is damaged, `clearhouse verify` says where; restore it from a backup")
            }
            throw ExitCode(1)
        }
        print(json ? RunReport.json(run) : RunReport.table(run, configuration))
        if !json && !run.partners.isEmpty {
            print("\n\(run.partners.count) settlement notices are in the outbox: `clearhouse serve` delivers them, or run `clearhouse notices send`.")
        }
        fflush(nil)  // the run is printed before anything else can happen to the process
    }
}

/// SIGINT and SIGTERM caught while `settle` makes its run (`SignalTrap`): the first calls
/// `onSignal` (once) and is remembered; a second ends the process at once (exit 128 + the
/// signal), as an operator pressing Ctrl-C twice expects. Once the run is recorded
/// (`settled`), signals are remembered and nothing more: the verb prints the run and exits 0.
/// The trap stays until the process exits.
final class Interruption: Sendable {
    /// The signal caught (0: none yet), and whether the run is recorded; a handler holds the
    /// lock while it runs.
    private final class State: Sendable { let lock = Mutex<(caught: Int32, settled: Bool)>((0, false)) }
    private let state = State()
    private let trap: SignalTrap

    init(onSignal: @escaping @Sendable () -> Void) {
        let state = self.state
        trap = SignalTrap { number in
            state.lock.withLock { s in
                // The run is recorded: nothing to interrupt, and no exit that would say otherwise.
                if s.settled {
                    s.caught = number
                    return
                }
                if s.caught != 0 { _exit(128 + number) }
                s.caught = number
                onSignal()
            }
        }
    }

    /// The signal caught (SIGINT or SIGTERM), or 0.
    var caught: Int32 { state.lock.withLock { $0.caught } }

    /// Sends this process `sig` and waits (at most `Limits.signalWaitMillisecondsMax`) until its
    /// handler has run. For tests.
    func raiseAndWait(_ sig: Int32) {
        kill(getpid(), sig)
        for _ in 0..<(Limits.signalWaitMillisecondsMax / 10) where caught == 0 { usleep(10_000) }
    }

    /// The run is recorded: from now on a signal calls nothing and ends nothing. Returns once
    /// no handler is running, so `onSignal` never runs beside what follows (closing the store).
    func settled() {
        state.lock.withLock { $0.settled = true }
    }

    var isSettled: Bool { state.lock.withLock { $0.settled } }
}

/// `clearhouse runs` and `clearhouse runs show <run>`.
struct Runs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List closed settlement runs (they never change).", subcommands: [List.self, Show.self], defaultSubcommand: List.self)

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List every closed run.")
        @OptionGroup var locations: Locations

        func run() async throws {
            let configuration = try locations.loadConfiguration()
            let store = try locations.openStore(configuration, readOnly: true)
            defer { try? store.close() }
            print("run      cutoff                    entries  partners  margin (minor)  netting efficiency")
            for r in try store.runs() {
                print("\(r.id)  \(r.cutoff.rfc3339)  \(padLeft(String(r.entryCount), 7))  \(padLeft(String(r.partners.count), 8))  \(padLeft(String(r.totals.operatorMarginMinor.value), 14))  \(r.totals.nettingEfficiencyText)")
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one run.")
        @OptionGroup var locations: Locations
        @Argument(help: "The run id, e.g. R000001.") var run: String
        @Flag(help: "Print the run as one JSON object.") var json = false

        func run() async throws {
            let configuration = try locations.loadConfiguration()
            let store = try locations.openStore(configuration, readOnly: true)
            defer { try? store.close() }
            guard let r = try store.run(id: run) else {
                printError("clearhouse runs show: no run \(JSONWriter.quote(run))")
                throw ExitCode(1)
            }
            print(json ? RunReport.json(r) : RunReport.table(r, configuration))
        }
    }
}

/// The run as the contract's JSON, and as a table for the operator.
enum RunReport {
    static func json(_ r: SettlementRun) -> String {
        var w = JSONWriter()
        w.string("run", r.id)
        w.string("cutoff", r.cutoff.rfc3339)
        w.int("operator_margin_minor", r.totals.operatorMarginMinor.value)
        w.int("gross_minor", r.totals.grossMinor.value)
        w.int("net_transfers_minor", r.totals.netTransfersMinor.value)
        w.raw("netting_efficiency", r.totals.nettingEfficiencyJSON)
        w.int("entries", r.entryCount)
        let partners = r.partners.map { f -> String in
            var p = JSONWriter()
            p.string("partner", f.partner.rawValue)
            p.int("issued_points", f.issuedPoints.value)
            p.int("redeemed_points", f.redeemedPoints.value)
            p.int("expired_points", f.expiredPoints.value)
            p.int("payable_minor", f.payableMinor.value)
            p.int("receivable_minor", f.receivableMinor.value)
            p.int("net_minor", f.netMinor.value)
            return p.finish()
        }
        w.raw("partners", "[" + partners.joined(separator: ",") + "]")
        w.raw("flows", "[" + r.flows.map(\.json).joined(separator: ",") + "]")
        return w.finish()
    }

    static func table(_ r: SettlementRun, _ c: ClearingConfiguration) -> String {
        let cur = c.coalition.currency
        func money(_ m: MoneyMinor) -> String { BeancountExport.amount(m.value, cur) }
        let col = padLeft
        var out = "Settlement run \(r.id), cutoff \(r.cutoff.rfc3339), \(r.entryCount) \(r.entryCount == 1 ? "entry" : "entries") (\(cur))\n\n"
        out += "partner     " + col("issued", 11) + col("redeemed", 11) + col("expired", 10) + col("payable", 14) + col("receivable", 14) + col("net", 14) + "  direction\n"
        for f in r.partners {
            let dir = f.netMinor.value > 0 ? "coalition pays" : f.netMinor.value < 0 ? "partner pays" : "nothing to pay"
            out += f.partner.rawValue.padding(toLength: 12, withPad: " ", startingAt: 0)
                + col(String(f.issuedPoints.value), 11) + col(String(f.redeemedPoints.value), 11) + col(String(f.expiredPoints.value), 10)
                + col(money(f.payableMinor), 14) + col(money(f.receivableMinor), 14) + col(money(f.netMinor), 14) + "  \(dir)\n"
        }
        out += "\noperator margin \(money(r.totals.operatorMarginMinor)) · gross \(money(r.totals.grossMinor)) · net transfers \(money(r.totals.netTransfersMinor)) · netting efficiency \(r.totals.nettingEfficiencyText)\n"
        out += "\nSettlement plan:\n"
        for f in r.partners where f.netMinor.value != 0 {
            out += f.netMinor.value < 0
                ? "  \(f.partner) pays the coalition \(money((try? f.netMinor.magnitude()) ?? f.netMinor)) \(cur)\n"
                : "  the coalition pays \(f.partner) \(money(f.netMinor)) \(cur)\n"
        }
        if r.partners.allSatisfy({ $0.netMinor.value == 0 }) { out += "  no payments\n" }
        if !r.flows.isEmpty {
            out += "\nFlows (points issued by -> redeemed at):\n"
            for f in r.flows { out += "  \(f.issuer) -> \(f.redeemer): \(f.points)\n" }
        }
        return out
    }
}

enum ProgressBar {
    static let width: Int64 = 40

    @Sendable static func draw(done: Int64, total: Int64) {
        let filled = total == 0 ? width : done * width / total
        var line = "\rsettling ["
        line += String(repeating: "#", count: Int(filled))
        line += String(repeating: " ", count: Int(width - filled))
        line += "] \(done)/\(total) entries"
        if done == total { line += "\n" }
        FileHandle.standardError.write(Data(line.utf8))
    }
}
