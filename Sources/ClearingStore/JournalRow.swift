import ClearingDomain
import Foundation
import GRDB

/// An entry with the hashes that chain it: `hash = SHA-256(previousHash ‖ canonical bytes)`.
struct ChainedEntry: Sendable {
    var entry: Entry
    var previousHash: [UInt8]
    var hash: [UInt8]
}

/// Reading entries back from `journal` and ledger `entry` rows (same column names).
enum JournalRow {
    static let columns = """
        id, partner, sequence, webhook_id, accepted_at_ms, kind, member, points, reference,
        original_reference, occurred_at_ms, amount_minor, member_balance, hash
        """

    /// A column that is 1 when one of `columns` (text) holds a NUL byte. SQLite keeps the bytes
    /// after a NUL, but a text read stops at it: the entry decoded from such a row, and the hash
    /// recomputed from it, would be those of the row before the edit. No id the rules accept
    /// contains one, so a NUL is tampering (verify says so).
    static func nulInText(_ columns: [String]) -> String {
        "(" + columns.map { "instr(CAST(COALESCE(\($0), '') AS BLOB), x'00') > 0" }.joined(separator: " OR ") + ") AS \(nulInTextColumn)"
    }

    static let nulInTextColumn = "nul_in_text"

    /// Builds an entry from a row; a row that does not make a valid entry is damage, reported
    /// as an error (never a crash, even when a column holds a value of the wrong type).
    static func entry(from row: Row, partner: PartnerID, journalID: Int64) throws -> Entry {
        let seq = try row.int64("sequence")
        let bad = StoreError("entry \(partner) #\(seq) does not decode")
        guard let kind = EventKind(rawValue: Int(try row.int64("kind"))),
            let webhook = WebhookID(try row.text("webhook_id")),
            let member = MemberID(try row.text("member")),
            let reference = Reference(try row.text("reference"))
        else { throw bad }
        let points = try row.int64("points")
        // NULL when the event has none: a text that is no reference ('' included) is no more
        // "none" than it is a reference (read as none, it would hash and compare as the entry
        // before the edit).
        let original = try row.optionalText("original_reference").map { text in
            guard let reference = Reference(text) else { throw bad }
            return reference
        }
        guard points >= Limits.pointsPerEventMin, points <= Limits.pointsPerEventMax, kind.isReversal == (original != nil)
        else { throw bad }
        let occurred = try row.optionalInt64("occurred_at_ms")
        let amount = try row.optionalInt64("amount_minor")
        let event = Event(
            kind: kind, member: member, points: Points(points), reference: reference, originalReference: original,
            occurredAt: occurred.map { Instant(millisecondsSinceEpoch: $0) }, amountMinor: amount.map(MoneyMinor.init))
        return Entry(
            journalID: journalID, partner: partner, sequence: seq, webhookID: webhook,
            acceptedAt: Instant(millisecondsSinceEpoch: try row.int64("accepted_at_ms")), event: event,
            memberBalance: Points(try row.int64("member_balance")))
    }

    static func journalEntry(_ row: Row) throws -> (Entry, [UInt8]) {
        guard let partner = PartnerID(try row.text("partner")) else { throw StoreError("journal row with invalid partner") }
        return (try entry(from: row, partner: partner, journalID: try row.int64("id")), Array(try row.blob("hash")))
    }

    /// Up to `limit` journal entries of a partner after sequence `after`, each with the hash
    /// before it.
    static func fetchChained(_ db: Database, partner: PartnerID, after: Int64, limit: Int) throws -> [ChainedEntry] {
        var previous: [UInt8]
        if after == 0 {
            previous = Store.genesisHash(partner)
        } else {
            guard let h = try Data.fetchOne(
                db, sql: "SELECT hash FROM journal WHERE partner = ? AND sequence = ?", arguments: [partner.rawValue, after])
            else { throw StoreError("journal of \(partner) lacks sequence \(after)") }
            previous = Array(h)
        }
        let rows = try Row.fetchAll(
            db,
            sql: "SELECT \(columns) FROM journal WHERE partner = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            arguments: [partner.rawValue, after, limit])
        var out: [ChainedEntry] = []
        out.reserveCapacity(rows.count)
        for row in rows {
            let (e, h) = try journalEntry(row)
            out.append(ChainedEntry(entry: e, previousHash: previous, hash: h))
            previous = h
        }
        return out
    }
}

/// Typed column reads that throw instead of stopping the process when a column holds a value
/// of the wrong type (a damaged or hand-edited file), so that verify reports it as a breach.
extension Row {
    /// The column's value; a column the row lacks (a schema altered or damaged) throws, where
    /// GRDB's subscript would stop the process.
    private func value(_ column: String) throws -> DatabaseValue {
        guard hasColumn(column) else { throw StoreError("column \(column) is missing") }
        return self[column]
    }

    func int64(_ column: String) throws -> Int64 { try Row.int64(value(column), "column \(column)") }
    func optionalInt64(_ column: String) throws -> Int64? { try value(column).isNull ? nil : try int64(column) }
    func text(_ column: String) throws -> String { try Row.text(value(column), "column \(column)") }
    func optionalText(_ column: String) throws -> String? { try value(column).isNull ? nil : try text(column) }
    func blob(_ column: String) throws -> Data { try Row.blob(value(column), "column \(column)") }

    // The same by position, for `verify`: a value of another type (a file altered or damaged)
    // throws, and is reported as a breach, where GRDB's own subscripts would stop the process.

    func int64(at index: Int) throws -> Int64 { try Row.int64(self[index], column(index)) }
    func optionalInt64(at index: Int) throws -> Int64? { (self[index] as DatabaseValue).isNull ? nil : try int64(at: index) }
    func text(at index: Int) throws -> String { try Row.text(self[index], column(index)) }
    func blob(at index: Int) throws -> Data { try Row.blob(self[index], column(index)) }

    private func column(_ index: Int) -> String {
        let names = Array(columnNames)
        return index < names.count ? "column \(names[index])" : "column \(index)"
    }

    // One decoding of each type, whichever way the column was found (`what` names it).

    /// An integer as stored: a real (1.5 where 1 was) is not one. GRDB's own decoding rounds
    /// it toward zero, so an entry edited from 1 to 1.5 point would read, hash and replay as
    /// the entry it was. (A column of integer affinity keeps an integral real as an integer,
    /// so no value this store wrote is refused.)
    private static func int64(_ value: DatabaseValue, _ what: @autoclosure () -> String) throws -> Int64 {
        guard case .int64(let v) = value.storage else { throw StoreError("\(what()) is not an integer") }
        return v
    }

    private static func text(_ value: DatabaseValue, _ what: @autoclosure () -> String) throws -> String {
        guard case .string(let s) = value.storage else { throw StoreError("\(what()) is not text") }
        return s
    }

    private static func blob(_ value: DatabaseValue, _ what: @autoclosure () -> String) throws -> Data {
        guard case .blob(let d) = value.storage else { throw StoreError("\(what()) is not a blob") }
        return d
    }
}

