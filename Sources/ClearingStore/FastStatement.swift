import Foundation
import GRDB
import GRDBSQLite

/// One of the writer's hot statements, prepared once by GRDB (its statement cache) and bound,
/// stepped and read through SQLite's C API.
///
/// Measured on the posting path: GRDB's `StatementArguments` (an array of existentials,
/// boxed into `DatabaseValue`s) and its row objects cost about a third of the writer's time;
/// the same statements bound directly run 1.4 to 1.5 times faster (docs/BENCHMARKS.md). Only
/// the writer's per-posting statements use this; everything else stays on GRDB's API.
///
/// Use it within one GRDB access (`write`, `read`) on the connection it was made from, and
/// finish with `done()`/`row()` before the next use: the statement is reset on creation.
struct FastStatement {
    private let db: Database
    /// Held so that the prepared statement lives as long as this value, whatever GRDB's cache does.
    private let prepared: Statement
    private let statement: SQLiteStatement

    init(_ db: Database, _ sql: String) throws {
        self.init(db, prepared: try db.cachedStatement(sql: sql))
    }

    /// A statement already prepared on `db` (``WriterStatements``).
    init(_ db: Database, prepared: Statement) {
        self.db = db
        self.prepared = prepared
        statement = prepared.sqliteStatement
        sqlite3_reset(statement)
        sqlite3_clear_bindings(statement)
    }

    // MARK: Binding (1-based, as SQLite numbers parameters)

    func bind(_ i: Int32, _ value: Int64) throws {
        try check(sqlite3_bind_int64(statement, i, value))
    }

    func bind(_ i: Int32, _ value: Int64?) throws {
        if let value { try bind(i, value) } else { try check(sqlite3_bind_null(statement, i)) }
    }

    func bind(_ i: Int32, _ value: String) throws {
        var value = value
        let code = value.withUTF8 { utf8 in
            utf8.withMemoryRebound(to: CChar.self) { text in
                sqlite3_bind_text(statement, i, text.baseAddress ?? FastStatement.empty, Int32(text.count), FastStatement.transient)
            }
        }
        try check(code)
    }

    func bind(_ i: Int32, _ value: String?) throws {
        if let value { try bind(i, value) } else { try check(sqlite3_bind_null(statement, i)) }
    }

    func bind(_ i: Int32, blob: [UInt8]) throws {
        let code = blob.withUnsafeBytes { bytes in
            sqlite3_bind_blob(statement, i, bytes.baseAddress ?? UnsafeRawPointer(FastStatement.empty), Int32(bytes.count), FastStatement.transient)
        }
        try check(code)
    }

    /// Any value as it is (`RawRows`).
    func bind(_ i: Int32, _ value: DatabaseValue) throws {
        switch value.storage {
        case .null: try check(sqlite3_bind_null(statement, i))
        case .int64(let v): try bind(i, v)
        case .double(let v): try check(sqlite3_bind_double(statement, i, v))
        case .string(let v): try bind(i, v)
        case .blob(let v):
            let code = v.withUnsafeBytes { bytes in
                sqlite3_bind_blob(statement, i, bytes.baseAddress ?? UnsafeRawPointer(FastStatement.empty), Int32(bytes.count), FastStatement.transient)
            }
            try check(code)
        }
    }

    /// A failed bind (out of memory, too big, a wrong index) is an error, never ignored.
    private func check(_ code: Int32) throws {
        guard code == SQLITE_OK else { throw error(code) }
    }

    // MARK: Stepping

    /// Runs a statement that returns no row (INSERT, UPDATE); throws SQLite's error, as GRDB
    /// would (constraint violations included).
    func done() throws {
        let code = sqlite3_step(statement)
        defer { sqlite3_reset(statement) }
        guard code == SQLITE_DONE else { throw error(code) }
    }

    /// Steps once: true when a row is there to read, false when the statement is done.
    func step() throws -> Bool {
        let code = sqlite3_step(statement)
        switch code {
        case SQLITE_ROW: return true
        case SQLITE_DONE: return false
        default:
            sqlite3_reset(statement)
            throw error(code)
        }
    }

    /// Ends a statement whose rows were read (or not wanted).
    func finish() {
        sqlite3_reset(statement)
    }

    /// Steps once and reads the row with `read`, or nil when there is none; finished either way.
    func oneRow<T>(_ read: (FastStatement) throws -> T) throws -> T? {
        defer { finish() }
        guard try step() else { return nil }
        return try read(self)
    }

    // MARK: Reading the current row (0-based columns)

    func isNull(_ column: Int32) -> Bool {
        sqlite3_column_type(statement, column) == SQLITE_NULL
    }

    /// An integer column; anything else (a damaged file) is an error, not a crash.
    func int64(_ column: Int32) throws -> Int64 {
        guard sqlite3_column_type(statement, column) == SQLITE_INTEGER else {
            throw StoreError("column \(column) of `\(String(cString: sqlite3_sql(statement)))` is not an integer")
        }
        return sqlite3_column_int64(statement, column)
    }

    func optionalInt64(_ column: Int32) throws -> Int64? {
        isNull(column) ? nil : try int64(column)
    }

    func text(_ column: Int32) throws -> String {
        guard sqlite3_column_type(statement, column) == SQLITE_TEXT, let p = sqlite3_column_text(statement, column) else {
            throw StoreError("column \(column) of `\(String(cString: sqlite3_sql(statement)))` is not text")
        }
        let n = Int(sqlite3_column_bytes(statement, column))
        return String(decoding: UnsafeBufferPointer(start: p, count: n), as: UTF8.self)
    }

    private func error(_ code: Int32) -> DatabaseError {
        DatabaseError(
            resultCode: ResultCode(rawValue: code), message: String(cString: sqlite3_errmsg(db.sqliteConnection)),
            sql: String(cString: sqlite3_sql(statement)))
    }

    private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
    /// A valid pointer for an empty text or blob (a null one would bind NULL).
    nonisolated(unsafe) private static let empty: UnsafePointer<CChar> = {
        let p = UnsafeMutablePointer<CChar>.allocate(capacity: 1)
        p.initialize(to: 0)
        return UnsafePointer(p)
    }()
}

/// The writer's per-posting statements during one batch, each looked up in GRDB's statement
/// cache once per batch rather than at every use: that look-up hashes the whole SQL text, and
/// with several statements per posting it came to about 3 % of the decider's time.
///
/// Made inside the batch's access to the writer connection and dropped with it (the
/// statements stay owned by GRDB's cache, which finalizes them when the connection closes).
final class WriterStatements {
    enum Key: Int, CaseIterable {
        case insertJournal, insertLot, insertOpenLot, deleteOpenLot, updateOpenLot
        case updateMemberFrom, addToMember, insertMember, insertTake, insertMove, selectOpenLots, selectOriginal, existsEarlier
        // The reversals'.
        case selectLotLeft, addToLotReversed, selectTakes, selectLotExpiry, addToTakeReturned, returnToOpenLot, insertReopened

        var sql: String {
            switch self {
            case .insertJournal:
                """
                INSERT INTO journal (id, partner, sequence, webhook_id, accepted_at_ms, kind, member, points, reference,
                  original_reference, occurred_at_ms, amount_minor, member_balance, hash)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """
            case .insertLot: "INSERT INTO lot (id, member, issuer, points, expires_at_ms) VALUES (?, ?, ?, ?, ?)"
            case .insertOpenLot: "INSERT INTO lot_open (member, lot_id, remaining) VALUES (?, ?, ?)"
            case .deleteOpenLot: "DELETE FROM lot_open WHERE member = ? AND lot_id = ? AND remaining = ?"
            case .updateOpenLot: "UPDATE lot_open SET remaining = ? WHERE member = ? AND lot_id = ? AND remaining = ?"
            case .updateMemberFrom: "UPDATE member SET open_points = ? WHERE member = ? AND open_points = ?"
            case .addToMember: "UPDATE member SET open_points = open_points + ? WHERE member = ?"
            case .insertMember: "INSERT INTO member (member, first_journal_id, open_points) VALUES (?, ?, ?)"
            case .insertTake: "INSERT INTO lot_take (redemption_id, position, lot_id, issuer, points) VALUES (?, ?, ?, ?, ?)"
            case .insertMove: "INSERT INTO lot_move (entry_id, position, lot_id, issuer, redeemer, points) VALUES (?, ?, ?, ?, ?, ?)"
            case .selectOpenLots:
                """
                SELECT o.lot_id, lot.issuer, o.remaining, lot.expires_at_ms FROM lot_open o JOIN lot ON lot.id = o.lot_id
                WHERE o.member = ? ORDER BY o.lot_id
                """
            case .selectOriginal: "SELECT id, sequence, kind, member FROM journal WHERE partner = ? AND reference = ?"
            case .existsEarlier:
                // Probes of three unique indexes, no table row read.
                """
                SELECT EXISTS (SELECT 1 FROM journal WHERE partner = ?1 AND webhook_id = ?2)
                  OR EXISTS (SELECT 1 FROM journal WHERE partner = ?1 AND reference = ?3)
                  OR EXISTS (SELECT 1 FROM webhook_alias WHERE partner = ?1 AND webhook_id = ?2)
                """
            case .selectLotLeft:
                """
                SELECT COALESCE(o.remaining, 0), lot.expires_at_ms FROM lot
                LEFT JOIN lot_open o ON o.member = lot.member AND o.lot_id = lot.id
                WHERE lot.id = ?
                """
            case .addToLotReversed: "UPDATE lot SET reversed = reversed + ? WHERE id = ?"
            case .selectTakes: "SELECT lot_id, issuer, points, returned FROM lot_take WHERE redemption_id = ? ORDER BY position"
            case .selectLotExpiry: "SELECT expires_at_ms FROM lot WHERE id = ?"
            case .addToTakeReturned: "UPDATE lot_take SET returned = returned + ? WHERE redemption_id = ? AND position = ?"
            case .returnToOpenLot:
                """
                INSERT INTO lot_open (member, lot_id, remaining) VALUES (?, ?, ?)
                ON CONFLICT (member, lot_id) DO UPDATE SET remaining = remaining + excluded.remaining
                """
            case .insertReopened: "INSERT OR IGNORE INTO lot_reopened (lot_id) VALUES (?)"
            }
        }
    }

    let db: Database
    private var prepared: [Statement?] = Array(repeating: nil, count: Key.allCases.count)

    init(_ db: Database) {
        self.db = db
    }

    /// The statement, reset and with no bindings.
    func callAsFunction(_ key: Key) throws -> FastStatement {
        if let statement = prepared[key.rawValue] { return FastStatement(db, prepared: statement) }
        let statement = try db.cachedStatement(sql: key.sql)
        prepared[key.rawValue] = statement
        return FastStatement(db, prepared: statement)
    }
}
