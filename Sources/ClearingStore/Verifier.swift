import ClearingDomain
import Foundation
import GRDB

/// What `verify` found: every check it made and every breach, each naming where.
public struct VerifyReport: Sendable {
    public var checks: [String] = []
    public var breaches: [String] = []
    public var ok: Bool { breaches.isEmpty }

    mutating func breach(_ s: String) {
        if breaches.count < 1000 { breaches.append(s) } else if breaches.count == 1000 { breaches.append("(more breaches not listed)") }
    }
}

/// Recomputes the invariants of CONTRACT §9 (1–3) from the files on disk, never from cached
/// totals: it reads the journal, replays every entry from nothing, recomputes every hash, and
/// compares the result with the derived tables and with every partner ledger. Read-only: it
/// may run while `serve` writes.
public enum Verifier {
    public static func verify(dataDirectory: URL) throws -> VerifyReport {
        var report = VerifyReport()
        let coalitionPath = dataDirectory.appendingPathComponent("coalition.sqlite").path
        let fm = FileManager.default
        var isDirectory: ObjCBool = false
        guard fm.fileExists(atPath: dataDirectory.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            report.breach(fm.fileExists(atPath: dataDirectory.path) ? "\(dataDirectory.path): a file, not a data directory" : "\(dataDirectory.path): no such data directory")
            return report
        }
        guard let names = try? fm.contentsOfDirectory(atPath: dataDirectory.path), fm.isReadableFile(atPath: dataDirectory.path) else {
            report.breach("\(dataDirectory.path): cannot be read")
            return report
        }
        // The same rule as the store's: a restore that stopped before its last rename left
        // files in staging (part of the backup is missing); an empty staging beside the journal
        // is only a leftover of one that finished its renames, and the data are whole.
        if names.contains(Backup.restoreStaging) {
            if Backup.interruptedRestore(in: dataDirectory) {
                report.breach(Backup.interruptedRestoreRefusal(dataDirectory.path))
            } else {
                report.checks.append("\(Backup.restoreStaging): an empty leftover of a restore that finished; it may be removed")
            }
        }
        guard Store.hasJournal(dataDirectory) else {
            // Ledgers without their journal are damage (the truth is gone). A directory that
            // holds neither has nothing in it to break an invariant (CONTRACT §10: exit 0 when
            // every invariant holds), and says so plainly.
            let ledgers = Store.ledgerFileNames(dataDirectory)
            if !ledgers.isEmpty {
                report.breach("\(dataDirectory.path): \(ledgers.count) ledger(s) but no coalition.sqlite: the journal is missing; restore it from a backup")
            } else {
                report.checks.append("no coalition.sqlite in \(dataDirectory.path) (\(names.isEmpty ? "an empty directory" : "no journal, no ledgers")): nothing has been accepted there, nothing to verify")
            }
            return report
        }
        do {
            try verifyCoalition(coalitionPath, dataDirectory: dataDirectory, &report)
        } catch let error as DatabaseError {
            // A breach that names the file, with what was checked before it. Only damage in the
            // file itself (not a database, a corrupt page) calls for a backup; anything else
            // (permissions, a lock, the disk) stopped the check, and a restore would throw away
            // what was accepted since the backup.
            let sqlite = "SQLite error \(error.resultCode.rawValue): \(error.message ?? "\(error.resultCode)")"
            if error.resultCode == .SQLITE_NOTADB || error.resultCode == .SQLITE_CORRUPT {
                report.breach("\(coalitionPath): cannot be read: \(sqlite); the file is damaged: restore it from a backup")
            } else {
                report.breach("\(coalitionPath): cannot be read: \(sqlite); verification could not finish: check that this user may read the data directory, and the disk, then run verify again")
            }
        } catch let error as StoreError {
            // A value of the wrong type where the schema keeps a number, text or hash (a file
            // edited or damaged): a breach, and the check stops there.
            report.breach("\(coalitionPath): \(error): the file was altered or is damaged; verification could not finish")
        }
        return report
    }

    private static func verifyCoalition(_ coalitionPath: String, dataDirectory: URL, _ report: inout VerifyReport) throws {
        let coalition = try DatabasePool(path: coalitionPath, configuration: Store.databaseConfiguration(readonly: true))
        defer { try? coalition.close() }
        // A first start that stopped before its schema was made leaves an empty file: nothing
        // was accepted. Any other database without a journal is not Clearhouse's.
        // (GRDB makes its `grdb_migrations` before the first migration's transaction: empty,
        // it is no table of ours.)
        let tables = try coalition.read { db in
            let migrated = try db.tableExists("grdb_migrations") ? try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM grdb_migrations") ?? 0 : 0
            return try String.fetchAll(db, sql: "SELECT name FROM sqlite_schema WHERE type = 'table'").filter { $0 != "grdb_migrations" || migrated > 0 }
        }
        guard tables.contains("journal") else {
            let ledgers = Store.ledgerFileNames(dataDirectory)
            if tables.isEmpty && ledgers.isEmpty {
                report.checks.append("coalition.sqlite in \(dataDirectory.path) has no tables yet (a first start stopped before making them): nothing has been accepted there, nothing to verify")
            } else {
                report.breach("\(coalitionPath): holds no journal (\(tables.isEmpty ? "no tables" : "not a Clearhouse database")) beside \(ledgers.count) ledger(s); restore it from a backup")
            }
            return
        }
        // One snapshot of the coalition database for everything below.
        let heads = try coalition.read { db in try verifyJournal(db, &report) }
        try verifyLedgers(dataDirectory: dataDirectory, heads: heads, coalition: coalition, &report)
    }

    /// The end of a partner's chain as the journal has it. The entries themselves are not
    /// kept: each ledger is compared with its journal entries read again, in step, in
    /// sequence order (`verifyLedger`), so verify's memory does not hold every entry's hash.
    struct Head {
        var sequence: Int64 = 0
        var hash: [UInt8]
    }

    /// Invariants 1 and 2, and the journal half of 3. Returns each partner's chain as the
    /// journal has it.
    static func verifyJournal(_ db: Database, _ report: inout VerifyReport) throws -> [PartnerID: Head] {
        var book = ReplayBook()
        book.expiryTerms = try Row.fetchAll(db, sql: "SELECT from_journal_id, points_expire_after_days FROM expiry_terms ORDER BY from_journal_id")
            .map { (try $0.int64(at: 0), try $0.int64(at: 1)) }
        var heads: [PartnerID: Head] = [:]
        var entries = 0
        var lastID: Int64 = 0
        var lastAccepted = Int64.min
        var runs = try RunChecker(try Row.fetchAll(db, sql: "SELECT * FROM run ORDER BY number"), db: db)
        let nul = JournalRow.nulInText(["partner", "webhook_id", "member", "reference", "original_reference"])
        let cursor = try Row.fetchCursor(db, sql: "SELECT \(JournalRow.columns), \(nul) FROM journal ORDER BY id")
        while let row = try cursor.next() {
            entries += 1
            let id = try row.int64("id")
            try runs.closeRuns(before: id, &book, db, &report)
            let (e, hash): (Entry, [UInt8])
            do { (e, hash) = try JournalRow.journalEntry(row) } catch {
                report.breach("journal id \(id): \(error)")
                continue
            }
            let at = "journal \(e.partner) sequence \(e.sequence)"
            if row[JournalRow.nulInTextColumn] as Bool? != false { report.breach("\(at): a text column holds a NUL byte (the entry was altered)") }
            if id != lastID &+ 1 { report.breach("\(at): journal id \(id) follows \(lastID) (gap)") }
            lastID = id
            if e.acceptedAt.millisecondsSinceEpoch < lastAccepted { report.breach("\(at): accepted_at goes backwards") }
            lastAccepted = e.acceptedAt.millisecondsSinceEpoch
            // The partner's chain is changed in place (one look-up per entry).
            func extend(_ head: inout Head) {
                if e.sequence != head.sequence &+ 1 { report.breach("\(at): follows sequence \(head.sequence) (gap)") }
                let expected = Store.chainHash(previous: head.hash, entry: e)
                if expected != hash { report.breach("\(at): hash does not match its contents and chain") }
                head.sequence = e.sequence
                head.hash = hash
            }
            extend(&heads[e.partner, default: Head(hash: Store.genesisHash(e.partner))])
            if let why = book.apply(e) { report.breach("\(at): \(why)") }
            runs.observe(e.acceptedAt, id: e.journalID, partner: e.partner, sequence: e.sequence, &report)
        }
        let beyond = runs.pending.filter { $0.last > lastID }.count
        if beyond > 0 { report.breach("runs: \(beyond) runs cover journal ids that do not exist (the journal ends at \(lastID))") }
        try runs.closeRuns(before: nil, &book, db, &report)
        runs.checkNothingLeftBehind(db, &report)
        let notices = try checkNotices(db, &report)
        if let lots = try checkRunExpiries(db, &report) {
            report.checks.append("expired lots: \(lots) recorded lot by lot, each a lot of its issuer and member, summing to each issuer's expired_points in each run")
        }
        report.checks.append("journal: \(entries) entries replayed from nothing; ids gapless, times ordered, rules re-applied")
        report.checks.append("invariants 4 and 5: \(runs.closed) runs contiguous and unchanged (figures, expiry and flows recomputed), Σ net + margin = 0, gross, net transfers and netting efficiency recomputed, flows into each redeemer = its redeemed points")
        report.checks.append("notices: \(notices) settlement notices, one per partner of each run, each carrying its run's figures")

        let hasTotals = try db.columns(in: "partner_head").contains { $0.name == "earned" }  // from v6 on
        for row in try Row.fetchAll(
            db,
            sql: hasTotals
                ? "SELECT partner, last_sequence, last_hash, earned, redeemed, earn_reversed, redemption_reversed FROM partner_head"
                : "SELECT partner, last_sequence, last_hash, 0, 0, 0, 0 FROM partner_head")
        {
            guard let p = PartnerID(try row.text(at: 0)) else { report.breach("partner_head: invalid partner"); continue }
            let h = heads[p]
            let (sequence, hash) = (try row.int64(at: 1), Array(try row.blob(at: 2)))
            if h?.sequence ?? 0 != sequence || (h?.hash ?? []) != hash {
                report.breach("partner_head \(p): does not match the end of its journal chain")
            }
            // The running totals the next run's figures are the differences of.
            let stored: [Int64] = try (3...6).map { try row.int64(at: $0) }
            if hasTotals, stored != book.kindTotals[p]?.totals ?? [0, 0, 0, 0] {
                report.breach("partner_head \(p): running totals (earned, redeemed, reversed) \(stored) but the journal sums to \(book.kindTotals[p]?.totals ?? [0, 0, 0, 0])")
            }
        }
        for p in heads.keys.sorted() where try Int.fetchOne(db, sql: "SELECT 1 FROM partner_head WHERE partner = ?", arguments: [p.rawValue]) == nil {
            report.breach("partner_head \(p): missing")
        }
        report.checks.append("journal: hash chains of \(heads.count) partners recomputed; heads agree")
        if try db.tableExists("webhook_alias") { try checkAliases(db, &report) }
        if try db.tableExists("coalition_currency") { try checkCurrency(db, &report) }

        try compareDerived(db, book, &report)
        try checkReferences(db, &report)
        checkIntegrity(db, of: "coalition.sqlite", &report)
        report.checks.append("structure: coalition.sqlite's pages, key order and indexes (SQLite's integrity check)")
        return heads
    }

    /// The file's own structure (`PRAGMA integrity_check`): pages, B-tree order, every index
    /// against its table, NOT NULL and CHECK constraints. A damaged page can leave every row
    /// readable through one path and another through the next (a row out of key order is found
    /// by a scan but not by its key), which no comparison of values above would see. About 3 s
    /// per 300 MB (a million postings) on the development machine.
    static func checkIntegrity(_ db: Database, of file: String, _ report: inout VerifyReport) {
        let shown = 10
        do {
            let lines = try String.fetchAll(db, sql: "PRAGMA integrity_check(\(shown + 1))")
            if lines != ["ok"] {
                for line in lines.prefix(shown) { report.breach("\(file): damaged: \(line)") }
                if lines.count > shown { report.breach("\(file): damaged in more places than these \(shown)") }
            }
        } catch {
            report.breach("\(file): its structure cannot be checked (\(error)): the file is damaged")
        }
    }

    /// `checkIntegrity` on a ledger's file, opened read-only for it. A file that cannot be
    /// opened or read was named as such by `verifyLedger` already.
    static func checkLedgerIntegrity(_ url: URL, _ p: PartnerID, _ report: inout VerifyReport) {
        guard let db = try? DatabasePool(path: url.path, configuration: Store.databaseConfiguration(readonly: true)) else { return }
        defer { try? db.close() }
        try? db.read { checkIntegrity($0, of: "ledger \(p)", &report) }
    }

    /// Every reference between rows holds (`PRAGMA foreign_key_check`): no figures, flows,
    /// snapshots, expired lots or notices of a run that does not exist, no take or move of a lot
    /// or entry that does not, no attempt of no notice. SQLite checks these as the store writes;
    /// an edit made with foreign keys off (the `sqlite3` shell's default) is not checked.
    static func checkReferences(_ db: Database, _ report: inout VerifyReport) throws {
        var count = 0
        let rows = try Row.fetchCursor(db, sql: "PRAGMA foreign_key_check")
        while let row = try rows.next() {
            count += 1
            guard count <= 10 else { continue }
            let table = (try? row.text(at: 0)) ?? "?", parent = (try? row.text(at: 2)) ?? "?"
            let which = (try? row.optionalInt64(at: 1)).flatMap { $0 }.map { "row \($0)" } ?? "a row"
            report.breach("\(table): \(which) refers to a row of \(parent) that does not exist")
        }
        if count > 10 { report.breach("… and \(count - 10) more rows that refer to rows that do not exist") }
        report.checks.append("references: every row's references to other rows hold (foreign keys)")
    }

    /// The derived tables must equal the replay; invariant 1 and 2 from the tables themselves.
    /// Runs `body`, naming `table` in the error of a value of the wrong type it finds.
    static func reading(_ table: String, _ body: () throws -> Void) throws {
        do { try body() } catch let error as StoreError { throw StoreError("\(table): \(error)") }
    }

    static func compareDerived(_ db: Database, _ book: ReplayBook, _ report: inout VerifyReport) throws {
        var lotRows = 0
        var remainingSum: Int64 = 0
        var expiredSum: Int64 = 0
        var lotsOverflow = false
        var openByMember: [String: Int64] = [:]
        // A lot's points left are in `lot_open` (no row: none left), under the lot's member;
        // in a directory not yet opened by a version with v8, in the lot's own `remaining`.
        let migrated = try db.tableExists("lot_open")
        let lotsWithPointsLeft = migrated
            ? """
                (SELECT lot.id AS id, lot.member AS member, lot.issuer AS issuer, lot.points AS points,
                   COALESCE(o.remaining, 0) AS remaining, lot.reversed AS reversed, lot.expired AS expired,
                   lot.expires_at_ms AS expires_at_ms
                 FROM lot LEFT JOIN lot_open o ON o.member = lot.member AND o.lot_id = lot.id)
                """
            : "lot"
        let lots = try Row.fetchCursor(
            db, sql: "SELECT id, member, issuer, points, remaining, reversed, expired, expires_at_ms FROM \(lotsWithPointsLeft)")
        try reading("lot") {
            while let row = try lots.next() {
                lotRows += 1
                let id = try row.int64(at: 0), member = try row.text(at: 1), issuer = try row.text(at: 2), points = try row.int64(at: 3)
                let remaining = try row.int64(at: 4), reversed = try row.int64(at: 5), expired = try row.int64(at: 6)
                // Summed with overflow checked: altered figures are a breach, never a crash.
                let sums = [
                    remainingSum.addingReportingOverflow(remaining), expiredSum.addingReportingOverflow(expired),
                    openByMember[member, default: 0].addingReportingOverflow(remaining),
                ]
                if sums.contains(where: \.overflow) {
                    lotsOverflow = true
                } else {
                    (remainingSum, expiredSum) = (sums[0].partialValue, sums[1].partialValue)
                    openByMember[member] = sums[2].partialValue
                }
                guard let r = book.lots[id] else { report.breach("lot \(id): no earn in the journal made it"); continue }
                let expires = try row.optionalInt64(at: 7)
                let differing = [
                    ("member", r.member.rawValue != member), ("issuer", r.issuer.rawValue != issuer),
                    ("points", r.points != points), ("remaining", r.remaining != remaining), ("reversed", r.reversed != reversed),
                    ("expired", r.expired != expired), ("expires_at", r.expiresAt?.millisecondsSinceEpoch != expires),
                ].filter(\.1).map(\.0)
                if !differing.isEmpty {
                    report.breach("lot \(id): differs from the journal in \(differing.joined(separator: ", ")) (holds \(remaining) of \(points); the journal gives \(r.remaining) of \(r.points))")
                }
            }
        }
        if lotRows != book.lots.count { report.breach("lots: \(lotRows) rows but the journal makes \(book.lots.count)") }
        if lotsOverflow { report.breach("lots: their points overflow when totalled (no journal makes that many; a lot was altered)") }
        // Points left under another member than the lot's, or in no lot, are nobody's.
        for row in try !migrated ? [] : Row.fetchAll(
            db,
            sql: """
                SELECT o.member, o.lot_id FROM lot_open o LEFT JOIN lot ON lot.id = o.lot_id
                WHERE lot.id IS NULL OR lot.member <> o.member ORDER BY o.lot_id LIMIT 10
                """)
        {
            report.breach("lot_open: member \(try row.text(at: 0)) holds points in lot \(try row.int64(at: 1)), which is not one of its lots")
        }

        var memberRows = 0
        // Rows by cursor, here and below: a table read whole into memory beside the replay
        // (each row an object) was most of verify's peak memory.
        let members = try Row.fetchCursor(db, sql: "SELECT member, open_points FROM member")
        try reading("member") {
            while let row = try members.next() {
                memberRows += 1
                let m = try row.text(at: 0)
                let stored = try row.int64(at: 1)
                let fromLots = openByMember[m] ?? 0
                if stored < 0 { report.breach("member \(m): balance \(stored) is below 0") }
                if stored != fromLots { report.breach("member \(m): balance \(stored) but its lots hold \(fromLots)") }
                if let id = MemberID(m), book.openPoints(of: id) != stored {
                    report.breach("member \(m): balance \(stored) but the journal gives \(book.openPoints(of: id))")
                }
            }
        }
        if memberRows != book.members.count { report.breach("members: \(memberRows) rows but the journal makes \(book.members.count)") }
        report.checks.append("invariant 1: \(memberRows) member balances equal the sums of their \(lotRows) lots, none below 0, all equal to the replay")

        if expiredSum != book.expiredPoints { report.breach("expired points: the lots say \(expiredSum), the runs' expiry gives \(book.expiredPoints)") }
        let (net, netOverflow) = book.issuedPoints.subtractingReportingOverflow(book.redeemedPoints)
        let (lhs, lhsOverflow) = net.subtractingReportingOverflow(expiredSum)
        if netOverflow || lhsOverflow {
            report.breach("invariant 2: issued \(book.issuedPoints) − redeemed \(book.redeemedPoints) − expired \(expiredSum) overflows")
        } else if lhs != remainingSum {
            report.breach("invariant 2: issued \(book.issuedPoints) − redeemed \(book.redeemedPoints) − expired \(expiredSum) = \(lhs), but the lots hold \(remainingSum)")
        }
        report.checks.append("invariant 2: issued \(book.issuedPoints) − redeemed \(book.redeemedPoints) − expired \(expiredSum) = remaining \(remainingSum)")

        // The next run finds lots that expired at or before the last cutoff and hold points
        // again only through `lot_reopened`: one missing there would never be expired.
        // (A directory not yet opened by this version has no list: its next start makes it.)
        if try db.tableExists("lot_reopened") {
            let unlisted = try Int64.fetchAll(
                db,
                sql: """
                    SELECT id FROM \(lotsWithPointsLeft)
                    WHERE remaining > 0 AND expires_at_ms IS NOT NULL AND expires_at_ms <= (SELECT MAX(cutoff_ms) FROM run)
                      AND id NOT IN (SELECT lot_id FROM lot_reopened)
                    ORDER BY id LIMIT 10
                    """)
            for id in unlisted {
                report.breach("lot \(id): expired at or before the last run's cutoff and holds points, but is not in lot_reopened (the next run would not expire it)")
            }
            report.checks.append("expiry: every lot holding points past the last run's cutoff is listed for the next run")
        } else {
            report.checks.append("expiry: not checked (no lot_reopened yet: the directory was last opened by a version before v7)")
        }

        var storedFlows: [ReplayBook.FlowKey: Int64] = [:]
        try reading("flow") {
            for row in try Row.fetchAll(db, sql: "SELECT issuer, redeemer, points FROM flow") {
                guard let i = PartnerID(try row.text(at: 0)), let r = PartnerID(try row.text(at: 1)) else { report.breach("flow: invalid partner"); continue }
                storedFlows[ReplayBook.FlowKey(issuer: i, redeemer: r)] = try row.int64(at: 2)
            }
        }
        let replayed = book.flows.filter { $0.value != 0 }
        if storedFlows.filter({ $0.value != 0 }) != replayed { report.breach("flows: the flow table differs from the journal's lot takes") }
        var takeRows = 0
        let takes = try Row.fetchCursor(db, sql: "SELECT redemption_id, position, lot_id, points, returned, issuer FROM lot_take")
        try reading("lot_take") {
            while let row = try takes.next() {
                takeRows += 1
                let redemption = try row.int64(at: 0), pos = try row.int64(at: 1)
                let t = book.takes[redemption]
                // The issuer too: a reversal gives its points back to the issuer its take names.
                guard let t, pos >= 0, pos < t.count, t[Int(pos)].lotID == (try row.int64(at: 2)), t[Int(pos)].points.value == (try row.int64(at: 3)),
                    t[Int(pos)].returned.value == (try row.int64(at: 4)), t[Int(pos)].issuer.rawValue == (try row.text(at: 5))
                else { report.breach("lot_take \(redemption)/\(pos): differs from the journal"); continue }
            }
        }
        if takeRows != book.takes.values.reduce(0, { $0 + $1.count }) { report.breach("lot_take: row count differs from the journal") }
        // The moves between flows, entry by entry: a run's flows are their sums (settle reads
        // those after its cutoff), so each must be the replay's.
        var moveRows = 0, movesWrong = 0
        var entryMoves: (entry: Int64, moves: [ReplayBook.Move]?) = (0, nil)  // the rows come entry by entry
        let moves = try Row.fetchCursor(db, sql: "SELECT entry_id, position, lot_id, issuer, redeemer, points FROM lot_move ORDER BY entry_id, position")
        try reading("lot_move") {
            while let row = try moves.next() {
                moveRows += 1
                let entry = try row.int64(at: 0), pos = try row.int64(at: 1)
                if entryMoves.entry != entry { entryMoves = (entry, book.moves(of: entry)) }
                guard let m = entryMoves.moves, pos >= 0, pos < m.count, m[Int(pos)].lot == (try row.int64(at: 2)), m[Int(pos)].issuer.rawValue == (try row.text(at: 3)),
                    m[Int(pos)].redeemer.rawValue == (try row.text(at: 4)), m[Int(pos)].points == (try row.int64(at: 5))
                else {
                    movesWrong += 1
                    if movesWrong <= 10 { report.breach("lot_move \(entry)/\(pos): differs from the journal") }
                    continue
                }
            }
        }
        if moveRows != book.moveCount { report.breach("lot_move: row count differs from the journal") }
        report.checks.append("flows: \(replayed.count) issuer→redeemer flows, \(takeRows) lot takes and \(moveRows) moves equal the replay")
    }

    /// The ledger half of invariant 3: each ledger gapless, chained, every hash recomputed,
    /// and entry for entry the same as the journal.
    static func verifyLedgers(
        dataDirectory: URL, heads: [PartnerID: Head], coalition: DatabasePool, _ report: inout VerifyReport
    ) throws {
        let dir = dataDirectory.appendingPathComponent("ledgers")
        var partners = Set(heads.keys)
        for f in Store.ledgerFileNames(dataDirectory) {
            if let p = Store.ledgerPartner(fileName: f) { partners.insert(p) } else { report.breach("ledgers/\(f): not a partner's ledger") }
        }
        var total = 0
        for p in partners.sorted() {
            let url = dir.appendingPathComponent("\(p.rawValue).sqlite")
            let head = heads[p] ?? Head(hash: Store.genesisHash(p))
            guard FileManager.default.fileExists(atPath: url.path) else {
                if head.sequence > 0 { report.breach("ledger \(p): file missing, journal has \(head.sequence) entries") }
                continue
            }
            // A batch may sit between its journal commit and its ledger commit: wait briefly.
            var seen = 0
            var last: Int64 = 0
            var unreadable = false
            for attempt in 0..<20 {
                var r = VerifyReport()
                do {
                    (seen, last) = try verifyLedger(url, p, head, coalition: coalition, &r)
                } catch {
                    // Not a ledger (no tables, not a database, truncated), after the same waits
                    // as a ledger behind (serve may be making it): a breach naming it, and the
                    // other ledgers are still checked. A journal that could not be read for the
                    // comparison gets the same waits, and a breach naming the journal's file.
                    if attempt < 19 {
                        Thread.sleep(forTimeInterval: 0.1)
                        continue
                    }
                    if let e = error as? JournalUnreadable {
                        report.breach("coalition.sqlite: the journal entries of \(p) cannot be read to compare with its ledger (\(e.error))")
                    } else {
                        report.breach("ledger \(p): cannot be read as a ledger (\(error))")
                    }
                    unreadable = true
                    break
                }
                if seen >= head.sequence || attempt == 19 {
                    report.breaches += r.breaches
                    break
                }
                Thread.sleep(forTimeInterval: 0.1)
            }
            if unreadable { continue }
            // Once per ledger, not at each wait above for a ledger behind its journal.
            checkLedgerIntegrity(url, p, &report)
            if seen < head.sequence { report.breach("ledger \(p): ends at sequence \(seen) but the journal has \(head.sequence)") }
            // Entries past the journal's snapshot were either accepted since (serve is running)
            // or are not in the journal at all (added to the ledger by hand): ask the journal
            // again, now.
            if last > head.sequence {
                let now = try coalition.read { db in
                    try Int64.fetchOne(db, sql: "SELECT MAX(sequence) FROM journal WHERE partner = ?", arguments: [p.rawValue]) ?? 0
                }
                if now < last {
                    report.breach("ledger \(p): holds sequence \(last) but the journal ends at \(now) (entries that are in no journal)")
                }
            }
            total += min(seen, Int(head.sequence))
        }
        report.checks.append("invariant 3: \(partners.count) ledgers, \(total) entries: gapless, chained, hashes recomputed, each equal to its journal entry; each file's structure checked")
    }

    /// Checks a ledger up to the journal's head; returns how many entries were checked and the
    /// ledger's last sequence (past the head when it holds more).
    ///
    /// Each entry is compared with the partner's journal entry of the same sequence (journal id
    /// and hash), the journal read in step with the ledger, both in sequence order. That read is
    /// a later snapshot of the journal than the replay's; entries up to `head` never change
    /// (the journal's triggers refuse it), and the replay has checked them.
    static func verifyLedger(
        _ url: URL, _ p: PartnerID, _ head: Head, coalition: DatabasePool, _ report: inout VerifyReport
    ) throws -> (checked: Int, last: Int64) {
        let db: DatabasePool
        do { db = try DatabasePool(path: url.path, configuration: Store.databaseConfiguration(readonly: true)) } catch {
            report.breach("ledger \(p): cannot open: \(error)")
            return (0, 0)
        }
        defer { try? db.close() }
        return try coalition.read { journal in try db.read { db in
            // A failure to read the journal here is the journal's, not the ledger's (`JournalUnreadable`).
            let journalEntries: RowCursor
            do {
                journalEntries = try Row.fetchCursor(
                    journal, sql: "SELECT sequence, id, hash FROM journal WHERE partner = ? AND sequence <= ? ORDER BY sequence",
                    arguments: [p.rawValue, head.sequence])
            } catch { throw JournalUnreadable(error: error) }
            func nextJournalEntry() throws -> Row? {
                do { return try journalEntries.next() } catch { throw JournalUnreadable(error: error) }
            }
            var journalEntry = try nextJournalEntry()
            let info = try Row.fetchOne(db, sql: "SELECT partner, genesis_hash FROM ledger_info WHERE id = 1")
            let owner = info.flatMap { try? $0.text(at: 0) }
            if owner != p.rawValue { report.breach("ledger \(p): belongs to \(owner ?? "nobody")") }
            // The chain is checked from the partner's own genesis below; the one kept here is what
            // the ledger's trigger checks a first entry against, so it must be that one too.
            // (A ledger of another partner is reported as that alone.)
            if owner == p.rawValue, let info, (try? info.blob(at: 1)).map({ Array($0) }) != Store.genesisHash(p) {
                report.breach("ledger \(p): ledger_info holds another genesis hash than the partner's (the file was altered)")
            }
            var previous = Store.genesisHash(p)
            var last: Int64 = 0
            var references = Set<String>(), webhooks = Set<String>()
            let nul = JournalRow.nulInText(["webhook_id", "member", "reference", "original_reference"])
            let cursor = try Row.fetchCursor(db, sql: "SELECT *, \(nul) FROM entry ORDER BY sequence")
            while let row = try cursor.next() {
                let seq = try row.int64("sequence")
                let at = "ledger \(p) sequence \(seq)"
                if seq != last &+ 1 { report.breach("\(at): follows sequence \(last) (gap)") }
                last = seq
                if seq > head.sequence {
                    // Written after the journal snapshot, or in no journal: the caller asks.
                    last = try Int64.fetchOne(db, sql: "SELECT MAX(sequence) FROM entry") ?? seq
                    break
                }
                guard let storedData = try? row.blob("hash"), let prevData = try? row.blob("prev_hash"),
                    let journalID = try? row.int64("journal_id")
                else {
                    report.breach("\(at): hash, prev_hash or journal_id is not of its type (the entry was altered)")
                    continue
                }
                let stored = Array(storedData)
                if Array(prevData) != previous { report.breach("\(at): prev_hash does not link to the entry before") }
                if row[JournalRow.nulInTextColumn] as Bool? != false { report.breach("\(at): a text column holds a NUL byte (the entry was altered)") }
                do {
                    let e = try JournalRow.entry(from: row, partner: p, journalID: journalID)
                    if Store.chainHash(previous: previous, entry: e) != stored {
                        report.breach("\(at): hash does not match its contents (the entry was altered)")
                    }
                } catch {
                    report.breach("\(at): does not decode (\(error))")
                }
                // (Read as their types or not at all: an altered journal row is a breach, not a crash.)
                // (A row whose sequence cannot be read is passed over, never waited on.)
                while let j = journalEntry, ((try? j.int64("sequence")) ?? .min) < seq { journalEntry = try nextJournalEntry() }
                if let j = journalEntry, (try? j.int64("sequence")) == seq, (try? j.int64("id")) == journalID,
                    (try? j.blob("hash")).map(Array.init) == stored
                {
                    journalEntry = try nextJournalEntry()
                } else {
                    report.breach("\(at): differs from the journal")
                }
                if !references.insert((try? row.text("reference")) ?? "").inserted { report.breach("\(at): reference appears twice") }
                if !webhooks.insert((try? row.text("webhook_id")) ?? "").inserted { report.breach("\(at): webhook-id appears twice") }
                previous = stored
            }
            return (Int(min(last, head.sequence)), last)
        } }
    }
}

/// The journal could not be read while a ledger was compared with it: a breach of the journal's
/// file, not the ledger's.
struct JournalUnreadable: Error {
    var error: any Error
}

extension Verifier {
    /// The coalition's currency (v10) is its history's and never changes: the last run that
    /// names a currency is in it (`settle` closes runs in it alone; runs closed before v10,
    /// when a configuration could still change it, may be in others, and the store records the
    /// last one's). Edited, every later run, notice and export would be in another currency
    /// than the runs before. (Builds of 2026-11-29 recorded the configured currency without
    /// reading the runs: a directory whose currency changed before those builds reports this
    /// until its next run; docs/OPERATIONS.md.)
    static func checkCurrency(_ db: Database, _ report: inout VerifyReport) throws {
        guard let currency = try Store.recordedCurrency(db) else {
            report.checks.append("currency: none recorded yet (the next writable start records its history's)")
            return
        }
        // (A directory not yet migrated to v12 has no run currencies.)
        guard try db.columns(in: "run").contains(where: { $0.name == "currency" }), let (run, lastCurrency) = try Store.lastRunInACurrency(db) else {
            report.checks.append("currency: \(currency), no run names one yet")
            return
        }
        if lastCurrency != currency {
            report.breach("coalition_currency: \(currency), but the last run, \(run), is in \(lastCurrency) (a coalition's currency never changes: the file was altered, or recorded by a build of 2026-11-29 after a change of currency)")
        }
        report.checks.append("currency: \(currency), the last run's (\(run))")
    }

    /// Each webhook-id bound to an entry as an alias (v14) names an entry of its own partner
    /// and is none of that partner's journal webhook-ids (the writer answers a webhook-id by
    /// one entry only).
    static func checkAliases(_ db: Database, _ report: inout VerifyReport) throws {
        var count = 0
        let rows = try Row.fetchCursor(
            db,
            sql: """
                SELECT a.partner, a.webhook_id, a.journal_id, j.partner AS entry_partner,
                  EXISTS (SELECT 1 FROM journal k WHERE k.partner = a.partner AND k.webhook_id = a.webhook_id) AS in_journal
                FROM webhook_alias a LEFT JOIN journal j ON j.id = a.journal_id
                """)
        while let row = try rows.next() {
            count += 1
            let at = "webhook_alias \((try? row.text("partner")) ?? "?") \(JSONWriter.quote((try? row.text("webhook_id")) ?? "?"))"
            let journalID = (try? row.int64("journal_id")) ?? 0
            if let owner = try? row.optionalText("entry_partner") {
                if owner != (try? row.text("partner")) { report.breach("\(at): bound to journal id \(journalID), an entry of \(owner)") }
            } else {
                report.breach("\(at): bound to journal id \(journalID), which does not exist")
            }
            if (try? row.int64("in_journal")) == 1 { report.breach("\(at): is also a webhook-id of an entry in the journal") }
        }
        report.checks.append("webhook-id aliases: \(count), each bound to an entry of its partner, none repeating a journal webhook-id")
    }
}

/// Walks the runs alongside the journal replay: at each run's boundary it expires lots as the
/// run did, recomputes the run's figures and flows from the replayed entries (with the prices
/// stored in the run) and compares them with what the run recorded (invariants 4 and 5).
extension Verifier {
    /// The lots each run expired (`run_expiry`, from `v17-run-expiries` on): each is a lot of
    /// the issuer and member it names, and they sum, per run and issuer, to the issuer's
    /// `expired_points` (the points of each lot are compared with the replay's in
    /// `RunChecker.closeRuns`). Nil for a directory not yet migrated.
    static func checkRunExpiries(_ db: Database, _ report: inout VerifyReport) throws -> Int? {
        guard try db.tableExists("run_expiry") else { return nil }
        guard let from = try Store.expiredLotsRecordedFrom(db) else {
            report.breach("run_expiry_recorded: its row is gone (from which run on the expired lots are recorded)")
            return nil
        }
        for row in try Row.fetchAll(
            db,
            sql: """
                SELECT r.id, rp.partner, rp.expired_points, COALESCE(SUM(e.points), 0) AS listed
                FROM run_partner rp JOIN run r ON r.number = rp.run_number
                LEFT JOIN run_expiry e ON e.run_number = rp.run_number AND e.issuer = rp.partner
                WHERE rp.run_number >= ? GROUP BY rp.run_number, rp.partner HAVING rp.expired_points <> listed
                """,
            arguments: [from])
        {
            report.breach("run \(try row.text("id")): partner \(try row.text("partner"))'s expired lots sum to \(try row.int64("listed")) points, its expired_points are \(try row.int64("expired_points"))")
        }
        for row in try Row.fetchAll(
            db,
            sql: """
                SELECT e.run_number, e.issuer, e.lot_id FROM run_expiry e
                LEFT JOIN run_partner rp ON rp.run_number = e.run_number AND rp.partner = e.issuer
                LEFT JOIN lot ON lot.id = e.lot_id
                WHERE e.run_number < ? OR rp.partner IS NULL OR lot.id IS NULL OR lot.issuer <> e.issuer OR lot.member <> e.member
                """,
            arguments: [from])
        {
            report.breach("run number \(try row.int64("run_number")): expired lot \(try row.int64("lot_id")) of \(try row.text("issuer")) is not a lot of that issuer and member in a run with its figures")
        }
        return try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM run_expiry") ?? 0
    }

    /// Every partner of every run has exactly one notice (`<run>:<partner>`), and its body
    /// carries the run's figures for that partner. Returns how many notices there are.
    static func checkNotices(_ db: Database, _ report: inout VerifyReport) throws -> Int {
        for row in try Row.fetchAll(
            db,
            sql: """
                SELECT rp.run_number, rp.partner FROM run_partner rp
                LEFT JOIN notice n ON n.run_number = rp.run_number AND n.partner = rp.partner WHERE n.id IS NULL
                """)
        {
            report.breach("run \(try row.int64("run_number")): partner \(try row.text("partner")) has no settlement notice")
        }
        let fields = ["issued_points", "redeemed_points", "expired_points", "payable_minor", "receivable_minor", "net_minor"]
        // Each run's currency (v10: recorded with the run, and for runs closed before, taken
        // from their notices); a run that has none yet (a directory not opened since v10) is
        // checked against its notices' own.
        let runCurrency = try db.columns(in: "run").contains { $0.name == "currency" } ? "r.currency" : "NULL"
        // By cursor: a coalition's notices (every partner of every run, each with its body) are
        // not held in memory at once.
        var count = 0
        let rows = try Row.fetchCursor(
            db,
            sql: """
                SELECT n.id, n.run_number, n.partner, n.body, r.id AS run_id, r.cutoff_ms, \(fields.map { "rp.\($0)" }.joined(separator: ", ")),
                  rp.issue_price_per_1000, rp.redeem_credit_per_1000, \(runCurrency) AS currency
                FROM notice n LEFT JOIN run r ON r.number = n.run_number
                LEFT JOIN run_partner rp ON rp.run_number = n.run_number AND rp.partner = n.partner
                """)
        while let row = try rows.next() {
            count += 1
            let id = (try? row.text("id")) ?? "?"
            // A notice whose row cannot be read (its run's figures of the wrong type, say) is a
            // breach of that notice; the others are still checked.
            do { try checkNotice(row, id: id, fields: fields, &report) } catch {
                report.breach("notice \(id): \(error): the file was altered or is damaged")
            }
        }
        return count
    }

    /// One notice against its run's recorded figures, prices and currency.
    private static func checkNotice(_ row: Row, id: String, fields: [String], _ report: inout VerifyReport) throws {
        guard let runID = try row.optionalText("run_id"), try row.optionalInt64("net_minor") != nil else {
            report.breach("notice \(id): its run or its partner's figures do not exist")
            return
        }
        let partner = try row.text("partner")
        if id != "\(runID):\(partner)" { report.breach("notice \(id): its id is not <run>:<partner> (\(runID):\(partner))") }
        let body = try? JSONSerialization.jsonObject(with: try row.blob("body")) as? [String: Any]
        guard body?["type"] as? String == "settlement.notice", let data = body?["data"] as? [String: Any],
            data["run"] as? String == runID, data["partner"] as? String == partner,
            data["cutoff"] as? String == Instant(millisecondsSinceEpoch: try row.int64("cutoff_ms")).rfc3339,
            data["statement"] as? String == "/v1/partners/\(partner)/statements/\(runID).csv"
        else {
            report.breach("notice \(id): the body is not a settlement notice of \(runID) for \(partner)")
            return
        }
        for f in fields where (data[f] as? NSNumber)?.int64Value != (try row.int64(f)) {
            report.breach("notice \(id): \(f) differs from the run's figures")
        }
        // And byte for byte: the notice its run's recorded figures, prices and currency make
        // (direction, prices and currency are in it too, and a partner pays by it).
        guard let p = PartnerID(partner) else { return }
        let expected = SettlementNotice(
            run: runID, cutoff: Instant(millisecondsSinceEpoch: try row.int64("cutoff_ms")),
            currency: try row.optionalText("currency") ?? (data["currency"] as? String ?? ""),
            figures: try PartnerFigures(p, recordedIn: row),
            issuePricePer1000: MoneyMinor(try row.int64("issue_price_per_1000")),
            redeemCreditPer1000: MoneyMinor(try row.int64("redeem_credit_per_1000")))
        if Data(expected.body.utf8) != (try row.blob("body")) {
            report.breach("notice \(id): its body is not the notice its run's figures, prices and currency make")
        }
    }
}

struct RunChecker {
    struct StoredRun {
        var number: Int64, id: String, cutoff: Instant, first: Int64, last: Int64
        var margin: Int64, gross: Int64, transfers: Int64, efficiencyPPM: Int64
        var partners: [PartnerID: (issued: Int64, redeemed: Int64, expired: Int64, issuePrice: Int64, creditPrice: Int64, payable: Int64, receivable: Int64, net: Int64)]
        var flows: [ReplayBook.FlowKey: Int64]
        /// The ledger ranges recorded for statements (nil for runs closed before they were).
        var ranges: [PartnerID: (count: Int64, first: Int64?, last: Int64?)]
        /// The running totals at the cutoff (`run_snapshot`: last sequence, then points by kind)
        /// and the all-time flows (`run_flow_snapshot`), which the next run subtracts.
        var snapshot: [PartnerID: [Int64]]
        var flowSnapshot: [ReplayBook.FlowKey: Int64]
        /// The lots it expired, with their points (`run_expiry`; nil for runs closed before).
        var expiredLots: [Int64: Int64]?
    }

    /// A run's own row: what is known of it before its figures are read (`StoredRun`).
    struct RunRow {
        var number: Int64, id: String, cutoff: Instant, first: Int64, last: Int64
        var margin: Int64, gross: Int64, transfers: Int64, efficiencyPPM: Int64
        /// When the run was closed (`created_at_ms`).
        var closedAt: Int64
    }

    /// The ranges seen while replaying the run now open.
    var seen: [PartnerID: (count: Int64, first: Int64?, last: Int64?)] = [:]

    /// The runs not yet checked, in order. Only their own rows: each run's figures, flows and
    /// expired lots are read when it is checked, so that memory does not hold every run's.
    var pending: ArraySlice<RunRow> = []
    var closed = 0
    var previousLast: Int64 = 0
    var previousCutoff: Int64 = Int64.min
    var lastCutoffClosed: Int64?
    /// The first run that recorded its expired lots (`run_expiry`), if any.
    private let expiriesFrom: Int64?

    init(_ rows: [Row], db: Database) throws {
        expiriesFrom = (try? db.tableExists("run_expiry")) == true
            ? (try? Store.expiredLotsRecordedFrom(db)) ?? nil : nil
        pending = ArraySlice(try rows.map { row in
            do {
                return RunRow(
                    number: try row.int64("number"), id: try row.text("id"), cutoff: Instant(millisecondsSinceEpoch: try row.int64("cutoff_ms")),
                    first: try row.int64("first_journal_id"), last: try row.int64("last_journal_id"), margin: try row.int64("operator_margin_minor"),
                    gross: try row.int64("gross_minor"), transfers: try row.int64("net_transfers_minor"), efficiencyPPM: try row.int64("netting_efficiency_ppm"),
                    closedAt: try row.int64("created_at_ms"))
            } catch {
                throw StoreError("run \((try? row.int64("number")).map(String.init) ?? "?"): \(error)")
            }
        })
    }

    /// A run's figures, flows, snapshots and expired lots, as recorded.
    private func load(_ row: RunRow, _ db: Database) throws -> StoredRun {
        let number = row.number
        var partners: [PartnerID: (Int64, Int64, Int64, Int64, Int64, Int64, Int64, Int64)] = [:]
        var ranges: [PartnerID: (count: Int64, first: Int64?, last: Int64?)] = [:]
        for r in (try? Row.fetchAll(db, sql: "SELECT * FROM run_partner WHERE run_number = ?", arguments: [number])) ?? [] {
            if let p = PartnerID(try r.text("partner")) {
                // Runs closed before the statement ranges were recorded have none (NULL, or no
                // such columns in a directory not yet migrated); a range of the wrong type is a
                // breach, not a range left out.
                if r.hasColumn("entry_count"), let count = try r.optionalInt64("entry_count") {
                    ranges[p] = (count, try r.optionalInt64("first_sequence"), try r.optionalInt64("last_sequence"))
                }
                partners[p] = (try r.int64("issued_points"), try r.int64("redeemed_points"), try r.int64("expired_points"),
                               try r.int64("issue_price_per_1000"), try r.int64("redeem_credit_per_1000"), try r.int64("payable_minor"),
                               try r.int64("receivable_minor"), try r.int64("net_minor"))
            }
        }
        var flows: [ReplayBook.FlowKey: Int64] = [:]
        for r in (try? Row.fetchAll(db, sql: "SELECT * FROM run_flow WHERE run_number = ?", arguments: [number])) ?? [] {
            if let i = PartnerID(try r.text("issuer")), let d = PartnerID(try r.text("redeemer")) {
                flows[ReplayBook.FlowKey(issuer: i, redeemer: d)] = try r.int64("points")
            }
        }
        var snapshot: [PartnerID: [Int64]] = [:]
        for r in (try? Row.fetchAll(db, sql: "SELECT * FROM run_snapshot WHERE run_number = ?", arguments: [number])) ?? [] {
            if let p = PartnerID(try r.text("partner")) {
                snapshot[p] = try ["last_sequence", "earned", "redeemed", "earn_reversed", "redemption_reversed"].map { try r.int64($0) }
            }
        }
        var flowSnapshot: [ReplayBook.FlowKey: Int64] = [:]
        for r in (try? Row.fetchAll(db, sql: "SELECT * FROM run_flow_snapshot WHERE run_number = ?", arguments: [number])) ?? [] {
            if let i = PartnerID(try r.text("issuer")), let d = PartnerID(try r.text("redeemer")) {
                flowSnapshot[ReplayBook.FlowKey(issuer: i, redeemer: d)] = try r.int64("points")
            }
        }
        var expiredLots: [Int64: Int64]?
        if let from = expiriesFrom, number >= from {
            expiredLots = [:]
            for r in (try? Row.fetchAll(db, sql: "SELECT lot_id, points FROM run_expiry WHERE run_number = ?", arguments: [number])) ?? [] {
                expiredLots?[try r.int64("lot_id"), default: 0] &+= try r.int64("points")  // an altered sum differs: a breach, not a trap
            }
        }
        return StoredRun(
            number: number, id: row.id, cutoff: row.cutoff, first: row.first, last: row.last, margin: row.margin, gross: row.gross,
            transfers: row.transfers, efficiencyPPM: row.efficiencyPPM, partners: partners, flows: flows,
            ranges: ranges, snapshot: snapshot, flowSnapshot: flowSnapshot, expiredLots: expiredLots)
    }

    /// An entry's acceptance time must lie in its run's window.
    mutating func observe(_ acceptedAt: Instant, id: Int64, partner: PartnerID, sequence: Int64, _ report: inout VerifyReport) {
        guard let run = pending.first(where: { $0.last >= id }), run.first <= id else { return }
        var r = seen[partner] ?? (0, nil, nil)
        r = (r.count + 1, min(r.first ?? sequence, sequence), max(r.last ?? sequence, sequence))
        seen[partner] = r
        let t = acceptedAt.millisecondsSinceEpoch
        if t > run.cutoff.millisecondsSinceEpoch || t <= previousCutoff {
            report.breach("run \(run.id): journal id \(id) accepted at \(acceptedAt) is outside the run's window")
        }
    }

    /// Checks the runs that end before journal id `id`; nil (after the last entry): every run
    /// left, whatever its last id says.
    mutating func closeRuns(before id: Int64?, _ book: inout ReplayBook, _ db: Database, _ report: inout VerifyReport) throws {
        while let next = pending.first, id.map({ next.last < $0 }) ?? true {
            pending.removeFirst()
            // What the run's own row says of itself, checked for every run: an empty run (no
            // notice carries its id or cutoff) has nothing else to be held against.
            if !SettlementRun.isID(next.id, of: next.number) {
                report.breach("run \(next.id): its id is not the one run number \(next.number) gets (\(SettlementRun.id(number: next.number)), or after a restore R<yyMMddHHmmss> and the number in five digits)")
            }
            if next.cutoff.millisecondsSinceEpoch > next.closedAt {
                report.breach("run \(next.id): its cutoff \(next.cutoff.rfc3339) is after the run was closed (\(Instant(millisecondsSinceEpoch: next.closedAt).rfc3339)); settle never closes a run through the future")
            }
            let run: StoredRun
            do { run = try load(next, db) } catch {
                // One run's rows that cannot be read: a breach of that run, and the others (and
                // the ledgers after) are still checked. Its entries were replayed; what it
                // holds of them is taken out of the replay's account of this run.
                report.breach("run \(next.id): \(error): the file was altered or is damaged")
                _ = book.closeRun(cutoff: next.cutoff)
                seen = [:]
                closed += 1
                closedThrough(next.last, cutoff: next.cutoff)
                continue
            }
            closed += 1
            let at = "run \(run.id)"
            if run.first != previousLast &+ 1 { report.breach("\(at): starts at journal id \(run.first), not \(previousLast &+ 1) (a gap or an overlap)") }
            if run.cutoff.millisecondsSinceEpoch < previousCutoff { report.breach("\(at): cutoff before the previous run's") }
            let (acc, expired, expiredLots) = book.closeRun(cutoff: run.cutoff)
            // The lots the run recorded as expired, each with its points, are the replay's.
            if let recorded = run.expiredLots, recorded != expiredLots {
                let differing = Set(recorded.keys).union(expiredLots.keys).filter { recorded[$0] != expiredLots[$0] }.sorted()
                let shown = differing.prefix(5).map { "lot \($0): recorded \(recorded[$0] ?? 0), replayed \(expiredLots[$0] ?? 0)" }
                report.breach("\(at): the lots it expired differ from the replay's (\(shown.joined(separator: "; "))\(differing.count > 5 ? "; …" : ""))")
            }
            let (span, spanOverflow) = run.last.subtractingReportingOverflow(run.first)
            if spanOverflow || span == .max {
                report.breach("\(at): its journal ids \(run.first)…\(run.last) are not a range")
            } else if acc.entries != max(0, span + 1) {
                report.breach("\(at): covers \(span + 1) ids but the journal has \(acc.entries) there")
            }
            var sumNet: Int64 = 0
            var netOverflow = false
            let names = Set(run.partners.keys).union(acc.issued.keys).union(acc.redeemed.keys).union(expired.keys)
            for p in names.sorted() {  // sorted, here and below: the same breaches in the same order every time
                let issued = acc.issued[p] ?? 0, redeemed = acc.redeemed[p] ?? 0, exp = expired[p] ?? 0
                guard let s = run.partners[p] else {
                    if issued != 0 || redeemed != 0 || exp != 0 { report.breach("\(at): partner \(p) had activity but has no figures") }
                    continue
                }
                guard let payable = try? Rounding.priceOf(Points(issued), per1000: MoneyMinor(s.issuePrice)).value,
                    let receivable = try? Rounding.priceOf(Points(redeemed), per1000: MoneyMinor(s.creditPrice)).value
                else {
                    report.breach("\(at): partner \(p)'s prices overflow when applied to its points")
                    continue
                }
                if s.issued != issued || s.redeemed != redeemed || s.expired != exp || s.payable != payable || s.receivable != receivable
                    || s.net != receivable - payable
                {
                    report.breach("\(at): partner \(p)'s figures differ from a recomputation from the journal")
                }
                let (sum, overflow) = sumNet.addingReportingOverflow(s.net)
                if overflow { netOverflow = true } else { sumNet = sum }
            }
            if netOverflow || sumNet.addingReportingOverflow(run.margin).overflow {
                report.breach("\(at): Σ net + operator margin overflows")
            } else if sumNet + run.margin != 0 { report.breach("\(at): Σ net \(sumNet) + operator margin \(run.margin) ≠ 0") }
            // The run's totals, recomputed from its partners' recorded figures (what `runs show`,
            // notices and the books print).
            let recorded = run.partners.map { p, s in
                PartnerFigures(
                    partner: p, issuedPoints: Points(s.issued), redeemedPoints: Points(s.redeemed), expiredPoints: Points(s.expired),
                    payableMinor: MoneyMinor(s.payable), receivableMinor: MoneyMinor(s.receivable), netMinor: MoneyMinor(s.net))
            }
            if let totals = try? RunTotals(recorded) {
                if totals.grossMinor.value != run.gross { report.breach("\(at): gross \(run.gross) ≠ \(totals.grossMinor.value) from its partners' figures") }
                if totals.netTransfersMinor.value != run.transfers {
                    report.breach("\(at): net transfers \(run.transfers) ≠ \(totals.netTransfersMinor.value) from its partners' figures")
                }
                if totals.nettingEfficiencyPPM != run.efficiencyPPM {
                    report.breach("\(at): netting efficiency \(run.efficiencyPPM) ppm ≠ \(totals.nettingEfficiencyPPM) ppm from its partners' figures")
                }
            } else {
                report.breach("\(at): its partners' figures overflow when totalled")
            }
            let flows = acc.flows.filter { $0.value != 0 }
            if flows != run.flows { report.breach("\(at): flows differ from the journal's lot takes") }
            // The ledger ranges statements read must be exactly the run's entries of each partner.
            for (p, stored) in run.ranges.sorted(by: { $0.key < $1.key }) {
                let actual = seen[p] ?? (0, nil, nil)
                if stored.count != actual.count || stored.first != actual.first || stored.last != actual.last {
                    report.breach("\(at): partner \(p)'s statement range differs from its entries in the run")
                }
            }
            // A partner with entries has figures (and a notice) even when they cancel out.
            for (p, actual) in seen.sorted(by: { $0.key < $1.key }) where actual.count > 0 && run.partners[p] == nil {
                report.breach("\(at): partner \(p) has \(actual.count) entries in the run but no figures")
            }
            seen = [:]
            // The snapshot the next run's figures start from: every partner's running totals
            // and the flows as they stood at this cutoff. Runs closed before snapshots were
            // kept (v6) have none; the last run must have one as soon as anything was posted.
            if !run.snapshot.isEmpty || pending.isEmpty {
                let expected = book.kindTotals.mapValues { [$0.entries] + $0.totals }
                for p in Set(expected.keys).union(run.snapshot.keys).sorted() where (run.snapshot[p] ?? [0, 0, 0, 0, 0]) != (expected[p] ?? [0, 0, 0, 0, 0]) {
                    report.breach("\(at): partner \(p)'s snapshot (last sequence, points by kind) \(run.snapshot[p] ?? []) differs from the journal's \(expected[p] ?? [0, 0, 0, 0, 0]) at its cutoff")
                }
                if run.flowSnapshot.filter({ $0.value != 0 }) != book.flows.filter({ $0.value != 0 }) {
                    report.breach("\(at): the flows recorded at its cutoff differ from the journal's")
                }
            }
            var into: [PartnerID: Int64] = [:]
            for (k, v) in run.flows.sorted(by: { ($0.key.issuer, $0.key.redeemer) < ($1.key.issuer, $1.key.redeemer) }) {
                let (sum, overflow) = into[k.redeemer, default: 0].addingReportingOverflow(v)
                if overflow { report.breach("\(at): flows into \(k.redeemer) overflow when totalled") } else { into[k.redeemer] = sum }
            }
            for (p, s) in run.partners.sorted(by: { $0.key < $1.key }) where (into[p] ?? 0) != s.redeemed {
                report.breach("\(at): flows into \(p) sum to \(into[p] ?? 0), its redeemed points are \(s.redeemed)")
            }
            closedThrough(run.last, cutoff: run.cutoff)
        }
    }

    /// Where the next run must start and what its cutoff may not precede.
    private mutating func closedThrough(_ last: Int64, cutoff: Instant) {
        previousLast = last
        previousCutoff = cutoff.millisecondsSinceEpoch
        lastCutoffClosed = previousCutoff
    }

    /// No journal entry at or before the last cutoff may lie outside every run.
    func checkNothingLeftBehind(_ db: Database, _ report: inout VerifyReport) {
        guard let cutoff = lastCutoffClosed else { return }
        let stray = (try? Int64.fetchOne(
            db, sql: "SELECT COUNT(*) FROM journal WHERE id > ? AND accepted_at_ms <= ?", arguments: [previousLast, cutoff])) ?? 0
        if stray > 0 { report.breach("invariant 4: \(stray) entries accepted at or before the last cutoff are in no run") }
    }
}
