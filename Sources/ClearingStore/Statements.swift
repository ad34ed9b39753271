import ClearingDomain
import Foundation
import GRDB

/// One line of a partner's list of statements.
public struct StatementSummary: Equatable, Sendable {
    public var run: String
    public var cutoff: Instant
    public var netMinor: MoneyMinor
}

extension Store {
    /// The runs in which a partner has figures, oldest first.
    public func statements(for partner: PartnerID) throws -> [StatementSummary] {
        try coalition.read { db in
            try Row.fetchAll(
                db,
                sql: """
                    SELECT r.id, r.cutoff_ms, rp.net_minor FROM run_partner rp JOIN run r ON r.number = rp.run_number
                    WHERE rp.partner = ? ORDER BY r.number
                    """,
                arguments: [partner.rawValue]
            ).map {
                StatementSummary(
                    run: try $0.text("id"), cutoff: Instant(millisecondsSinceEpoch: try $0.int64("cutoff_ms")),
                    netMinor: MoneyMinor(try $0.int64("net_minor")))
            }
        }
    }

    /// A partner's statement of a run, or nil when there is no such run. A partner with
    /// nothing in an existing run gets an empty statement with zero figures.
    public func statement(for partner: PartnerID, run runID: String) throws -> StatementHeader? {
        try coalition.read { db -> StatementHeader? in
            guard let run = try Row.fetchOne(db, sql: "SELECT number, id, cutoff_ms, first_journal_id, last_journal_id, currency FROM run WHERE id = ?", arguments: [runID])
            else { return nil }
            let number = try run.int64("number")
            let row = try Row.fetchOne(
                db, sql: "SELECT * FROM run_partner WHERE run_number = ? AND partner = ?", arguments: [number, partner.rawValue])
            let figures: PartnerFigures
            var count: Int64 = 0, first: Int64?, last: Int64?
            // A partner without figures in the run gets zero prices: its statement must not
            // depend on today's configuration (runs, and their statements, never change).
            var issuePrice = MoneyMinor.zero, creditPrice = MoneyMinor.zero
            if let r = row {
                figures = PartnerFigures(
                    partner: partner, issuedPoints: Points(try r.int64("issued_points")), redeemedPoints: Points(try r.int64("redeemed_points")),
                    expiredPoints: Points(try r.int64("expired_points")), payableMinor: MoneyMinor(try r.int64("payable_minor")),
                    receivableMinor: MoneyMinor(try r.int64("receivable_minor")), netMinor: MoneyMinor(try r.int64("net_minor")))
                issuePrice = MoneyMinor(try r.int64("issue_price_per_1000"))
                creditPrice = MoneyMinor(try r.int64("redeem_credit_per_1000"))
                if let c = try r.optionalInt64("entry_count") {
                    (count, first, last) = (c, try r.optionalInt64("first_sequence"), try r.optionalInt64("last_sequence"))
                } else {
                    // A run closed before ranges were recorded: find them in the journal.
                    let range = try Row.fetchOne(
                        db, sql: "SELECT COUNT(*) AS n, MIN(sequence) AS a, MAX(sequence) AS b FROM journal WHERE partner = ? AND id BETWEEN ? AND ?",
                        arguments: [partner.rawValue, try run.int64("first_journal_id"), try run.int64("last_journal_id")])
                    if let range { (count, first, last) = (try range.int64("n"), try range.optionalInt64("a"), try range.optionalInt64("b")) }
                }
            } else {
                figures = PartnerFigures(
                    partner: partner, issuedPoints: .zero, redeemedPoints: .zero, expiredPoints: .zero, payableMinor: .zero,
                    receivableMinor: .zero, netMinor: .zero)
            }
            let flows = try Row.fetchAll(
                db, sql: "SELECT issuer, redeemer, points FROM run_flow WHERE run_number = ? AND (issuer = ?2 OR redeemer = ?2) ORDER BY issuer, redeemer",
                arguments: [number, partner.rawValue]
            ).map { r in
                guard let i = PartnerID(try r.text("issuer")), let d = PartnerID(try r.text("redeemer")) else { throw StoreError("run \(runID): invalid flow") }
                return Flow(issuer: i, redeemer: d, points: Points(try r.int64("points")))
            }
            let notice = SettlementNotice(
                run: runID, cutoff: Instant(millisecondsSinceEpoch: try run.int64("cutoff_ms")),
                currency: try run.optionalText("currency") ?? Store.historicCurrency(db) ?? configuration.coalition.currency,
                figures: figures, issuePricePer1000: issuePrice, redeemCreditPer1000: creditPrice)
            // Without its row (only by tampering, which verify reports), no run claims a list.
            let recordedFrom = try Store.expiredLotsRecordedFrom(db) ?? Int64.max
            return StatementHeader(
                notice: notice, flows: flows, entryCount: count, firstSequence: first, lastSequence: last,
                expiredLotsRecorded: number >= recordedFrom, runNumber: number)
        }
    }

    /// Up to `limit` of a statement's entries after ledger sequence `after`, read from the
    /// partner's own ledger. Throws when the ledger does not hold them all yet (it lags its
    /// journal only between a crash and the next start's recovery).
    ///
    /// With `checked`, each entry is checked against its hash and the hash before it, and the
    /// last one's hash against the journal's for the same sequence (so that a ledger whose
    /// chain was recomputed after an edit is caught too): a row changed in the file (which
    /// `verify` reports) is never served as part of a statement; the statement fails instead,
    /// naming the partner and the sequence. (The HTTP route skips the check only on the
    /// streaming pass that follows its own checked pass for the digest it signs: that pass is
    /// held to the digest, and cut off if the bytes differ.)
    public func statementEntries(_ header: StatementHeader, after: Int64, limit: Int, checked: Bool = true) throws -> [Entry] {
        guard let first = header.firstSequence, let last = header.lastSequence else { return [] }
        let from = max(first, after + 1)
        if from > last { return [] }
        let to = min(last, from + Int64(limit) - 1)
        let partner = header.partner
        let chained = try ledger(partner).read { db -> [ChainedEntry] in
            // The hash before the range, when the rows are checked (none needed otherwise).
            var previous: [UInt8] = checked && from == 1 ? Store.genesisHash(partner) : []
            if checked && from > 1 {
                // The entry before the range (absent only in a ledger that lags: see below).
                guard let h = try Row.fetchOne(db, sql: "SELECT hash FROM entry WHERE sequence = ?", arguments: [from - 1]) else { return [] }
                previous = Array(try h.blob("hash"))
            }
            return try Row.fetchAll(db, sql: "SELECT * FROM entry WHERE sequence BETWEEN ? AND ? ORDER BY sequence", arguments: [from, to]).map {
                let hash = Array(try $0.blob("hash"))
                defer { previous = hash }
                return ChainedEntry(
                    entry: try JournalRow.entry(from: $0, partner: partner, journalID: try $0.int64("journal_id")), previousHash: previous, hash: hash)
            }
        }
        if chained.count == Int(to - from + 1) {
            guard checked else { return chained.map(\.entry) }
            let entries = try unaltered(chained, of: partner, in: "ledger")
            // Anchored in the journal, the truth: the chain's end is the journal's.
            let end = chained[chained.count - 1]
            let journalHash = try coalition.read { db in
                try Row.fetchOne(db, sql: "SELECT hash FROM journal WHERE partner = ? AND sequence = ?", arguments: [partner.rawValue, end.entry.sequence])
                    .map { Array(try $0.blob("hash")) }
            }
            guard journalHash == end.hash else {
                throw StoreError(
                    "the ledger of \(partner) disagrees with the journal at or before sequence \(end.entry.sequence); no statement is served from it (run `clearhouse verify`, then restore from a backup)")
            }
            return entries
        }
        // The ledger lags its journal (a ledger write failed and is caught up later): the
        // journal, the truth, holds the same entries.
        let fromJournal = try coalition.read { db in
            try JournalRow.fetchChained(db, partner: partner, after: from - 1, limit: Int(to - from + 1))
        }
        guard fromJournal.count == Int(to - from + 1) else {
            throw StoreError("the journal of \(partner) lacks sequences \(from)...\(to)")
        }
        return checked ? try unaltered(fromJournal, of: partner, in: "journal") : fromJournal.map(\.entry)
    }

    /// The entries, once each is found to be what its hash says and to follow the one before.
    private func unaltered(_ chained: [ChainedEntry], of partner: PartnerID, in file: String) throws -> [Entry] {
        for c in chained where Store.chainHash(previous: c.previousHash, entry: c.entry) != c.hash {
            throw StoreError(
                "the \(file) of \(partner) is damaged at sequence \(c.entry.sequence) (or the one before it): the entry does not match its hash chain; no statement is served from it (run `clearhouse verify`, then restore from a backup)")
        }
        return chained.map(\.entry)
    }

    /// Writes a statement document in chunks (one per batch of entries) to `sink`: the same
    /// bytes for the HTTP route and `clearhouse statement`. `checked`: each entry against its
    /// hash chain (``statementEntries(_:after:limit:checked:)``).
    public func writeStatement(
        _ header: StatementHeader, _ format: StatementFormat, checked: Bool = true, _ sink: (String) async throws -> Void
    ) async throws {
        try await sink(format == .csv ? StatementFormat.csvHeader : StatementFormat.jsonOpening(header))
        try await streamBatches(
            { after in try statementEntries(header, after: after, limit: Limits.statementBatchEntries, checked: checked).map { ($0.sequence, $0) } },
            separator: format == .csv ? "" : ",", sink
        ) { format == .csv ? StatementFormat.csvRow($0) : StatementFormat.jsonEntry($0) }
        guard format == .json else { return }
        try await sink(StatementFormat.jsonExpiredOpening(header))
        if header.expiredLotsRecorded {
            try await streamBatches(
                { after in try statementExpiredLots(header, afterLot: after, limit: Limits.statementBatchEntries) }, separator: ",", sink,
                StatementFormat.jsonExpired)
        }
        try await sink(StatementFormat.jsonClosing(header))
    }

    /// Writes what `batch(after)` returns, batch after batch (each item keyed by what the next
    /// batch starts after) until one is empty, items joined by `separator`, one chunk a batch.
    private func streamBatches<Item>(
        _ batch: (Int64) throws -> [(Int64, Item)], separator: String, _ sink: (String) async throws -> Void,
        _ render: (Item) -> String
    ) async throws {
        var after: Int64 = 0
        var first = true
        while true {
            let items = try batch(after)
            guard let last = items.last else { return }
            var chunk = ""
            chunk.reserveCapacity(items.count * 128)
            for (_, item) in items {
                if !first { chunk += separator }
                chunk += render(item)
                first = false
            }
            try await sink(chunk)
            after = last.0
            // Between batches: stop if the client went away, and let other requests run.
            try Task.checkCancellation()
            await Task.yield()
        }
    }

    /// The first run that recorded its expired lots (`run_expiry_recorded`); nil when its row
    /// is gone.
    static func expiredLotsRecordedFrom(_ db: Database) throws -> Int64? {
        try Int64.fetchOne(db, sql: "SELECT from_run FROM run_expiry_recorded WHERE id = 1")
    }

    /// Up to `limit` of the lots of the statement's partner that its run expired, after lot
    /// `afterLot`, in lot (acceptance) order, each with its earn as the partner's ledger has it.
    public func statementExpiredLots(_ header: StatementHeader, afterLot: Int64, limit: Int) throws -> [(lotID: Int64, lot: ExpiredLot)] {
        try coalition.read { db in
            try Row.fetchAll(
                db,
                sql: """
                    SELECT e.lot_id, j.sequence, j.accepted_at_ms, e.member, j.reference, e.points FROM run_expiry e
                    JOIN journal j ON j.id = e.lot_id
                    WHERE e.run_number = ? AND e.issuer = ? AND e.lot_id > ? ORDER BY e.lot_id LIMIT ?
                    """,
                arguments: [header.runNumber, header.partner.rawValue, afterLot, limit]
            ).map { r in
                let id = try r.int64("lot_id")
                guard let member = MemberID(try r.text("member")), let reference = Reference(try r.text("reference")) else {
                    throw StoreError("expired lot \(id) has an invalid member or reference")
                }
                return (id, ExpiredLot(
                    sequence: try r.int64("sequence"), acceptedAt: Instant(millisecondsSinceEpoch: try r.int64("accepted_at_ms")),
                    member: member, reference: reference, points: Points(try r.int64("points"))))
            }
        }
    }

}
