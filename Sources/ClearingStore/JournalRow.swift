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

    /// Builds an entry from a row; a row that does not make a valid entry is damage.
    static func entry(from row: Row, partner: PartnerID, journalID: Int64) throws -> Entry {
        let kindRaw: Int = row["kind"]
        let seq: Int64 = row["sequence"]
        guard let kind = EventKind(rawValue: kindRaw),
            let webhook = WebhookID(row["webhook_id"] as String),
            let member = MemberID(row["member"] as String),
            let reference = Reference(row["reference"] as String)
        else { throw StoreError("entry \(partner) #\(seq) does not decode") }
        let points: Int64 = row["points"]
        let originalText: String? = row["original_reference"]
        let original = originalText.flatMap(Reference.init)
        guard points >= Limits.pointsPerEventMin, points <= Limits.pointsPerEventMax,
            kind.isReversal == (original != nil)
        else { throw StoreError("entry \(partner) #\(seq) does not decode") }
        let occurred: Int64? = row["occurred_at_ms"]
        let amount: Int64? = row["amount_minor"]
        let event = Event(
            kind: kind, member: member, points: Points(points), reference: reference, originalReference: original,
            occurredAt: occurred.map { Instant(millisecondsSinceEpoch: $0) }, amountMinor: amount.map(MoneyMinor.init))
        return Entry(
            journalID: journalID, partner: partner, sequence: seq, webhookID: webhook,
            acceptedAt: Instant(millisecondsSinceEpoch: row["accepted_at_ms"]), event: event,
            memberBalance: Points(row["member_balance"]))
    }

    static func journalEntry(_ row: Row) throws -> (Entry, [UInt8]) {
        guard let partner = PartnerID(row["partner"] as String) else { throw StoreError("journal row with invalid partner") }
        let hash: Data = row["hash"]
        return (try entry(from: row, partner: partner, journalID: row["id"]), Array(hash))
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
