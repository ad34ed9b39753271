import ClearingDomain
import Crypto
import Foundation
import CSQLiteConfig
import GRDB
import Logging
import Synchronization

/// A boundary between two durable writes of a posting batch. Tests (and `CLEARHOUSE_CRASH_AT`
/// in the command line) stop the writer at each one to prove that recovery restores every
/// invariant (docs/DURABILITY.md).
public enum FaultPoint: String, Sendable, CaseIterable {
    /// Inside the journal transaction, after every write, before COMMIT.
    case beforeJournalCommit = "before-journal-commit"
    /// The journal is durable; no ledger has been written.
    case afterJournalCommit = "after-journal-commit"
    /// One partner ledger has committed; others of the batch may not have.
    case afterLedgerCommit = "after-ledger-commit"
}

/// Decides, at a fault point, whether the writer "crashes" there. Returning true stops the
/// batch at once, as a killed process would; the store is then unusable and must be reopened.
public typealias FaultInjector = @Sendable (FaultPoint) -> Bool

public struct StoreError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }

    /// Whether `error` is SQLite's "database or disk is full", or an I/O or open error on a
    /// file system under `directory` with no space left (SQLite reports a `-shm` it cannot
    /// grow as an I/O error).
    public static func isDiskFull(_ error: any Error, under directory: URL) -> Bool {
        guard let e = error as? DatabaseError else { return false }
        if e.resultCode == .SQLITE_FULL { return true }
        guard e.resultCode == .SQLITE_IOERR || e.resultCode == .SQLITE_CANTOPEN else { return false }
        var fs = statvfs()
        return statvfs(directory.path, &fs) == 0 && fs.f_bavail == 0
    }

    /// What an operator can do about a storage error met opening a data directory, or nil
    /// when there is nothing to add: SQLite's own words ("disk I/O error", "attempt to write a
    /// readonly database") name neither the cause nor the way out.
    public static func advice(_ error: any Error, under directory: URL) -> String? {
        guard let e = error as? DatabaseError else { return nil }
        let d = directory.path
        switch e.resultCode {
        case .SQLITE_CORRUPT, .SQLITE_NOTADB:
            return "a database in \(d) is damaged: `clearhouse verify --data \(d)` names it; restore it from a backup"
        case .SQLITE_READONLY:
            var fs = statvfs()
            if statvfs(d, &fs) == 0, fs.f_flag & UInt(ST_RDONLY) != 0 {
                return "\(d) is on a read-only file system: remount it writable (the verbs that only read, such as runs, statement and verify, answer as it is)"
            }
            return "\(d) or its files cannot be written by this user (even reading needs SQLite's -shm file writable): run as the user that owns it"
        case .SQLITE_CANTOPEN, .SQLITE_IOERR, .SQLITE_PERM, .SQLITE_AUTH:
            var isDirectory: ObjCBool = false
            let journal = directory.appendingPathComponent("coalition.sqlite").path
            if FileManager.default.fileExists(atPath: journal, isDirectory: &isDirectory), isDirectory.boolValue {
                return "\(journal) is a directory, not a database"
            }
            return "check that this user may read and write \(d) and its files, and that the disk is sound (`clearhouse verify --data \(d)`)"
        default:
            return nil
        }
    }
}

/// The databases of one data directory: `coalition.sqlite` (the journal, the truth) and one
/// ledger per partner. One instance per process; it is the single writer (group commit) and
/// serves reads from any thread.
public final class Store: Sendable {
    public let dataDirectory: URL
    public let configuration: ClearingConfiguration
    let coalition: DatabasePool
    /// Copies the coalition's WAL into its database file off the writer's thread.
    /// Nil on a read-only store (nothing to checkpoint).
    let checkpointer: Checkpointer?
    /// Opened by a verb that only reads: no connection can write, and opening wrote nothing.
    public let readOnly: Bool
    let ledgers: Mutex<[PartnerID: DatabasePool]>
    let clock: any WallClock
    let faults: FaultInjector?
    let logger: Logger
    let writerState = Mutex(WriterState())
    /// The decider's copy of recently active members' open lots, between batches (`LotCache`).
    let lotCache = Mutex<LotCache?>(nil)
    /// The most members the lot cache holds (`Limits.lotCacheMembersMax`; tests make it small).
    let lotCacheMembersMax: Int
    let commitCounter = Atomic<Int>(0)
    /// Batches decided again because the lot cache disagreed with SQLite (should stay 0).
    let lotCacheMismatchCounter = Atomic<Int>(0)
    /// Set by `interruptSettlement` (an operator's Ctrl-C); a run in progress then rolls back.
    let settlementInterrupted = Atomic<Bool>(false)
    /// The last failure of the idle ledger catch-up, said once (not every few seconds while,
    /// say, the disk stays full), and said again when it differs or has passed.
    let idleCatchUpFailure = Mutex<String?>(nil)

    struct WriterState {
        /// Set when a fault point stopped the writer: nothing more may be written.
        var crashed = false
        /// Partners whose ledger could not be written after a journal commit; cleared by catch-up.
        var laggingLedgers: Set<PartnerID> = []
        /// Set by `close()`; a closed store refuses every write.
        var closed = false
        /// For tests: undoing the next this many failed postings' savepoints fails.
        var savepointUndoFailuresToInject = 0
    }

    /// Opens (creating if needed) the data directory, migrates, and recovers: any journal
    /// entry missing from its partner's ledger is copied there before anything else happens.
    public init(
        dataDirectory: URL, configuration: ClearingConfiguration, clock: any WallClock = SystemClock(),
        faults: FaultInjector? = nil, logger: Logger = Logger(label: "clearhouse.store"),
        walFramesMax: Int32 = Limits.coalitionWALFramesMax, walBufferBytes: Int = Limits.coalitionWALBufferBytes,
        readOnly: Bool = false, recordsCurrency: Bool = true, lotCacheMembersMax: Int = Limits.lotCacheMembersMax
    ) throws {
        Store.configureSQLite
        precondition(lotCacheMembersMax >= 1 && lotCacheMembersMax <= Limits.lotCacheMembersMax)
        self.lotCacheMembersMax = lotCacheMembersMax
        self.readOnly = readOnly
        self.dataDirectory = dataDirectory
        self.configuration = configuration
        self.clock = clock
        self.faults = faults
        self.logger = logger
        let fm = FileManager.default
        let hasJournal = Store.hasJournal(dataDirectory)
        // A restore that did not finish: some of the backup may be missing (Backup.restore).
        if Backup.interruptedRestore(in: dataDirectory) {
            throw StoreError(Backup.interruptedRestoreRefusal(dataDirectory.path))
        }
        // Ledgers without their journal: the truth is gone. Starting a new journal beside them
        // would hand out their sequences again and the two would silently diverge. An empty
        // coalition.sqlite (0 bytes: truncated, a failed copy) or one with no tables (a first
        // start that stopped before its schema, a file replaced) is no journal either; it is
        // looked at through a read-only connection, so nothing is written into it (not even
        // WAL mode).
        let ledgerFiles = Store.ledgerFileNames(dataDirectory)
        if !ledgerFiles.isEmpty, let missing = try Store.missingJournal(dataDirectory, hasJournal: hasJournal) {
            throw StoreError("\(dataDirectory.path) holds \(ledgerFiles.count) ledger(s) but \(missing): the journal is missing; restore it from a backup (docs/OPERATIONS.md)\(hasJournal ? "; nothing was written" : "")")
        }
        if readOnly {
            // For the verbs that only read (runs, notices list, balance, statement, export):
            // opening writes nothing, so they answer on a full disk or a read-only mount. A
            // directory that needs writing first (a migration, a currency to record, a ledger
            // behind its journal) is `NeedsWriting`: the caller opens it writable instead.
            guard hasJournal else { throw NeedsWriting() }
            coalition = try DatabasePool(
                path: dataDirectory.appendingPathComponent("coalition.sqlite").path,
                configuration: Store.databaseConfiguration(readonly: true, cacheKiB: Limits.ledgerCacheKiBMax))
            checkpointer = nil
            ledgers = Mutex([:])
            try Store.refuseNewerSchema(coalition, Schema.coalition, "coalition.sqlite")
            // A read-only store records nothing (not even a currency: a mistyped --partners of
            // a read must do no lasting harm), and checks what the history already says.
            guard try coalition.read({ try Schema.coalition.hasCompletedMigrations($0) }) else {
                try? coalition.close()
                throw NeedsWriting()
            }
            try Store.recordCurrency(coalition, configuration.coalition.currency, write: false)
            guard ledgersCaughtUp() else {
                try? coalition.close()
                throw NeedsWriting()
            }
            return
        }
        // A currency other than the history's is refused before the journal is opened for
        // writing: that open alone writes (SQLite's WAL set-up), and a refused configuration
        // must leave the files as they were. (Checked again below, once writable.)
        if hasJournal, let settled = try? Store.historicCurrency(dataDirectory: dataDirectory), settled != configuration.coalition.currency {
            throw CurrencyMismatch(configured: configuration.coalition.currency, recorded: settled)
        }
        try fm.createDirectory(at: dataDirectory.appendingPathComponent("ledgers"), withIntermediateDirectories: true)
        coalition = try Store.openWritable(
            dataDirectory.appendingPathComponent("coalition.sqlite"), cacheKiB: Limits.coalitionCacheKiBMax,
            walBufferBytes: walBufferBytes)
        try Store.refuseNewerSchema(coalition, Schema.coalition, "coalition.sqlite")
        try Store.migrateIfNeeded(coalition, Schema.coalition)
        try Store.recordCurrency(coalition, configuration.coalition.currency, write: recordsCurrency)
        // From here on, the coalition writer keeps every page a transaction dirties in memory
        // until its COMMIT, however many (a batch is bounded by `Limits.postingBatchMax`, a
        // run by its expiring lots): SQLite 3.40.1 can lose frames written after a `ROLLBACK
        // TO` that follows a spill (docs/DURABILITY.md), and the savepoint path rolls back.
        // Not during migrations, which may rebuild a whole table in one transaction.
        try coalition.writeWithoutTransaction { try $0.execute(sql: "PRAGMA cache_spill = OFF") }
        let checkpointer = try Checkpointer(
            dataDirectory.appendingPathComponent("coalition.sqlite"), framesMax: walFramesMax, logger: logger)
        self.checkpointer = checkpointer
        ledgers = Mutex([:])
        do {
            try recover()
        } catch {
            // The checkpointer's connection is not left open by a store that never opened.
            try? checkpointer.stop()
            throw error
        }
        // After recovery (which commits under SQLite's own autocheckpoint): from here on the
        // writer's commits schedule checkpoints on the checkpointer's connection.
        coalition.writeWithoutTransaction { checkpointer.install(on: $0) }
    }

    /// A read-only store cannot be opened on this directory as it is: it must be opened
    /// writable once (and is, by `Locations.openStore`).
    public struct NeedsWriting: Error {}

    /// Whether every ledger holds exactly its journal's history (else opening must recover,
    /// or refuse it by name): present, not behind the journal, not ahead of it (a ledger ahead
    /// of a stale read of the journal is re-checked against the journal as it is now), and the
    /// journal's entry at its head, hash for hash. Any error reading a ledger counts as no.
    private func ledgersCaughtUp() -> Bool {
        do {
            for (partner, last) in try partnersToRecover() {
                let exists = FileManager.default.fileExists(atPath: ledgerURL(partner).path)
                if last == 0 && !exists { continue }
                guard exists else { return false }
                if last == 0 {
                    // A ledger the journal has no entry of must hold none; one that cannot be
                    // read as a ledger yet (made, not written: a first batch in flight) holds none.
                    let held = (try? ledgerHead(partner)) ?? 0
                    if held > 0, held > (try journalHead(partner)) { return false }
                    continue
                }
                let held = try ledgerHead(partner)
                if held < last { return false }
                if held > last, held > (try journalHead(partner)) { return false }
                try requireSameHistory(partner, through: last)
            }
            return true
        } catch {
            return false
        }
    }

    /// Marks this data directory as restored from a backup at `time`: runs closed from now on
    /// carry it in their ids (`run_naming`, `SettlementRun.id`).
    public func markRestored(at time: Instant) throws {
        let t = Array(time.rfc3339.utf8)  // YYYY-MM-DDTHH:MM:SS.mmmZ
        let compact = String(decoding: t[2..<4] + t[5..<7] + t[8..<10] + t[11..<13] + t[14..<16] + t[17..<19], as: UTF8.self)
        try coalition.write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO run_naming (id, restored_at) VALUES (1, ?)", arguments: [compact])
        }
    }

    /// The configuration names another currency than the coalition's history.
    /// How a data directory's journal is missing ("no coalition.sqlite", an empty one, one with
    /// no tables), or nil when it holds one.
    private static func missingJournal(_ dataDirectory: URL, hasJournal: Bool) throws -> String? {
        guard hasJournal else { return "no coalition.sqlite" }
        let path = dataDirectory.appendingPathComponent("coalition.sqlite").path
        if (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int == 0 { return "an empty coalition.sqlite (0 bytes)" }
        let look = try DatabaseQueue(path: path, configuration: Store.databaseConfiguration(readonly: true))
        defer { try? look.close() }
        return try look.read { try $0.tableExists("journal") } ? nil : "coalition.sqlite holds no journal (no tables)"
    }

    public struct CurrencyMismatch: Error, CustomStringConvertible {
        public let configured: String
        public let recorded: String
        public init(configured: String, recorded: String) {
            self.configured = configured
            self.recorded = recorded
        }
        public var description: String {
            "coalition.toml: currency: is \(configured), but this coalition settles in \(recorded) (recorded in coalition.sqlite); a coalition's currency never changes"
        }
    }

    /// The currencies of the closed runs (each its own, else the coalition's), for the books.
    public func runCurrencies() throws -> Set<String> {
        try coalition.read { db in
            let fallback = try Store.historicCurrency(db) ?? configuration.coalition.currency
            return Set(try String?.fetchAll(db, sql: "SELECT currency FROM run").map { $0 ?? fallback })
        }
    }

    /// The coalition's currency as its history has it: the recorded one, else the last run's
    /// (runs closed before v10), else nil (nothing settled yet).
    static func historicCurrency(_ db: Database) throws -> String? {
        try recordedCurrency(db) ?? lastRunInACurrency(db)?.currency
    }

    static func recordedCurrency(_ db: Database) throws -> String? {
        try String.fetchOne(db, sql: "SELECT currency FROM coalition_currency WHERE id = 1")
    }

    /// The last run that names a currency (runs closed before v10 without notices name none).
    static func lastRunInACurrency(_ db: Database) throws -> (run: String, currency: String)? {
        try Row.fetchOne(db, sql: "SELECT id, currency FROM run WHERE currency IS NOT NULL ORDER BY number DESC LIMIT 1")
            .map { (try $0.text(at: 0), try $0.text(at: 1)) }
    }

    /// The currency a data directory's history settles in (recorded, or its last run's), read
    /// without writing anything; nil when it has none yet (a new or an old coalition).
    public static func historicCurrency(dataDirectory: URL) throws -> String? {
        let pool = try DatabasePool(
            path: dataDirectory.appendingPathComponent("coalition.sqlite").path, configuration: databaseConfiguration(readonly: true))
        defer { try? pool.close() }
        return try pool.read(historic)
    }

    /// The recorded currency, else the last run's; nil for a new coalition, or one whose schema
    /// predates either record.
    private static func historic(_ db: Database) throws -> String? {
        let recorded = try db.tableExists("coalition_currency") ? try recordedCurrency(db) : nil
        return try recorded ?? (db.tableExists("run") && db.columns(in: "run").contains { $0.name == "currency" } ? lastRunInACurrency(db)?.currency : nil)
    }

    /// Refuses a configuration whose currency is not the history's; on a writable store,
    /// records it the first time (the history's, or the configured one for a new coalition).
    static func recordCurrency(_ db: DatabasePool, _ configured: String, write: Bool) throws {
        let recorded = try db.read(recordedCurrency)
        if let settled = try recorded ?? db.read(historic), settled != configured {
            throw CurrencyMismatch(configured: configured, recorded: settled)
        }
        if recorded == nil, write {
            try db.write { db in
                try db.execute(sql: "INSERT OR IGNORE INTO coalition_currency (id, currency) VALUES (1, ?)", arguments: [configured])
            }
        }
    }

    /// Migrates only when a migration is pending: a store opened by a verb that only reads
    /// then writes nothing (on a full disk, even an empty write transaction fails).
    ///
    /// Two processes may open a new database at once (`serve` and a `post` beside it, both the
    /// first to touch a new partner's ledger): both see a migration pending, one applies it,
    /// and the other's attempt fails on what the first made ("already exists") and rolls back.
    /// It then looks again: the schema is complete, or it applies what is still pending.
    static func migrateIfNeeded(_ db: DatabasePool, _ migrator: DatabaseMigrator) throws {
        for attempt in 1...Limits.databaseOpenAttemptsMax {
            if try db.read({ try migrator.hasCompletedMigrations($0) }) { return }
            let applied = try db.read { try migrator.appliedIdentifiers($0) }
            do {
                try migrator.migrate(db)
                return
            } catch {
                // Tried again only when another process applied migrations meanwhile; any
                // other failure (a full disk, a damaged file) is this one's, reported at once.
                let now = try? db.read { try migrator.appliedIdentifiers($0) }
                guard attempt < Limits.databaseOpenAttemptsMax, let now, now.count > applied.count else { throw error }
                Thread.sleep(forTimeInterval: 0.02 * Double(attempt))
            }
        }
    }

    /// Refuses a database that a newer Clearhouse has migrated further than this binary
    /// knows: this one would write it by rules that no longer hold (since v7, for instance,
    /// the writer must list the expired lots a reversal gives points back to).
    static func refuseNewerSchema(_ db: some DatabaseWriter, _ migrator: DatabaseMigrator, _ name: String) throws {
        // Before migrating (a new database has no migrations: nothing to refuse).
        let unknown = try db.read(migrator.appliedIdentifiers).subtracting(migrator.migrations)
        if !unknown.isEmpty {
            throw StoreError("\(name) was migrated by a newer Clearhouse (\(unknown.sorted().joined(separator: ", "))); run that version, not this one")
        }
    }

    /// Process-wide SQLite settings, made once, before the first connection opens.
    ///
    /// Memory statistics off: with them on (SQLite's default), every allocation SQLite makes
    /// takes one process-wide mutex, which the decider, the ledger stage and the checkpointer
    /// (three threads allocating all the time) contend for; off, the ledger benchmark posts
    /// 12 to 18 % more per second (docs/BENCHMARKS.md). Nothing here reads the statistics.
    /// If SQLite was already initialized (by a library that opened a database first), the
    /// setting is refused and stays as it was: a cost in speed, never in correctness.
    ///
    /// Then the WAL-gathering VFS layer becomes SQLite's default (`wal_buffer.c`): every
    /// connection opened after goes through it, and gathers nothing until `openWritable` asks
    /// for it on the coalition's writer. If it cannot be registered, nothing is gathered.
    static let configureSQLite: Void = {
        _ = ch_sqlite_disable_memstatus()
        _ = ch_wal_buffer_register()
    }()

    /// - Parameter cacheKiB: the page cache of each connection. Memory is bounded by it: it
    ///   must not be large for the many ledger connections.
    static func databaseConfiguration(readonly: Bool = false, cacheKiB: Int = Limits.ledgerCacheKiBMax) -> GRDB.Configuration {
        var c = GRDB.Configuration()
        c.busyMode = .timeout(TimeInterval(Limits.databaseBusyTimeoutSecondsMax))
        c.readonly = readonly
        c.prepareDatabase { db in
            // WAL with a full fsync at every commit: a commit that returned is on disk.
            if !db.configuration.readonly {
                try db.execute(sql: "PRAGMA synchronous = FULL")
            }
            // A batch dirties many pages (journal, indexes, lots, members). With SQLite's
            // default 2 MiB cache they spill to the WAL mid-transaction, page by page; a
            // larger cache keeps a batch in memory until its single COMMIT.
            try db.execute(sql: "PRAGMA cache_size = -\(cacheKiB)")
            // temp_store stays at its default (files): SQLite's sorter for GROUP BY (settlement)
            // is three times slower in memory here, and the writer's fast path needs no
            // statement journals.
        }
        return c
    }

    /// A database for writing: WAL, and `synchronous = FULL` on its writer connection, checked.
    ///
    /// GRDB's `DatabasePool` sets `synchronous = NORMAL` on its writer when it turns WAL on,
    /// after `prepareDatabase` ran; under NORMAL a WAL commit is not fsynced (it survives a
    /// crash of the process, not of the machine). So FULL is set again here, on the writer
    /// itself, and read back: a store whose commits are not durable does not open.
    ///
    /// - Parameter walBufferBytes: when not 0, the writer's WAL writes are gathered in a
    ///   buffer of this size and written out at each commit's fsync (FULL, above), and in any
    ///   case before the commit is published to other connections (`CSQLiteConfig/wal_buffer.c`):
    ///   what a returned commit leaves on disk is what it would be without gathering.
    static func openWritable(_ url: URL, cacheKiB: Int, walBufferBytes: Int = 0) throws -> DatabasePool {
        // A new file is switched to WAL as it opens, which needs the file to itself: another
        // process opening it at the same instant makes that busy (SQLite does not wait for it).
        // Only a busy that came at once is that race: one that waited out the busy timeout is a
        // lock held for long (a stopped process), reported after that one wait.
        var attempt = 0
        var opened: DatabasePool?
        while opened == nil {
            attempt += 1
            let started = ContinuousClock.now
            do {
                opened = try DatabasePool(path: url.path, configuration: databaseConfiguration(cacheKiB: cacheKiB))
            } catch let error as DatabaseError
                where error.resultCode == .SQLITE_BUSY && attempt < Limits.databaseOpenAttemptsMax && ContinuousClock.now - started < .seconds(1)
            {
                Thread.sleep(forTimeInterval: 0.02 * Double(attempt))
            }
        }
        let pool = opened!
        try pool.writeWithoutTransaction { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
            let level = try Int.fetchOne(db, sql: "PRAGMA synchronous")
            guard level == 2 else { throw StoreError("\(url.path): synchronous is \(level ?? -1), not FULL (2)") }
            if walBufferBytes > 0 {
                // Refused (SQLITE_NOTFOUND) only when the layer could not be registered: then
                // the WAL is written as SQLite writes it, slower, not less safely.
                _ = ch_wal_buffer_enable(db.sqliteConnection, Int32(clamping: walBufferBytes))
            }
        }
        return pool
    }

    /// The coalition writer's WAL gathering since open: WAL writes gathered, and the writes
    /// that carried them to the file (both 0 when gathering is off).
    public func coalitionWALGathering() -> (gathered: Int, flushes: Int) {
        coalition.writeWithoutTransaction(gathering)
    }

    /// The WAL gathering of this connection since it opened.
    func gathering(_ db: Database) -> (gathered: Int, flushes: Int) {
        var gathered: Int64 = 0, flushes: Int64 = 0
        _ = ch_wal_buffer_stats(db.sqliteConnection, &gathered, &flushes)
        return (Int(gathered), Int(flushes))
    }

    /// For tests: undoing the savepoint of the next `count` postings that fail in storage fails
    /// too, as SQLite's `ROLLBACK TO` could (no memory, an I/O error reading the sub-journal).
    func failSavepointUndos(_ count: Int) {
        writerState.withLock { $0.savepointUndoFailuresToInject = count }
    }

    func injectedSavepointUndoFailure() throws {
        let fail = writerState.withLock { w in
            guard w.savepointUndoFailuresToInject > 0 else { return false }
            w.savepointUndoFailuresToInject -= 1
            return true
        }
        if fail { throw StoreError("undoing the savepoint failed (injected)") }
    }

    /// For tests: the next `count` writes of the coalition writer's WAL buffer fail as an I/O
    /// error would.
    func failCoalitionWALFlushes(_ count: Int32) {
        coalition.writeWithoutTransaction { db in _ = ch_wal_buffer_fail_flushes(db.sqliteConnection, count) }
    }

    /// The `synchronous` level of each writer connection (coalition, then open ledgers):
    /// 2 (FULL) for every one.
    public func synchronousLevels() throws -> [String: Int] {
        var levels = ["coalition": try coalition.writeWithoutTransaction { try Int.fetchOne($0, sql: "PRAGMA synchronous") ?? -1 }]
        try ledgers.withLock { open in
            for (partner, db) in open {
                levels[partner.rawValue] = try db.writeWithoutTransaction { try Int.fetchOne($0, sql: "PRAGMA synchronous") ?? -1 }
            }
        }
        return levels
    }

    /// Checkpoints of the coalition's WAL since open: in the background, and by the writer
    /// at `Limits.coalitionWALFramesMax`.
    public var checkpointCounts: (background: Int, synchronous: Int) { checkpointer?.counts ?? (0, 0) }

    /// Pages the writer's commits have appended to the coalition's WAL since open (statistics).
    public var coalitionWALFramesWritten: Int { checkpointer?.framesWritten ?? 0 }

    /// How many batches the writer decided again because its lot cache disagreed with a
    /// member's `open_points` (a bug, or a write to lots behind the cache's back; 0 expected).
    public var lotCacheMismatches: Int { lotCacheMismatchCounter.load(ordering: .relaxed) }

    /// Compares the writer's lot cache with `coalition.sqlite`, member by member (for tests);
    /// throws on the first disagreement. Returns how many members were compared.
    public func checkLotCache() throws -> Int {
        try coalition.writeWithoutTransaction { db in
            guard let cache = lotCache.withLock({ $0 }) else { return 0 }
            let members = cache.members
            for member in members {
                let stored = try Lookup.openLots(db, member)
                if cache.cached(member) != stored {
                    throw StoreError("lot cache of \(member): \(cache.cached(member) ?? []) but the database has \(stored)")
                }
            }
            return members.count
        }
    }

    /// Commits (journal and ledgers) since open: each is one fsync of a WAL file.
    public var commitCount: Int { commitCounter.load(ordering: .relaxed) }

    // MARK: Ledgers

    public func ledgerURL(_ partner: PartnerID) -> URL {
        dataDirectory.appendingPathComponent("ledgers").appendingPathComponent("\(partner.rawValue).sqlite")
    }

    /// The ledger of a partner, opened (and created) on first use.
    func ledger(_ partner: PartnerID) throws -> DatabasePool {
        try ledgers.withLock { open in
            if let db = open[partner] { return db }
            let db: DatabasePool
            do {
                db = readOnly
                    ? try DatabasePool(path: ledgerURL(partner).path, configuration: Store.databaseConfiguration(readonly: true))
                    : try Store.openWritable(ledgerURL(partner), cacheKiB: Limits.ledgerCacheKiBMax)
            } catch {
                // Named, with the way out: the journal holds every entry of a ledger.
                throw StoreError("ledgers/\(partner.rawValue).sqlite cannot be opened (\(error)); if it is damaged, move it aside: the next start rebuilds it from the journal (docs/OPERATIONS.md)")
            }
            if readOnly {
                open[partner] = db
                return db
            }
            try Store.refuseNewerSchema(db, Schema.ledger, "ledgers/\(partner.rawValue).sqlite")
            try Store.migrateIfNeeded(db, Schema.ledger)
            try db.write { db in
                try db.execute(
                    sql: "INSERT OR IGNORE INTO ledger_info (id, partner, genesis_hash) VALUES (1, ?, ?)",
                    arguments: [partner.rawValue, Data(Store.genesisHash(partner))])
                let owner = try String.fetchOne(db, sql: "SELECT partner FROM ledger_info WHERE id = 1")
                guard owner == partner.rawValue else {
                    throw StoreError("\(ledgerURL(partner).path) is the ledger of \(owner ?? "nobody"), not \(partner)")
                }
            }
            open[partner] = db
            return db
        }
    }

    /// The hash a partner's chain starts from.
    public static func genesisHash(_ partner: PartnerID) -> [UInt8] {
        Array(SHA256.hash(data: Array("clearhouse.ledger.v1:\(partner.rawValue)".utf8)))
    }

    /// `SHA-256(previous hash ‖ canonical bytes of the entry)`.
    public static func chainHash(previous: [UInt8], entry: Entry) -> [UInt8] {
        var h = SHA256()
        // Through the buffers, and the digest copied out whole: the generic paths (a byte
        // iterator for the digest) cost several times the hashing itself.
        previous.withUnsafeBytes { h.update(bufferPointer: $0) }
        entry.canonicalBytes.withUnsafeBytes { h.update(bufferPointer: $0) }
        return h.finalize().withUnsafeBytes { Array($0) }
    }

    // MARK: Recovery

    /// Copies every journal entry that its partner's ledger lacks into that ledger, in
    /// sequence order. Refuses to go on when a ledger holds more than the journal (that is not
    /// a crash; it is damage, and an operator must restore).
    public func recover() throws {
        for (partner, last) in try partnersToRecover() {
            // A ledger file missing or empty (0 bytes) is rebuilt whole from the journal: said
            // as a warning, which every verb prints. A crash during a partner's very first batch
            // leaves it so too (its file not made yet); otherwise the file was lost or replaced.
            let size = (try? FileManager.default.attributesOfItem(atPath: ledgerURL(partner).path))?[.size] as? Int
            try requireSameHistory(partner, through: last)
            let copied = try catchUpLedger(partner, through: last)
            if copied > 0 && (size ?? 0) == 0 {
                logger.warning("ledger file was missing or empty: rebuilt from the journal", metadata: [
                    "partner": "\(partner)", "file": "\(ledgerURL(partner).path)", "entries": "\(copied)",
                    "cause": "a crash during the partner's first batch, or the file was lost or replaced"])
            } else if copied > 0 {
                logger.notice("recovered ledger entries", metadata: ["partner": "\(partner)", "entries": "\(copied)"])
            }
        }
        writerState.withLock { $0.laggingLedgers = [] }
    }

    /// Copies into every ledger what the journal holds beyond it: entries another process
    /// (`clearhouse post` beside `serve`) decided and did not copy before it died. The writer's
    /// ledger stage calls this when it has been idle a while (`PostingWriter`), so that such a
    /// ledger does not wait for its partner's next posting (or the next start) to be whole.
    /// Nothing for a writer stopped at a fault point or closed. Returns the entries copied; a
    /// failure is logged and left for the next time.
    @discardableResult
    public func catchUpLedgersBehind() -> Int {
        if writerState.withLock({ $0.crashed || $0.closed }) { return 0 }
        var copied = 0
        do {
            for (partner, last) in try partnersToRecover() where last > 0 && configuration.partners[partner] != nil {
                let n = try catchUpLedger(partner, through: last)  // one read when the ledger is whole
                if n > 0 {
                    logger.notice("ledger caught up from the journal (another process decided these entries and did not copy them)",
                                  metadata: ["partner": "\(partner)", "entries": "\(n)"])
                }
                copied += n
            }
            if idleCatchUpFailure.withLock({ $0.take() }) != nil {
                logger.notice("ledger catch-up works again")
            }
        } catch {
            let said = "\(error)"
            if idleCatchUpFailure.withLock({ last in defer { last = said }; return last != said }) {
                logger.error("ledger catch-up failed; tried again whenever the writer is idle (said again only if the error changes)",
                             metadata: ["error": "\(said)", "disk": "\(diskCondition() ?? "no trouble seen")"])
            }
        }
        return copied
    }

    /// The last sequence in a partner's ledger (0 when it holds none).
    private func ledgerHead(_ partner: PartnerID) throws -> Int64 {
        try ledger(partner).read { try Int64.fetchOne($0, sql: "SELECT MAX(sequence) FROM entry") } ?? 0
    }

    /// Every partner with a chain head in the journal, with its last sequence, and every
    /// partner with a ledger file, with 0 when the journal holds none of its entries: a ledger
    /// holding entries its journal does not know (the journal's `-wal` lost, an older journal
    /// copied back) must be refused, not taken as the start of a new history whose entries it
    /// would silently skip.
    func partnersToRecover() throws -> [(PartnerID, Int64)] {
        var heads: [PartnerID: Int64] = [:]
        for row in try coalition.read({ try Row.fetchAll($0, sql: "SELECT partner, last_sequence FROM partner_head") }) {
            guard let partner = PartnerID(row[0] as String) else { throw StoreError("coalition.sqlite names an invalid partner id") }
            heads[partner] = row[1]
        }
        // The configured partners' ledgers only: another file there (a copy kept by hand,
        // `fuelco-old.sqlite`) is no partner's ledger and is left alone, as before.
        for name in Store.ledgerFileNames(dataDirectory) {
            if let partner = Store.ledgerPartner(fileName: name), heads[partner] == nil,
                configuration.partners[partner] != nil
            {
                heads[partner] = 0
            }
        }
        return heads.sorted { $0.key.rawValue < $1.key.rawValue }.map { ($0.key, $0.value) }
    }

    /// Whether a data directory holds a journal (`coalition.sqlite`): one was ever opened there.
    public static func hasJournal(_ dataDirectory: URL) -> Bool {
        FileManager.default.fileExists(atPath: dataDirectory.appendingPathComponent("coalition.sqlite").path)
    }

    /// The ledger files (`<partner>.sqlite`) in a data directory's (or a backup's) `ledgers/`,
    /// sorted; none when it has no such directory.
    public static func ledgerFileNames(_ dataDirectory: URL) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dataDirectory.appendingPathComponent("ledgers").path)) ?? [])
            .filter { $0.hasSuffix(".sqlite") }.sorted()
    }

    /// The partner a ledger file (`<partner>.sqlite`) is named for; nil for another name.
    public static func ledgerPartner(fileName: String) -> PartnerID? {
        fileName.hasSuffix(".sqlite") ? PartnerID(String(fileName.dropLast(".sqlite".count))) : nil
    }

    /// A ledger and its journal must share their history: the ledger's last entry within the
    /// journal's (at most `last`) must be the journal's entry at that sequence, hash for hash.
    /// A ledger of the same length but another history (a file restored from another backup)
    /// would otherwise be taken as current, and the next posting committed to the journal but
    /// never to that ledger. The chain makes one comparison enough: each hash covers all before.
    func requireSameHistory(_ partner: PartnerID, through last: Int64) throws {
        let ledger = try ledger(partner)
        guard let row = try ledger.read({ db in
            try Row.fetchOne(db, sql: "SELECT sequence, hash FROM entry WHERE sequence <= ? ORDER BY sequence DESC LIMIT 1", arguments: [last])
        }) else { return }
        let sequence: Int64 = row[0]
        let hash: Data? = row[1]
        let journal = try coalition.read { db in
            try Data.fetchOne(db, sql: "SELECT hash FROM journal WHERE partner = ? AND sequence = ?", arguments: [partner.rawValue, sequence])
        }
        guard let hash, hash == journal else {
            throw StoreError(
                "ledger \(partner): its entry at sequence \(sequence) is not the journal's (another history: a file from another backup?); restore the data directory from one backup")
        }
    }

    /// The last sequence the journal holds for a partner (0 before its first entry).
    func journalHead(_ partner: PartnerID) throws -> Int64 {
        try coalition.read { db in
            try Int64.fetchOne(db, sql: "SELECT last_sequence FROM partner_head WHERE partner = ?", arguments: [partner.rawValue]) ?? 0
        }
    }

    /// Brings one ledger up to `through` from the journal. Returns how many entries it copied.
    @discardableResult
    func catchUpLedger(_ partner: PartnerID, through target: Int64) throws -> Int {
        let ledger = try ledger(partner)
        var copied = 0
        let last = target
        while true {
            let have = try ledger.read { db in try Int64.fetchOne(db, sql: "SELECT MAX(sequence) FROM entry") ?? 0 }
            if have > last {
                // Another process (serve, while this one starts) may have committed a batch to
                // the journal and appended it to the ledger since `last` was read: the ledger is
                // only ever written after the journal, so read the journal again now.
                let now = try journalHead(partner)
                guard now >= have else {
                    throw StoreError("ledger \(partner) holds sequence \(have) but the journal ends at \(now): restore from backup")
                }
                return copied
            }
            if have == last { return copied }
            let rows = try coalition.read { db in
                try JournalRow.fetchChained(db, partner: partner, after: have, limit: Limits.postingBatchMax)
            }
            guard !rows.isEmpty else {
                throw StoreError("journal of \(partner) ends before sequence \(last)")
            }
            try appendToLedger(ledger, rows)
            copied += rows.count
        }
    }

    /// Appends chained entries to a ledger in one transaction. Each carries the previous
    /// hash as the journal knows it; the ledger's trigger refuses it unless that equals the
    /// ledger's own last hash, so journal and ledger cannot silently diverge. Entries already
    /// there (another process copied them) are skipped.
    func appendToLedger(_ ledger: DatabasePool, _ entries: [ChainedEntry]) throws {
        try ledger.writeWithoutTransaction { db in
            try db.inTransaction(.immediate) {
                let have = try Int64.fetchOne(db.cachedStatement(sql: "SELECT MAX(sequence) FROM entry")) ?? 0
                var entries = entries
                if let first = entries.first, first.entry.sequence > have + 1 {
                    // Another process decided entries before ours and has not copied them yet
                    // (or died before it could): copy them from the journal first.
                    let missing = try coalition.read { c in
                        try JournalRow.fetchChained(c, partner: first.entry.partner, after: have, limit: Int(first.entry.sequence - have - 1))
                    }
                    entries = missing + entries
                }
                let insert = try FastStatement(
                    db,
                    """
                    INSERT INTO entry (sequence, journal_id, webhook_id, accepted_at_ms, kind, member, points,
                      reference, original_reference, occurred_at_ms, amount_minor, member_balance, prev_hash, hash)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """)
                for c in entries where c.entry.sequence > have {
                    let e = c.entry
                    try insert.bind(1, e.sequence); try insert.bind(2, e.journalID); try insert.bind(3, e.webhookID.rawValue)
                    try insert.bind(4, e.acceptedAt.millisecondsSinceEpoch); try insert.bind(5, Int64(e.event.kind.rawValue))
                    try insert.bind(6, e.event.member.rawValue); try insert.bind(7, e.event.points.value); try insert.bind(8, e.event.reference.rawValue)
                    try insert.bind(9, e.event.originalReference?.rawValue); try insert.bind(10, e.event.occurredAt?.millisecondsSinceEpoch)
                    try insert.bind(11, e.event.amountMinor?.value); try insert.bind(12, e.memberBalance.value)
                    try insert.bind(13, blob: c.previousHash); try insert.bind(14, blob: c.hash)
                    try insert.done()
                }
                return .commit
            }
        }
        commitCounter.add(1, ordering: .relaxed)
    }

    // MARK: Reads

    /// A member's spendable balance at `at` (default: now): the sum of its unexpired lots.
    /// A well-formed member that never earned has balance 0.
    public func balance(of member: MemberID, at: Instant? = nil) throws -> Points {
        let t = at ?? clock.now()
        return try coalition.read { db in try Store.spendableBalance(db, member: member, at: t) }
    }

    static func spendableBalance(_ db: Database, member: MemberID, at t: Instant) throws -> Points {
        let sum = try FastStatement(
            db,
            """
            SELECT COALESCE(SUM(o.remaining), 0) FROM lot_open o JOIN lot ON lot.id = o.lot_id
            WHERE o.member = ? AND (lot.expires_at_ms IS NULL OR lot.expires_at_ms > ?)
            """)
        try sum.bind(1, member.rawValue); try sum.bind(2, t.millisecondsSinceEpoch)
        defer { sum.finish() }
        guard try sum.step() else { throw StoreError("SUM returned no row") }
        return Points(try sum.int64(0))
    }

    /// Every entry of a partner's ledger, in sequence order (for tests and tools; statements
    /// stream instead).
    public func ledgerEntries(_ partner: PartnerID) throws -> [Entry] {
        try ledger(partner).read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM entry ORDER BY sequence").map {
                try JournalRow.entry(from: $0, partner: partner, journalID: $0["journal_id"])
            }
        }
    }

    /// Closes every database. A clean close checkpoints the WAL files.
    public func close() throws {
        let already = writerState.withLock { state in
            defer { state.closed = true }
            return state.closed
        }
        if already { return }
        // Checkpoint explicitly, so that a cleanly closed data directory is self-contained
        // files (no -wal to carry along in a copy).
        // Every step runs even when an earlier one fails (a ledger on a full disk must not
        // leave the coalition's connections and the checkpointer open); the first error is
        // thrown at the end.
        var firstError: (any Error)?
        func step(_ work: () throws -> Void) {
            do { try work() } catch { if firstError == nil { firstError = error } }
        }
        // Another process with the database open (serve beside a CLI verb) keeps the checkpoint
        // from finishing: nothing is lost (the WAL holds every commit, and that process or the
        // next start checkpoints it), so that is no error of this close.
        func checkpoint(_ db: DatabasePool) throws {
            do { _ = try db.writeWithoutTransaction { try $0.checkpoint(.truncate) } } catch let e as DatabaseError
                where e.resultCode == .SQLITE_BUSY || e.resultCode == .SQLITE_LOCKED {}
        }
        ledgers.withLock { open in
            for db in open.values {
                if !readOnly { step { try checkpoint(db) } }
                step { try db.close() }
            }
            open.removeAll()
        }
        if let checkpointer {
            coalition.writeWithoutTransaction { checkpointer.uninstall(from: $0) }
            step { try checkpointer.stop() }
        }
        if !readOnly { step { try checkpoint(coalition) } }
        step { try coalition.close() }
        if let firstError { throw firstError }
    }
}
