import ClearingDomain
import Foundation
import GRDB
import GRDBSQLite

/// Rows of one table exactly as SQLite holds them (row after row, `columns` values each), to be
/// inserted as they are: the ledger benchmark's ceiling, raw batched inserts of the rows a run
/// of the posting API wrote (`clearhouse-bench ledger`, docs/BENCHMARKS.md).
public struct RawRows: Sendable {
    public let table: String
    public let columns: Int
    public private(set) var values: [DatabaseValue] = []

    public init(table: String, columns: Int) {
        self.table = table
        self.columns = columns
    }

    public var count: Int { values.count / max(columns, 1) }

    public mutating func append(_ row: Row) {
        precondition(row.count == columns, "\(table): a row of \(row.count) values, not \(columns)")
        values.append(contentsOf: row.databaseValues)
    }
}

/// For the benchmark only (`@_spi(Benchmark) import ClearingStore`): these write on the
/// writer's own connections behind the posting API's back (the lot cache does not see them).
extension Store {
    /// Inserts the rows as they are into coalition.sqlite, tables in the order given, in one
    /// transaction on the posting writer's own connection (its settings, its WAL gathering, its
    /// checkpointer): what a batch costs when nothing is decided, looked up or updated. Every
    /// constraint, index and trigger of the schema applies; the commit is durable as a batch's.
    /// Returns how long each table's inserts took (the commit not included).
    @_spi(Benchmark) @discardableResult
    public func insertRaw(coalition tables: [RawRows]) throws -> [(table: String, time: Duration)] {
        precondition(!readOnly, "insertRaw on a read-only store")
        dropLotCache()
        var times: [(table: String, time: Duration)] = []
        try coalition.writeWithoutTransaction { db in
            try db.inTransaction(.immediate) {
                for rows in tables {
                    let started = ContinuousClock.now
                    try Store.insert(rows, into: db)
                    times.append((rows.table, ContinuousClock.now - started))
                }
                return .commit
            }
        }
        commitCounter.add(1, ordering: .relaxed)
        return times
    }

    /// The same into a partner's ledger (its chain trigger checks each entry against the last).
    @_spi(Benchmark) public func insertRaw(ledger partner: PartnerID, _ rows: RawRows) throws {
        try ledger(partner).writeWithoutTransaction { db in
            try db.inTransaction(.immediate) {
                try Store.insert(rows, into: db)
                return .commit
            }
        }
        commitCounter.add(1, ordering: .relaxed)
    }

    /// Opens (creating) a partner's ledger now, so that a first write does not pay for it.
    @_spi(Benchmark) public func openLedger(_ partner: PartnerID) throws {
        _ = try ledger(partner)
    }

    private static func insert(_ rows: RawRows, into db: Database) throws {
        guard rows.count > 0 else { return }
        let marks = Array(repeating: "?", count: rows.columns).joined(separator: ", ")
        let insert = try FastStatement(db, "INSERT INTO \(rows.table.quotedDatabaseIdentifier) VALUES (\(marks))")
        var i = 0
        while i < rows.values.count {
            for c in 0..<rows.columns { try insert.bind(Int32(c + 1), rows.values[i + c]) }
            try insert.done()
            i += rows.columns
        }
    }
}
