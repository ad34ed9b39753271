import ClearingDomain
import ClearingSimulation
@_spi(Benchmark) import ClearingStore
import Foundation
import GRDB
import GRDBSQLite

#if canImport(Glibc)
import Glibc
#endif

// clearhouse-bench ledger [--events N] [--partners N] [--members N] [--in-flight N] [--dir D]
//                        [--wal-buffer BYTES]  (0: the writer's WAL writes not gathered, for A/B runs)
//                        [--wal-frames-max N]  (the WAL's size at which the writer checkpoints itself)
//
// Posts a generated workload through the real posting API (group commit, durable) and then,
// in the same run, measures the ceiling: raw batched SQLite inserts of the same rows.

func option(_ name: String, _ fallback: Int) -> Int {
    let a = CommandLine.arguments
    if let i = a.firstIndex(of: name), i + 1 < a.count, let v = Int(a[i + 1]) { return v }
    return fallback
}

func stringOption(_ name: String, _ fallback: String) -> String {
    let a = CommandLine.arguments
    if let i = a.firstIndex(of: name), i + 1 < a.count { return a[i + 1] }
    return fallback
}

func peakRSSMiB() -> Int {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Int(u.ru_maxrss) / 1024
}

func currentRSSMiB() -> Int {
    guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let pages = Int(s.split(separator: " ")[1]) ?? 0
    return pages * Int(sysconf(Int32(_SC_PAGESIZE))) / (1024 * 1024)
}

/// CPU time of the whole process so far (user + system, all threads), in microseconds: on a
/// shared machine it varies less than wall time, which other tenants stretch.
func cpuMicroseconds() -> Int64 {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    func us(_ t: timeval) -> Int64 { Int64(t.tv_sec) * 1_000_000 + Int64(t.tv_usec) }
    return us(u.ru_utime) + us(u.ru_stime)
}

func seconds(since start: DispatchTime) -> Double {
    Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
}

if CommandLine.arguments.dropFirst().first == "settle-load" {
    let dir = URL(fileURLWithPath: stringOption("--dir", NSTemporaryDirectory() + "clearhouse-bench-settle-\(getpid())"))
    try? FileManager.default.removeItem(at: dir)
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    try SettleBench.load(entries: option("--entries", 10_000_000), partners: option("--partners", 100), members: option("--members", 1_000_000), dir: dir)
    exit(0)
}

let events = option("--events", 1_000_000)
let partnerCount = option("--partners", 20)
let members = option("--members", 100_000)
let inFlight = option("--in-flight", 8_192)
let seed = UInt64(option("--seed", 42))
let walBufferBytes = option("--wal-buffer", Limits.coalitionWALBufferBytes)
let walFramesMax = Int32(option("--wal-frames-max", Int(Limits.coalitionWALFramesMax)))
let dir = URL(fileURLWithPath: stringOption("--dir", NSTemporaryDirectory() + "clearhouse-bench-\(getpid())"))
try? FileManager.default.removeItem(at: dir)
try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)

var partners: [PartnerID: PartnerTerms] = [:]
for i in 1...partnerCount {
    let id = PartnerID(String(format: "partner-%02d", i))!
    partners[id] = PartnerTerms(
        id: id, name: "Partner \(i)", issuePricePer1000: MoneyMinor(1000), redeemCreditPer1000: MoneyMinor(900),
        webhookSecrets: [SecretBytes(Array(repeating: UInt8(i), count: 32))], apiTokenSHA256: Array(repeating: 0, count: 32),
        noticeURL: "https://127.0.0.1/\(i)", noticeSecret: SecretBytes(Array(repeating: UInt8(i), count: 32)))
}
let configuration = ClearingConfiguration(
    coalition: CoalitionTerms(currency: "EUR", pointsExpireAfterDays: 1095), partners: partners)
let start = SystemClock().now()

print("workload: \(events) postings, \(partnerCount) partners, \(members) members, \(inFlight) in flight")

// MARK: The posting API

let store = try Store(
    dataDirectory: dir.appendingPathComponent("store"), configuration: configuration, walFramesMax: walFramesMax, walBufferBytes: walBufferBytes)
let writer = PostingWriter(store: store, waitMax: nil)  // bounded by its own window
// With SQLite's memory statistics off (`Store.configureSQLite`), nothing counts its memory.
print("SQLite memory statistics: \(sqlite3_memory_used() == 0 ? "off" : "on (slower: a process-wide mutex on every allocation)")")
let window = DispatchSemaphore(value: inFlight)
final class Counts: @unchecked Sendable {
    let lock = NSLock()
    var created = 0, replayed = 0, refused = 0, unavailable = 0
}
let counts = Counts()
var rssSamples: [(Int, Int)] = []
let t0 = DispatchTime.now()
let cpu0 = cpuMicroseconds()
var n = 0
for p in IteratorSequence(DaySimulator(partners: configuration.partnerIDs, members: members, events: events, seed: seed, start: start)) {
    window.wait()
    writer.enqueue(Submission(partner: p.partner, webhookID: p.webhookID, event: p.event)) { o in
        counts.lock.lock()
        switch o {
        case .created: counts.created += 1
        case .replayed: counts.replayed += 1
        case .rejected(let problem): if problem.kind == .unavailable { counts.unavailable += 1 } else { counts.refused += 1 }
        }
        counts.lock.unlock()
        window.signal()
    }
    n += 1
    if n % (events / 4) == 0 { rssSamples.append((n, currentRSSMiB())) }
}
writer.shutdown()
let postingSeconds = seconds(since: t0)
let postingCPU = cpuMicroseconds() - cpu0
let stats = writer.batchStatistics
let commits = store.commitCount
let checkpoints = store.checkpointCounts
let walFrames = store.coalitionWALFramesWritten
let walBuffer = store.coalitionWALGathering()
try store.close()
let postingRate = Double(events) / postingSeconds
print(String(format: "posting API: %d postings in %.2f s = %.0f durable postings/s", events, postingSeconds, postingRate))
print(String(format: "  CPU: %.1f µs per posting (user + system, all threads: the workload's generator, the writer's two threads, the checkpointer)",
             Double(postingCPU) / Double(events)))
let threadCPU = writer.threadCPUTimes
print(String(format: "  of which the decider %.1f µs per posting, the ledger stage %.1f µs",
             Double(threadCPU.decider / .nanoseconds(1)) / 1e3 / Double(events), Double(threadCPU.ledgerStage / .nanoseconds(1)) / 1e3 / Double(events)))
print("  outcomes: \(counts.created) created, \(counts.replayed) replayed, \(counts.refused) refused, \(counts.unavailable) unavailable")
print(String(format: "  group commits: %d batches, %.0f postings per batch, largest %d", stats.batches, Double(stats.postings) / Double(stats.batches), stats.largest))
print(String(format: "  commits (one WAL fsync each): %d = %.2f per 1,000 postings", commits, Double(commits) * 1000 / Double(events)))
print("  coalition WAL checkpoints: \(checkpoints.background) in the background, \(checkpoints.synchronous) by the writer")
print(String(format: "  coalition WAL: %d pages written by commits = %.0f per group commit, %.2f per posting", walFrames,
             Double(walFrames) / Double(max(stats.batches, 1)), Double(walFrames) / Double(events)))
print(walBufferBytes == 0
    ? "  coalition WAL writes: not gathered (--wal-buffer 0)"
    : "  coalition WAL writes: \(walBuffer.gathered) gathered into \(walBuffer.flushes) writes of at most \(walBufferBytes / 1024) KiB")
print("  RSS while posting (postings: MiB): " + rssSamples.map { "\($0.0): \($0.1)" }.joined(separator: ", "))
print("  peak RSS: \(peakRSSMiB()) MiB")

// MARK: Reference points: the same rows, in batches of the same size, same durability settings

let batchSize = max(1, stats.postings / max(stats.batches, 1))
let hash = Data(repeating: 0xAB, count: 32)
let config: GRDB.Configuration = {
    var c = GRDB.Configuration()
    c.prepareDatabase { db in
        try db.execute(sql: "PRAGMA synchronous = FULL")
        try db.execute(sql: "PRAGMA cache_size = -\(Limits.coalitionCacheKiBMax)")
    }
    return c
}()

// MARK: The ceiling: the same rows, inserted raw

// Every row the posting run left on disk (the journal, members, lots, open lots, takes, moves,
// flows, partner heads, aliases in coalition.sqlite; the entries of every partner's ledger),
// inserted as they are into a new data directory with the same schema (every constraint,
// index and trigger), through the store's own writer connections (the same settings, WAL
// gathering and checkpointer), in transactions holding the rows of as many new entries as a
// group commit of the run created on average (the rows a posting wrote are found by the
// journal id in each table's key), the coalition on one thread and the ledgers on another
// (each batch's ledgers at once, as the writer's ledger stage does, but without waiting for
// the coalition's commits). Only the inserts are timed; the rows are read before. What this
// leaves out is the posting API's own work: its look-ups, decisions, the updates a row goes
// through before its final state, and queueing.

/// The column of each coalition table that holds the journal id of the posting that wrote
/// its row (a ledger entry's is `journal_id`). A table not named here with rows in it (flows,
/// partner heads: a few rows kept current) goes into the first transaction.
let postingKey = [
    "journal": "id", "lot": "id", "member": "first_journal_id", "lot_open": "lot_id", "lot_reopened": "lot_id",
    "lot_take": "redemption_id", "lot_move": "entry_id", "webhook_alias": "journal_id",
]
let readOnly: GRDB.Configuration = {
    var c = GRDB.Configuration()
    c.readonly = true
    return c
}()
let storeDir = dir.appendingPathComponent("store")
let sameRowsDir = dir.appendingPathComponent("same-rows")
let target = try Store(dataDirectory: sameRowsDir, configuration: configuration, walFramesMax: walFramesMax, walBufferBytes: walBufferBytes)
for p in configuration.partnerIDs { try target.openLedger(p) }
func tableNames(_ db: Database) throws -> [String] {
    try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'grdb_%'")
}
/// Tables with rows in a database.
func filledTables(_ db: Database) throws -> Set<String> {
    Set(try tableNames(db).filter { try Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM \($0.quotedDatabaseIdentifier))") == true })
}
// What opening a data directory writes (the currency, a ledger's genesis) is not the run's.
let setUp = try DatabaseQueue(path: sameRowsDir.appendingPathComponent("coalition.sqlite").path, configuration: readOnly).read(filledTables)
/// New entries per transaction: those of an average group commit of the run (refused and
/// replayed postings leave no row).
let entriesPerBatch = max(1, counts.created / max(stats.batches, 1))
let source = try DatabaseQueue(path: storeDir.appendingPathComponent("coalition.sqlite").path, configuration: readOnly)
let (postingBatches, sourceTables) = try source.read { db in
    (max(1, ((try Int.fetchOne(db, sql: "SELECT MAX(id) FROM journal") ?? 0) + entriesPerBatch - 1) / entriesPerBatch), try filledTables(db))
}
try source.close()
func batchOf(_ journalID: Int64) -> Int { min(postingBatches - 1, max(0, Int((journalID - 1) / Int64(entriesPerBatch)))) }

/// Reads every row of the tables into per-batch groups, `key` naming each table's posting key.
func readRows(_ path: URL, tables order: [String], key: (String) -> String?) throws -> [[RawRows]] {
    var batches = [[RawRows]](repeating: [], count: postingBatches)
    try DatabaseQueue(path: path.path, configuration: readOnly).read { db in
        for table in order {
            let columns = try db.columns(in: table).count
            var groups = [RawRows?](repeating: nil, count: postingBatches)
            let rows = try Row.fetchCursor(db, sql: "SELECT * FROM \(table.quotedDatabaseIdentifier)")
            while let row = try rows.next() {
                let b = key(table).map { batchOf(row[$0]) } ?? 0
                if groups[b] == nil { groups[b] = RawRows(table: table, columns: columns) }
                groups[b]!.append(row)
            }
            for (b, g) in groups.enumerated() { if let g { batches[b].append(g) } }
        }
    }
    return batches
}

let copiedTables = ["journal", "lot"].filter(sourceTables.contains) + sourceTables.subtracting(setUp).subtracting(["journal", "lot"]).sorted()
let coalitionBatches = try readRows(storeDir.appendingPathComponent("coalition.sqlite"), tables: copiedTables) { postingKey[$0] }
var ledgerBatches = [[(PartnerID, RawRows)]](repeating: [], count: postingBatches)
for partner in configuration.partnerIDs {
    let rows = try readRows(store.ledgerURL(partner), tables: ["entry"]) { _ in "journal_id" }
    for (b, groups) in rows.enumerated() { for g in groups { ledgerBatches[b].append((partner, g)) } }
}
let rowsPerTable = Dictionary(
    (coalitionBatches.joined().map { ($0.table, $0.count) }) + [("ledger entry", ledgerBatches.joined().reduce(0) { $0 + $1.1.count })],
    uniquingKeysWith: +)
let sameRows = rowsPerTable.values.reduce(0, +)

final class Failures: @unchecked Sendable {
    let lock = NSLock()
    var errors: [any Error] = []
    func add(_ e: any Error) { lock.lock(); errors.append(e); lock.unlock() }
}
let failures = Failures()
/// How long each coalition table's inserts took in the ceiling, over all its transactions.
final class TableTimes: @unchecked Sendable {
    let lock = NSLock()
    var times: [String: Duration] = [:]
    func add(_ table: String, _ time: Duration) { lock.lock(); times[table, default: .zero] += time; lock.unlock() }
}
let tableTimes = TableTimes()
let commits0 = target.commitCount
let t1 = DispatchTime.now()
let coalitionDone = DispatchSemaphore(value: 0)
Thread.detachNewThread {
    do {
        for b in coalitionBatches where !b.isEmpty {
            for (table, time) in try target.insertRaw(coalition: b) { tableTimes.add(table, time) }
        }
    } catch { failures.add(error) }
    coalitionDone.signal()
}
for b in ledgerBatches {
    // Each batch's ledgers at once, over the machine's cores: the fastest way to write them,
    // though the writer's ledger stage writes them one after another (it saves CPU for the
    // HTTP intake, and the writer is held by its decider, not its ledgers). A ceiling is what
    // the machine can do, not what the writer chose to do.
    DispatchQueue.concurrentPerform(iterations: b.count) { i in
        do { try target.insertRaw(ledger: b[i].0, b[i].1) } catch { failures.add(error) }
    }
}
coalitionDone.wait()
let sameRowsSeconds = seconds(since: t1)
let sameRowsCommits = target.commitCount - commits0
try target.close()
if let e = failures.errors.first { throw e }
let sameRowsRate = Double(events) / sameRowsSeconds
print(String(format: "ceiling (the same rows): the %d rows the run left, inserted raw in %d transactions (%d coalition) of %d entries' rows, in %.2f s = %.0f postings/s (%.0f rows/s)",
             sameRows, sameRowsCommits, coalitionBatches.filter { !$0.isEmpty }.count, entriesPerBatch, sameRowsSeconds, sameRowsRate,
             Double(sameRows) / sameRowsSeconds))
print("  rows: " + rowsPerTable.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
print(String(format: "ratio: posting API / ceiling (the same rows) = %.2f", postingRate / sameRowsRate))
print("  of which coalition.sqlite, by table (µs per posting, each table's inserts alone): " + tableTimes.times.sorted { $0.value > $1.value }
    .map { "\($0.key) " + String(format: "%.2f", Double($0.value / .nanoseconds(1)) / 1e3 / Double(events)) }.joined(separator: ", "))
try? FileManager.default.removeItem(at: sameRowsDir)

func entryTable(uniqueIndexes: Bool) -> String {
    """
    CREATE TABLE entry (id INTEGER PRIMARY KEY, partner TEXT NOT NULL, webhook_id TEXT NOT NULL, accepted_at_ms INTEGER NOT NULL,
      kind INTEGER NOT NULL, member TEXT NOT NULL, points INTEGER NOT NULL, reference TEXT NOT NULL,
      original_reference TEXT, occurred_at_ms INTEGER, amount_minor INTEGER, member_balance INTEGER NOT NULL, hash BLOB NOT NULL
      \(uniqueIndexes ? ", UNIQUE (partner, webhook_id), UNIQUE (partner, reference)" : ""))
    """
}

/// Regenerates the same workload and writes it with `insert`, one transaction per batch;
/// returns rows per second.
func measure(_ name: String, uniqueIndexes: Bool, _ insert: @escaping (Database, SimulatedPosting) throws -> Void) throws -> Double {
    let pool = try DatabasePool(path: dir.appendingPathComponent("\(name).sqlite").path, configuration: config)
    defer { try? pool.close() }
    // As the store does: GRDB's pool sets NORMAL on its writer after prepareDatabase.
    try pool.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
    try pool.write { db in try db.execute(sql: entryTable(uniqueIndexes: uniqueIndexes)) }
    let t = DispatchTime.now()
    var rows = 0
    var pending: [SimulatedPosting] = []
    func flush() throws {
        try pool.write { db in for p in pending { try insert(db, p) } }
        rows += pending.count
        pending.removeAll(keepingCapacity: true)
    }
    for p in IteratorSequence(DaySimulator(partners: configuration.partnerIDs, members: members, events: events, seed: seed, start: start)) {
        pending.append(p)
        if pending.count == batchSize { try flush() }
    }
    try flush()
    return Double(rows) / seconds(since: t)
}

func arguments(_ p: SimulatedPosting) -> StatementArguments {
    [
        p.partner.rawValue, p.webhookID.rawValue, start.millisecondsSinceEpoch, p.event.kind.rawValue, p.event.member.rawValue,
        p.event.points.value, p.event.reference.rawValue, p.event.originalReference?.rawValue,
        p.event.occurredAt?.millisecondsSinceEpoch, p.event.amountMinor?.value, 0, hash,
    ]
}

let insertSQL = "INSERT OR IGNORE INTO entry VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
let lookupSQL = "SELECT id FROM entry WHERE partner = ? AND (webhook_id = ? OR reference = ?)"

// The single-row ceiling (the one reported before the one above): one row per posting, into
// one table without indexes, in one file.
let rawRate = try measure("raw", uniqueIndexes: false) { db, p in
    try db.cachedStatement(sql: insertSQL).execute(arguments: arguments(p))
}
print(String(format: "single-row ceiling: one row per posting into one table without indexes, in batches of %d = %.0f rows/s", batchSize, rawRate))
print(String(format: "ratio: posting API / single-row ceiling = %.2f", postingRate / rawRate))

// Between the two: each row preceded by the idempotency lookup a posting must make, into a
// table with the journal's unique indexes: the least a posting costs before any lot, member
// or ledger work.
let indexedRate = try measure("indexed", uniqueIndexes: true) { db, p in
    _ = try Int64.fetchOne(db.cachedStatement(sql: lookupSQL), arguments: [p.partner.rawValue, p.webhookID.rawValue, p.event.reference.rawValue])
    try db.cachedStatement(sql: insertSQL).execute(arguments: arguments(p))
}
print(String(format: "reference: lookup + insert with the journal's unique indexes = %.0f rows/s (posting API / this = %.2f)", indexedRate, postingRate / indexedRate))

// The same through SQLite's C API, binding without GRDB's generic arguments.
nonisolated(unsafe) let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
func bindText(_ s: OpaquePointer?, _ i: Int32, _ v: String?) {
    if let v { sqlite3_bind_text(s, i, v, -1, transient) } else { sqlite3_bind_null(s, i) }
}
let directRate = try measure("direct", uniqueIndexes: true) { db, p in
    let look = try db.cachedStatement(sql: lookupSQL).sqliteStatement
    sqlite3_reset(look)
    bindText(look, 1, p.partner.rawValue); bindText(look, 2, p.webhookID.rawValue); bindText(look, 3, p.event.reference.rawValue)
    while sqlite3_step(look) == SQLITE_ROW {}
    let ins = try db.cachedStatement(sql: insertSQL).sqliteStatement
    sqlite3_reset(ins)
    bindText(ins, 1, p.partner.rawValue); bindText(ins, 2, p.webhookID.rawValue)
    sqlite3_bind_int64(ins, 3, start.millisecondsSinceEpoch); sqlite3_bind_int64(ins, 4, Int64(p.event.kind.rawValue))
    bindText(ins, 5, p.event.member.rawValue); sqlite3_bind_int64(ins, 6, p.event.points.value)
    bindText(ins, 7, p.event.reference.rawValue); bindText(ins, 8, p.event.originalReference?.rawValue)
    sqlite3_bind_null(ins, 9); sqlite3_bind_null(ins, 10); sqlite3_bind_int64(ins, 11, 0)
    _ = hash.withUnsafeBytes { sqlite3_bind_blob(ins, 12, $0.baseAddress, 32, transient) }
    guard sqlite3_step(ins) == SQLITE_DONE else { throw StoreError("insert failed") }
}
print(String(format: "reference through the C API: %.0f rows/s", directRate))
try? FileManager.default.removeItem(at: dir)
