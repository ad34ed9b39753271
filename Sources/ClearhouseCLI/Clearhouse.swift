import ArgumentParser
import ClearingConfig
import ClearingDomain
import ClearingStore
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// `clearhouse <verb>` (CONTRACT §10).
public struct Clearhouse: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "clearhouse",
        abstract: "Clearhouse: the clearing house of a coalition loyalty program.",
        discussion: """
            Partners' earns, redemptions and reversals land in per-partner, hash-chained SQLite \
            ledgers, exactly once. Every verb takes --data (default ./data) and --partners \
            (default ./partners).
            """,
        subcommands: [Partners.self, Serve.self, Post.self, Balance.self, Settle.self, Runs.self, Notices.self, StatementCommand.self, Export.self, BackupCommand.self, RestoreCommand.self, Verify.self, Simulate.self])

    public init() {}
}

/// `--data` and `--partners`, shared by every verb.
struct Locations: ParsableArguments {
    @Option(help: "The data directory: coalition.sqlite and ledgers/.")
    var data: String = "./data"

    @Option(help: "The partners directory: coalition.toml and <id>.toml files.")
    var partners: String = "./partners"

    var dataURL: URL { URL(fileURLWithPath: data) }
    var partnersURL: URL { URL(fileURLWithPath: partners) }

    /// Loads the configuration or stops with one line naming the file, the key and the reason.
    func loadConfiguration() throws -> ClearingConfiguration {
        do {
            return try ConfigurationLoader(directory: partnersURL).load()
        } catch {
            printError("clearhouse: configuration refused: \(error)")
            throw ExitCode(2)
        }
    }

    /// Opens the store (running recovery). `CLEARHOUSE_CRASH_AT=<fault point>` makes the
    /// process die at that write boundary, as a kill would, for crash tests.
    ///
    /// Only the verbs that accept events (`serve`, `post`, `simulate`) make a new data
    /// directory; the others refuse one that holds no journal, so that a mistyped `--data`
    /// is an error rather than a new, empty coalition (and `settle` never closes a run there).
    /// - Parameter readOnly: for verbs that only read: the store is opened without writing
    ///   anything (so they answer on a full disk), unless the directory needs a write first
    ///   (a migration, a ledger behind its journal), when it is opened as usual.
    /// Exit 2 when the data directory holds an interrupted restore: no verb may use it, nor
    /// write anything into it.
    func refuseInterruptedRestore() throws {
        if Backup.interruptedRestore(in: dataURL) {
            printError("clearhouse: \(Backup.interruptedRestoreRefusal(data))")
            throw ExitCode(2)
        }
    }

    /// - Parameter logger: the store's (default: the quiet CLI logger, warnings and errors only;
    ///   `serve` passes its own, so that the store's notices reach its log at its level).
    func openStore(_ configuration: ClearingConfiguration, creating: Bool = false, readOnly: Bool = false, logger: Logger? = nil) throws -> Store {
        let logger = logger ?? CLILog.logger("clearhouse.store")
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: data, isDirectory: &isDirectory), !isDirectory.boolValue {
            printError("clearhouse: --data \(data) is a file, not a data directory; check --data")
            throw ExitCode(2)
        }
        let ledgers = dataURL.appendingPathComponent("ledgers").path
        if FileManager.default.fileExists(atPath: ledgers, isDirectory: &isDirectory), !isDirectory.boolValue {
            printError("clearhouse: \(ledgers) is a file, not the directory of the ledgers; move it aside")
            throw ExitCode(2)
        }
        try refuseInterruptedRestore()
        if !Store.hasJournal(dataURL) {
            guard creating else {
                printError("clearhouse: no data in \(data) (no coalition.sqlite): nothing has been accepted there; check --data")
                throw ExitCode(2)
            }
            // Said, so that a mistyped --data is seen at once rather than at the next settle.
            // (Beside ledgers the store refuses to start a journal, and says so.)
            if Store.ledgerFileNames(dataURL).isEmpty { printError("clearhouse: no coalition.sqlite in \(data): starting a new coalition there (if you meant another one, check --data)") }
        }
        do {
            if readOnly {
                do {
                    return try Store(dataDirectory: dataURL, configuration: configuration, logger: logger, readOnly: true)
                } catch is Store.NeedsWriting {}
            }
            // A read verb that must open writable (a migration, a ledger to catch up) still
            // records no currency: a mistyped --partners of a read must do no lasting harm.
            return try Store(
                dataDirectory: dataURL, configuration: configuration, faults: Locations.crashFromEnvironment(),
                logger: logger, recordsCurrency: !readOnly)
        } catch where StoreError.isDiskFull(error, under: dataURL) {
            // Opening a store writes (SQLite's WAL set-up), even for a verb that only reads.
            printError("clearhouse: cannot open the data directory \(data): the disk is full (\(error)); free some space first. A running serve keeps answering reads")
            throw ExitCode(2)
        } catch {
            let advice = StoreError.advice(error, under: dataURL).map { "; \($0)" } ?? ""
            printError("clearhouse: cannot open the data directory \(data): \(error)\(advice)")
            throw ExitCode(2)
        }
    }

    static func crashFromEnvironment() -> FaultInjector? {
        guard let name = ProcessInfo.processInfo.environment["CLEARHOUSE_CRASH_AT"],
            let point = FaultPoint(rawValue: name)
        else { return nil }
        return { p in
            if p == point { _exit(86) }
            return false
        }
    }
}

/// An optional RFC 3339 option, or exit 1 naming the verb, the option and the reason.
func instantOption(_ text: String?, verb: String, option: String) throws -> Instant? {
    guard let text else { return nil }
    guard let t = Instant(rfc3339: text) else {
        printError("clearhouse \(verb): \(option) \(JSONWriter.quote(text)) is not an RFC 3339 instant")
        throw ExitCode(1)
    }
    return t
}

/// Text columns for tables: right-aligned (numbers) and left-aligned.
func padLeft(_ s: String, _ w: Int) -> String { s.count >= w ? s : String(repeating: " ", count: w - s.count) + s }
func padRight(_ s: String, _ w: Int) -> String { s.count >= w ? s : s + String(repeating: " ", count: w - s.count) }

func printError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

/// Writes a verb's output to standard output, unbuffered. One that cannot take it (a full disk)
/// is an error naming it, exit 1, not a crash.
func writeStandardOutput(_ text: String, verb: String) throws {
    do { try FileHandle.standardOutput.write(contentsOf: Data(text.utf8)) } catch {
        printError("clearhouse \(verb): standard output: \(error.localizedDescription)")
        throw ExitCode(1)
    }
}

/// A file a verb writes on the operator's behalf (`statement --output`, `export --output`):
/// written beside its target (owner-only), synced, then renamed into place, so a reader never
/// sees half of it. Refused before anything is written, naming the reason: a target inside
/// the data directory (a typo must never replace a ledger or the journal), one that is not a
/// regular file (a directory, a device, a link), and an SQLite database wherever it is (a
/// backup's copy).
struct OutputFile {
    let path: String
    let verb: String
    private let target: URL
    private let partial: URL

    init(_ path: String, verb: String, dataDirectory: URL) throws {
        self.path = path
        self.verb = verb
        // The directory resolved by the file system (`..` after a link means what the shell means).
        let named = URL(fileURLWithPath: path)
        let parent = named.deletingLastPathComponent().path
        target = (FileSync.realPath(parent).map { URL(fileURLWithPath: $0) } ?? named.deletingLastPathComponent())
            .appendingPathComponent(named.lastPathComponent)
        partial = target.deletingLastPathComponent().appendingPathComponent(".\(target.lastPathComponent).partial")
        if let reason = OutputFile.refusal(target, dataDirectory: dataDirectory) {
            printError("clearhouse \(verb): --output \(path): \(reason); nothing was written")
            throw ExitCode(1)
        }
    }

    /// Why `target` may not be written, or nil.
    private static func refusal(_ target: URL, dataDirectory: URL) -> String? {
        let directory = target.deletingLastPathComponent()
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            return "its directory \(directory.path) does not exist"
        }
        if FileSync.lies(target, inside: dataDirectory) {
            return "it is inside the data directory \(dataDirectory.path), which holds the journal and the ledgers; write it elsewhere"
        }
        var st = stat()
        guard lstat(target.path, &st) == 0 else { return nil }  // a new file
        guard st.st_mode & S_IFMT == S_IFREG else {
            return "it exists and is not a regular file (leave out --output to write to standard output)"
        }
        if let handle = FileHandle(forReadingAtPath: target.path) {
            defer { try? handle.close() }
            if let head = try? handle.read(upToCount: 16), head == Data("SQLite format 3\0".utf8) {
                return "it is an SQLite database, which this would replace"
            }
        }
        return nil
    }

    /// Writes what `produce` hands to its writer, then puts the file in place; exit 1 naming
    /// the file and the reason if any step fails (the partial file is removed).
    func write(_ produce: (_ write: (String) throws -> Void) async throws -> Void) async throws {
        unlink(partial.path)  // one a crashed earlier run left behind
        let fd = open(partial.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            printError("clearhouse \(verb): --output \(path): cannot create \(partial.path): \(String(cString: strerror(errno)))")
            throw ExitCode(1)
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        do {
            try await produce { try handle.write(contentsOf: Data($0.utf8)) }
            try handle.synchronize()
            try handle.close()
            guard rename(partial.path, target.path) == 0 else {
                throw StoreError("cannot rename \(partial.lastPathComponent) into place: \(String(cString: strerror(errno)))")
            }
            try FileSync.directory(target.deletingLastPathComponent())
        } catch {
            try? handle.close()
            unlink(partial.path)
            printError("clearhouse \(verb): --output \(path): \(error)")
            throw ExitCode(1)
        }
    }
}

enum CLILog {
    static func logger(_ label: String) -> Logger {
        var l = Logger(label: label)
        l.logLevel = .warning
        return l
    }
}

// MARK: - partners

struct Partners: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Partner configuration.", subcommands: [Check.self], defaultSubcommand: Check.self)

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate coalition.toml and every partner file; print a summary or the first error.")

        @OptionGroup var locations: Locations

        func run() async throws {
            let c = try locations.loadConfiguration()
            let expiry = c.coalition.pointsExpireAfterDays == 0 ? "never" : "after \(c.coalition.pointsExpireAfterDays) days"
            print("coalition: currency \(c.coalition.currency), points expire \(expiry)")
            for id in c.partnerIDs {
                let p = c.partners[id]!
                let mtls = p.clientCertSHA256 == nil ? "signatures" : "signatures + mutual TLS"
                print(
                    "partner \(id): \(p.name); pays \(p.issuePricePer1000) per 1000 issued, credited \(p.redeemCreditPer1000) per 1000 redeemed; \(p.webhookSecrets.count) webhook secret(s); \(mtls)"
                )
            }
            for w in c.warnings { print("warning: \(w)") }
            // Against the data directory in effect (--data, default ./data), as every verb would
            // at start (the runbook checks before a restart), saying which; nothing is written.
            if !Store.hasJournal(locations.dataURL) {
                print("data: \(locations.data) holds no coalition.sqlite: not compared (name the service's with --data)")
            } else {
                let recorded: String?
                do { recorded = try Store.historicCurrency(dataDirectory: locations.dataURL) } catch {
                    printError("clearhouse partners check: cannot read \(locations.data)/coalition.sqlite: \(error)")
                    throw ExitCode(2)
                }
                if let recorded, recorded != c.coalition.currency {
                    printError("clearhouse: configuration refused: \(Store.CurrencyMismatch(configured: c.coalition.currency, recorded: recorded))")
                    throw ExitCode(2)
                }
                print("data: \(locations.data): currency \(recorded ?? "not recorded yet")")
                for name in Store.ledgerFileNames(locations.dataURL) {
                    if let id = Store.ledgerPartner(fileName: name), c.partners[id] == nil {
                        print("warning: \(locations.data)/ledgers/\(name): partner \(id) has a ledger but no file in \(locations.partners): a run with entries of it is refused until its file is back (docs/OPERATIONS.md)")
                    }
                }
            }
            print("ok: \(c.partners.count) partners")
        }
    }
}

// MARK: - post

struct Post: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Post one event body (read on standard input) exactly as the HTTP route would.",
        discussion: """
            Prints the success body or the problem document as JSON; exits 0 on success, 1 on a \
            problem. Without --webhook-id, a fresh id is made (the reference still makes a \
            repeat idempotent).
            """)

    @OptionGroup var locations: Locations

    @Option(help: "The partner posting the event.")
    var partner: String

    @Option(name: .customLong("webhook-id"), help: "The Standard Webhooks message id.")
    var webhookID: String?

    func run() async throws {
        // The body first (bounded), whatever comes next: a refusal does not leave the program
        // piping it in to fail on a closed pipe.
        let body = readStandardInput(limit: Limits.eventBodyBytesMax + 1)
        // CONTRACT §10: `post` prints a problem document for every failure and exits 1, so a
        // caller's script handles a refused configuration as it does any other problem. The
        // line naming the file, the key and the reason goes to standard error, as for every verb.
        let configuration: ClearingConfiguration
        do {
            configuration = try ConfigurationLoader(directory: locations.partnersURL).load()
        } catch {
            printError("clearhouse: configuration refused: \(error)")
            print(PostingOutcome.rejected(Problem(.unavailable, "the coalition's configuration is refused: \(error)")).bodyJSON)
            throw ExitCode(1)
        }
        let outcome = await post(body, configuration)
        print(outcome.bodyJSON)
        if case .rejected = outcome { throw ExitCode(1) }
    }

    private func post(_ body: [UInt8], _ configuration: ClearingConfiguration) async -> PostingOutcome {
        guard let p = PartnerID(partner), configuration.partners[p] != nil else {
            return .rejected(Problem(.unknownPartner, "no partner \(JSONWriter.quote(partner)) in this coalition"))
        }
        let event: Event
        do { event = try EventParser.parse(body) } catch { return .rejected(error) }
        let idText = webhookID ?? "cli_\(UUID().uuidString.lowercased())"
        guard let wid = WebhookID(idText) else {
            return .rejected(Problem(.malformed, "webhook-id: must be 1-128 characters of [A-Za-z0-9._:-]"))
        }
        do {
            let store = try locations.openStore(configuration, creating: true)
            defer { do { try store.close() } catch { printError("close: \(error)") } }
            return store.post([Submission(partner: p, webhookID: wid, event: event)])[0]
        } catch {
            return .rejected(Problem(.unavailable, "cannot open the data directory"))
        }
    }
}

func readStandardInput(limit: Int) -> [UInt8] {
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65_536)
    while out.count < limit {
        let n = read(0, &buffer, buffer.count)
        if n <= 0 { break }
        out += buffer[0..<n]
    }
    return Array(out.prefix(limit))
}

// MARK: - balance

struct Balance: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a member's spendable balance as JSON.")

    @OptionGroup var locations: Locations

    @Argument(help: "The member id (coalition card or account number). One that starts with '-' goes after '--': clearhouse balance -- -M1.")
    var member: String

    @Option(parsing: .unconditional, help: "Count the member's current lots that are still unexpired at this instant (RFC 3339); default now. Not a balance in the past.")
    var at: String?

    func run() async throws {
        let configuration = try locations.loadConfiguration()
        guard let m = MemberID(member) else {
            printError("clearhouse balance: member \(JSONWriter.quote(member)) must match ^[A-Za-z0-9._-]{1,64}$")
            throw ExitCode(1)
        }
        let instant = try instantOption(at, verb: "balance", option: "--at")
        let store = try locations.openStore(configuration, readOnly: true)
        defer { try? store.close() }
        let b = try store.balance(of: m, at: instant)
        var w = JSONWriter()
        w.string("member", m.rawValue)
        w.int("balance", b.value)
        print(w.finish())
    }
}

// MARK: - verify

struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check every invariant from the files on disk; exit 1 on any breach.",
        discussion: """
            Replays the journal from nothing, recomputes every hash of every chain, compares the \
            lots, balances and flows with the replay, and every partner ledger entry by entry \
            with the journal, each partner's running totals, the run snapshots and lot moves \
            with the replay, and each notice byte for byte. An empty directory is exit 0; a \
            missing one or an interrupted restore is a breach. Read-only: may run while serve \
            runs.
            """)

    @OptionGroup var locations: Locations

    func run() async throws {
        // The terms verify needs (expiry, prices of each run) are recorded in the data directory
        // itself, and its answer is the data's (CONTRACT §10: exit 0 or 1): a partners
        // directory it cannot read is said, not a reason to leave the data unchecked.
        do {
            _ = try ConfigurationLoader(directory: locations.partnersURL).load()
        } catch {
            printError("clearhouse verify: warning: the partners directory does not load (\(error)); verify does not need it: the data directory records the terms")
        }
        let report = try Verifier.verify(dataDirectory: locations.dataURL)
        for c in report.checks { print("checked  \(c)") }
        for b in report.breaches { print("BREACH   \(b)") }
        print(report.ok ? "verify: ok, \(report.checks.count) checks, no breach" : "verify: \(report.breaches.count) breach(es)")
        if !report.ok { throw ExitCode(1) }
    }
}
