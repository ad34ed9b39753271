import ClearhouseTestSupport
import ClearingDomain
@testable import ClearingStore
import Foundation
import Testing

/// Replaces the first occurrence of `find` in a file with `replace` (same length).
func patchFile(_ url: URL, find: String, replace: String) throws -> Bool {
    precondition(find.utf8.count == replace.utf8.count)
    var data = try Data(contentsOf: url)
    guard let r = data.range(of: Data(find.utf8)) else { return false }
    data.replaceSubrange(r, with: Data(replace.utf8))
    try data.write(to: url)
    return true
}

@Suite struct TamperTests {
    func populated() throws -> Harness {
        let h = try Harness()
        for i in 1...20 {
            _ = h.post(G, "g\(i)", Fixtures.earn(i == 7 ? "MEMBER-7777" : "M\(i % 4)", Int64(10 * i), "G-\(i)"))
            _ = h.post(C, "c\(i)", Fixtures.redeem("M\(i % 4)", 5, "C-\(i)"))
        }
        try h.store.close()  // checkpoints the WAL into the file
        return h
    }

    @Test func oneChangedByteInALedgerIsFoundAndNamed() throws {
        let h = try populated()
        #expect(try h.verify().ok)
        #expect(try patchFile(h.store.ledgerURL(G), find: "MEMBER-7777", replace: "MEMBER-7778"))
        let r = try h.verify()
        #expect(!r.ok)
        #expect(r.breaches.contains { $0.contains("ledger grocer sequence 7") && $0.contains("altered") }, "\(r.breaches)")
    }

    @Test func oneChangedByteInTheJournalIsFound() throws {
        let h = try populated()
        #expect(try patchFile(h.dir.url.appendingPathComponent("coalition.sqlite"), find: "MEMBER-7777", replace: "MEMBER-7770"))
        let r = try h.verify()
        #expect(!r.ok, "a changed member in the journal or lots must be found")
        #expect(r.breaches.contains { $0.contains("grocer") || $0.contains("MEMBER-7770") }, "\(r.breaches)")
    }

    /// `populated()` settled in one run, with grocer's statement of it.
    func settledWithGrocersStatement() throws -> (Harness, SettlementRun, StatementHeader) {
        let h = try populated()
        try h.reopen()
        h.clock.advance(milliseconds: 1_000)
        let run = try h.store.settle()
        return (h, run, try #require(try h.store.statement(for: G, run: run.id)))
    }

    /// A statement never serves a row changed in the ledger file: reading it fails, naming the
    /// partner and the sequence; another partner's statement of the same run is served.
    @Test func aStatementIsNotServedFromAnAlteredLedger() throws {
        let (h, run, header) = try settledWithGrocersStatement()
        let before = try h.store.statementEntries(header, after: 0, limit: 1_000)
        #expect(before.count == 20)
        try h.store.close()
        let edit = try SQLiteTool.run(
            h.store.ledgerURL(G), "DROP TRIGGER entry_append_only_update; UPDATE entry SET points = points + 1 WHERE sequence = 12")
        #expect(edit.status == 0)
        try h.reopen()
        // From the start, and from a later batch that begins at the altered row.
        for after in [Int64(0), 11] {
            #expect(throws: (any Error).self) { try h.store.statementEntries(header, after: after, limit: 1_000) }
        }
        do {
            _ = try h.store.statementEntries(header, after: 0, limit: 1_000)
        } catch {
            #expect("\(error)".contains("the ledger of grocer is damaged at sequence 12"), "\(error)")
        }
        // Before the altered row, and another partner's statement: served.
        #expect(try h.store.statementEntries(header, after: 0, limit: 11).count == 11)
        let other = try #require(try h.store.statement(for: C, run: run.id))
        #expect(try h.store.statementEntries(other, after: 0, limit: 1_000).count == 20)
    }

    /// An edit whose chain was recomputed from the changed row on (every ledger hash consistent
    /// again) still fails: the chain's end is checked against the journal's.
    @Test func aStatementIsNotServedFromARechainedLedger() throws {
        let (h, _, header) = try settledWithGrocersStatement()
        var entries = try h.store.ledgerEntries(G)
        // Edited while the store runs (a store opening on it would refuse it at once: the
        // ledger's last entry is not the journal's).
        var previous = Store.genesisHash(G)
        var sql = "DROP TRIGGER entry_append_only_update;"
        for i in entries.indices {
            if entries[i].sequence == 12 { entries[i].event.points = Points(entries[i].event.points.value + 1) }
            let hash = Store.chainHash(previous: previous, entry: entries[i])
            if entries[i].sequence >= 12 {
                let hex = { (b: [UInt8]) in b.map { String(format: "%02x", $0) }.joined() }
                sql += "UPDATE entry SET points = \(entries[i].event.points.value), prev_hash = x'\(hex(previous))', hash = x'\(hex(hash))' WHERE sequence = \(entries[i].sequence);"
            }
            previous = hash
        }
        #expect(try SQLiteTool.run(h.store.ledgerURL(G), sql).status == 0)
        do {
            _ = try h.store.statementEntries(header, after: 0, limit: 1_000)
            Issue.record("a re-chained ledger was served")
        } catch {
            #expect("\(error)".contains("the ledger of grocer disagrees with the journal"), "\(error)")
        }
        #expect(try h.store.statementEntries(header, after: 0, limit: 11).count == 11, "the rows before the edit still end on the journal's chain")
    }

    /// A value of the wrong type in a ledger column (written around the triggers) is a
    /// breach naming the entry, never a crash of verify.
    @Test func aWrongTypeInALedgerColumnIsABreachNotACrash() throws {
        let h = try populated()
        let edit = try SQLiteTool.run(
            h.store.ledgerURL(G),
            "PRAGMA ignore_check_constraints = ON; DROP TRIGGER entry_append_only_update; UPDATE entry SET points = 'many', hash = 'x' WHERE sequence = 5")
        #expect(edit.status == 0)
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("ledger grocer sequence 5") }, "\(r.breaches)")
    }

    /// An event with no original reference keeps NULL there. Any text in its place, even one
    /// that is no reference ('' included), is a change to the entry: it used to be read as
    /// none, so the entry hashed and compared as before the edit and verify passed.
    @Test(arguments: ["''", "'R-1'", "'not a reference!'"])
    func textWhereAnEntryHasNoOriginalReferenceIsABreach(value: String) throws {
        let h = try populated()
        let ledger = try SQLiteTool.run(
            h.store.ledgerURL(G),
            "DROP TRIGGER entry_append_only_update; UPDATE entry SET original_reference = \(value) WHERE sequence = 3")
        #expect(ledger.status == 0, "\(ledger.stderr)")
        var r = try h.verify()
        #expect(r.breaches.contains { $0.contains("ledger grocer sequence 3") }, "\(r.breaches)")
        let journal = try SQLiteTool.run(
            h.dir.url.appendingPathComponent("coalition.sqlite"),
            "PRAGMA ignore_check_constraints = ON; DROP TRIGGER journal_no_update; UPDATE journal SET original_reference = \(value) WHERE partner = 'grocer' AND sequence = 3")
        #expect(journal.status == 0, "\(journal.stderr)")
        r = try h.verify()
        #expect(r.breaches.contains { $0.hasPrefix("journal id") && $0.contains("entry grocer #3 does not decode") }, "\(r.breaches)")
    }

    /// A ledger's record of its owner and genesis hash edited is a breach naming the ledger.
    @Test(arguments: [
        ("UPDATE ledger_info SET genesis_hash = zeroblob(32)", "ledger grocer: ledger_info holds another genesis hash"),
        ("UPDATE ledger_info SET partner = 'cinema'", "ledger grocer: belongs to cinema"),
        ("PRAGMA ignore_check_constraints = ON; UPDATE ledger_info SET partner = x'00'", "ledger grocer: belongs to nobody"),
    ])
    func anEditedLedgerInfoIsABreach(edit: String, breach: String) throws {
        let h = try populated()
        let r = try SQLiteTool.run(h.store.ledgerURL(G), edit)
        #expect(r.status == 0, "\(r.stderr)")
        let breaches = try h.verify().breaches
        #expect(breaches.contains { $0.hasPrefix(breach) }, "\(breaches)")
    }

    /// A journal row whose sequence is not an integer is a breach, and the ledger comparison
    /// passes over it: the ledger entry it should have matched is named, not every one after it.
    @Test func aJournalSequenceOfTheWrongTypeDoesNotDerailTheLedgerComparison() throws {
        let h = try populated()
        let edit = try SQLiteTool.run(
            h.dir.url.appendingPathComponent("coalition.sqlite"),
            "PRAGMA ignore_check_constraints = ON; DROP TRIGGER journal_no_update; UPDATE journal SET sequence = 4.5 WHERE partner = 'grocer' AND sequence = 5")
        #expect(edit.status == 0, "\(edit.stderr)")
        let r = try h.verify()
        #expect(!r.ok)
        #expect(r.breaches.contains { $0.hasSuffix(": column sequence is not an integer") }, "\(r.breaches)")
        // (The entry is left out of the replay, so the lots and balances after it differ too.)
        #expect(r.breaches.filter { $0.hasPrefix("ledger ") } == ["ledger grocer sequence 5: differs from the journal"], "\(r.breaches)")
    }

    /// A ledger file that is a database but no ledger (its tables gone) is a breach naming it,
    /// and the other ledgers are still checked; never an error of verify.
    @Test func aLedgerWithoutItsTablesIsABreachNamingIt() throws {
        let h = try populated()
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: h.store.ledgerURL(G).path + suffix) }
        #expect(try SQLiteTool.run(h.store.ledgerURL(G), "PRAGMA journal_mode = WAL; CREATE TABLE other (x); DROP TABLE other").status == 0)
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("ledger grocer: cannot be read as a ledger") }, "\(r.breaches)")
        #expect(r.checks.contains { $0.contains("invariant 3") }, "the other ledgers were checked")
    }

    @Test func aMissingLedgerIsABreach() throws {
        let h = try populated()
        try FileManager.default.removeItem(at: h.store.ledgerURL(C))
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("ledger cinema") }, "\(r.breaches)")
    }

    /// An entry appended to a ledger with a correct chain but in no journal (forged, or left by
    /// a journal restored from an older backup) is a breach, though the ledger alone looks whole.
    @Test func aChainedEntryAppendedToALedgerButInNoJournalIsABreach() throws {
        let h = try populated()
        let ledger = h.store.ledgerURL(G)
        // Sequence 21, linked to sequence 20 (the ledger's own trigger checks the link and passes it).
        let added = try SQLiteTool.run(ledger, """
            INSERT INTO entry (sequence, journal_id, webhook_id, accepted_at_ms, kind, member, points, reference, original_reference,
              occurred_at_ms, amount_minor, member_balance, prev_hash, hash)
            SELECT 21, journal_id + 1000, webhook_id || 'x', accepted_at_ms, kind, member, points, reference || 'x', original_reference,
              occurred_at_ms, amount_minor, member_balance, hash, hash FROM entry WHERE sequence = 20
            """)
        #expect(added.status == 0, "\(added.stderr)")
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("ledger grocer: holds sequence 21 but the journal ends at 20") }, "\(r.breaches)")
    }

    /// A ledger of the same length as its journal but another history (a file from another
    /// backup): the store refuses to open (it used to accept it and then commit postings to the
    /// journal that the ledger could never take), and verify names the difference.
    @Test func aLedgerFromAnotherHistoryIsRefusedAtStart() throws {
        let h = try populated()
        let other = try Harness()
        for i in 1...20 {
            _ = other.post(G, "g\(i)", Fixtures.earn(i == 20 ? "SOMEONE-ELSE" : (i == 7 ? "MEMBER-7777" : "M\(i % 4)"), Int64(10 * i), "G-\(i)"))
        }
        try other.store.close()
        let mine = h.store.ledgerURL(G)
        for suffix in ["-wal", "-shm"] { try? FileManager.default.removeItem(atPath: mine.path + suffix) }
        try FileManager.default.removeItem(at: mine)
        try FileManager.default.copyItem(at: other.store.ledgerURL(G), to: mine)
        #expect(throws: StoreError.self) { try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock) }
        do { _ = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock) } catch {
            #expect("\(error)".contains("ledger grocer: its entry at sequence 20 is not the journal's"), "\(error)")
        }
        let r = try h.verify()
        // The ledger is read in step with its journal entries: each entry that differs is named,
        // and only those. The other history has grocer's entries alone, so from sequence 2 on
        // they carry other journal ids (here the cinema's postings came between); sequence 1 is
        // the same in both.
        #expect(r.breaches.filter { $0.contains("differs from the journal") } == (2...20).map { "ledger grocer sequence \($0): differs from the journal" }, "\(r.breaches)")
    }

    /// Ledgers without their journal: `verify` says so (it used to find "nothing to verify"),
    /// and the store refuses to start a new journal beside them.
    @Test func ledgersWithoutTheirJournalAreABreachAndTheStoreWillNotOpen() throws {
        let h = try populated()
        for suffix in ["", "-wal", "-shm"] {
            try? FileManager.default.removeItem(at: h.dir.url.appendingPathComponent("coalition.sqlite" + suffix))
        }
        let r = try h.verify()
        #expect(!r.ok && r.breaches.contains { $0.contains("no coalition.sqlite: the journal is missing") }, "\(r.breaches)")
        #expect(throws: StoreError.self) { try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock) }
        #expect(!FileManager.default.fileExists(atPath: h.dir.url.appendingPathComponent("coalition.sqlite").path), "no new journal was made")
        // No data directory at all: a breach too (a mistyped --data is not "ok").
        let missing = try Verifier.verify(dataDirectory: h.dir.url.appendingPathComponent("no-such-dir"))
        #expect(!missing.ok && missing.breaches[0].contains("no such data directory"))
        // An empty one: nothing in it can break an invariant (CONTRACT §10), and it says so.
        let empty = h.dir.url.appendingPathComponent("empty")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
        let none = try Verifier.verify(dataDirectory: empty)
        #expect(none.ok && none.checks.contains { $0.contains("nothing has been accepted there, nothing to verify") }, "\(none.checks)")
        // An empty coalition.sqlite (a first start that stopped before its schema): nothing was
        // accepted; beside ledgers, the journal is missing.
        let blank = h.dir.url.appendingPathComponent("blank")
        try FileManager.default.createDirectory(at: blank, withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: blank.appendingPathComponent("coalition.sqlite").path, contents: Data()))
        let unmade = try Verifier.verify(dataDirectory: blank)
        #expect(unmade.ok && unmade.checks.contains { $0.contains("has no tables yet") }, "\(unmade.breaches)")
        // GRDB makes its (empty) table of migrations before the first one runs.
        #expect(try SQLiteTool.run(blank.appendingPathComponent("coalition.sqlite"), "CREATE TABLE grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY)").status == 0)
        #expect(try Verifier.verify(dataDirectory: blank).ok)
        try FileManager.default.createDirectory(at: blank.appendingPathComponent("ledgers"), withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: h.store.ledgerURL(G), to: blank.appendingPathComponent("ledgers/grocer.sqlite"))
        #expect(try Verifier.verify(dataDirectory: blank).breaches.contains { $0.contains("holds no journal (no tables) beside 1 ledger(s)") })
        // No verb starts a journal there: the store refuses, and the file keeps no schema.
        do {
            _ = try Store(dataDirectory: blank, configuration: h.configuration, clock: h.clock)
            Issue.record("a journal with no tables beside a ledger was opened")
        } catch {
            #expect("\(error)".contains("holds 1 ledger(s) but coalition.sqlite holds no journal (no tables)"), "\(error)")
        }
        #expect(try SQLiteTool.run(blank.appendingPathComponent("coalition.sqlite"), "SELECT name FROM sqlite_master WHERE name = 'journal'").stdout.isEmpty)
        #expect(try SQLiteTool.run(blank.appendingPathComponent("coalition.sqlite"), "PRAGMA journal_mode").stdout.hasPrefix("delete"), "not even turned to WAL")
        #expect(!FileManager.default.fileExists(atPath: blank.appendingPathComponent("coalition.sqlite-wal").path))
        // Truncated to 0 bytes beside a ledger: refused before anything is written into it.
        let zero = blank.appendingPathComponent("coalition.sqlite")
        try FileManager.default.removeItem(at: zero)
        #expect(FileManager.default.createFile(atPath: zero.path, contents: Data()))
        do {
            _ = try Store(dataDirectory: blank, configuration: h.configuration, clock: h.clock)
            Issue.record("an empty journal beside a ledger was opened")
        } catch {
            #expect("\(error)".contains("holds 1 ledger(s) but an empty coalition.sqlite (0 bytes)"), "\(error)")
        }
        #expect(try FileManager.default.attributesOfItem(atPath: zero.path)[.size] as? Int == 0)
        // A coalition.sqlite that is no database (overwritten, truncated garbage): a breach
        // naming the file, not a raw SQLite error.
        let garbage = h.dir.url.appendingPathComponent("garbage")
        try FileManager.default.createDirectory(at: garbage, withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(
            atPath: garbage.appendingPathComponent("coalition.sqlite").path, contents: Data("SQLite format 3\u{0}".utf8) + Data(repeating: 0x5A, count: 8000)))
        let unreadable = try Verifier.verify(dataDirectory: garbage)
        #expect(!unreadable.ok && unreadable.breaches.contains {
            $0.contains("garbage/coalition.sqlite: cannot be read: SQLite error 26") && $0.contains("the file is damaged: restore it from a backup")
        }, "\(unreadable.breaches)")
        // One that cannot be opened (here a directory; as another user, permissions): the check
        // could not finish, and no restore is advised (it would lose what came since the backup).
        let blocked = h.dir.url.appendingPathComponent("blocked")
        try FileManager.default.createDirectory(at: blocked.appendingPathComponent("coalition.sqlite"), withIntermediateDirectories: true)
        let unopened = try Verifier.verify(dataDirectory: blocked)
        #expect(!unopened.ok && unopened.breaches.allSatisfy { $0.contains("verification could not finish") && !$0.contains("restore") }, "\(unopened.breaches)")
        // What an interrupted restore leaves: a breach naming it.
        try FileManager.default.createDirectory(at: empty.appendingPathComponent(Backup.restoreStaging), withIntermediateDirectories: true)
        #expect(try Verifier.verify(dataDirectory: empty).breaches.contains { $0.contains("holds an interrupted restore") })
    }

    /// A partner whose entries cancel out still has figures and a notice; a run whose row for
    /// it is gone (with its notice) is a breach naming it.
    @Test func aPartnerWithEntriesButNoFiguresIsABreach() throws {
        let h = try Harness()
        _ = h.post(F, "f1", Fixtures.earn("M1", 10, "F-1"))
        _ = h.post(F, "f2", Fixtures.reverseEarn("M1", 10, "F-2", of: "F-1"))
        h.clock.advance(milliseconds: 1_000)
        let run = try h.store.settle()
        #expect(run.partners.contains { $0.partner == F && $0.issuedPoints == .zero })
        try h.store.close()
        #expect(try h.verify().ok)
        let edit = try SQLiteTool.run(
            h.dir.url.appendingPathComponent("coalition.sqlite"),
            "DROP TRIGGER run_partner_immutable_d; DROP TRIGGER notice_never_deleted; DELETE FROM notice WHERE partner = 'fuel'; DELETE FROM run_partner WHERE partner = 'fuel'")
        #expect(edit.status == 0, "\(edit.stderr)")
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("partner fuel has 2 entries in the run but no figures") }, "\(r.breaches)")
    }

    /// Grocer issues 1000 points to M1, 400 of them redeemed at the cinema; run R000001 settles them.
    func settledOnce() throws -> Harness {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 400, "C-1"))
        h.clock.advance(milliseconds: 1_000)
        _ = try h.store.settle()
        return h
    }

    /// `settledOnce` (then `more` posted), verified, closed, edited with the `sqlite3` shell
    /// (which must take the edit): what verify then reports.
    func verifiedAfterEditing(_ edit: String, after more: (Harness) -> Void = { _ in }) throws -> VerifyReport {
        let h = try settledOnce()
        more(h)
        try h.store.close()
        #expect(try h.verify().ok)
        let r = try SQLiteTool.run(h.dir.url.appendingPathComponent("coalition.sqlite"), edit)
        #expect(r.status == 0, "\(r.stderr)")
        return try h.verify()
    }

    /// Invariant 5 and the run's totals: a run edited around its triggers (margin, gross, net
    /// transfers, netting efficiency) is a breach naming the run.
    @Test(arguments: [
        ("operator_margin_minor = operator_margin_minor + 1", "Σ net"),
        ("gross_minor = gross_minor + 1", "gross"),
        ("net_transfers_minor = net_transfers_minor + 1", "net transfers"),
        ("netting_efficiency_ppm = 999999", "netting efficiency"),
    ])
    func anEditedRunTotalIsABreach(edit: String, named: String) throws {
        let h = try settledOnce()
        try h.store.close()
        #expect(try h.verify().ok)
        let changed = try SQLiteTool.run(
            h.dir.url.appendingPathComponent("coalition.sqlite"), "DROP TRIGGER run_immutable_u; UPDATE run SET \(edit) WHERE number = 1")
        #expect(changed.status == 0, "\(changed.stderr)")
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("run R000001") && $0.contains(named) }, "\(r.breaches)")
    }

    /// What settle computes a run from besides the journal (each partner's running totals,
    /// the snapshot at the last cutoff, the moves between flows): each, edited, is a breach
    /// before any run is made of it; and settle itself refuses figures whose flows do not add
    /// up to the redeemed points, recording nothing.
    @Test(arguments: [
        ("UPDATE partner_head SET earned = earned + 100000 WHERE partner = 'grocer'", "partner_head grocer: running totals"),
        ("DROP TRIGGER run_snapshot_immutable_u; UPDATE run_snapshot SET redeemed = redeemed + 7 WHERE partner = 'cinema'", "run R000001: partner cinema's snapshot"),
        ("DROP TRIGGER run_flow_snapshot_immutable_u; UPDATE run_flow_snapshot SET points = points - 50", "run R000001: the flows recorded at its cutoff"),
        ("DROP TRIGGER lot_move_no_update; UPDATE lot_move SET points = points + 19 WHERE entry_id = (SELECT MAX(entry_id) FROM lot_move)", "lot_move"),
    ])
    func whatSettleComputesFromIsVerified(edit: String, named: String) throws {
        let h = try settledOnce()
        h.clock.advance(milliseconds: 1_000)
        _ = h.post(G, "g2", Fixtures.earn("M1", 100, "G-2"))
        _ = h.post(C, "c2", Fixtures.redeem("M1", 300, "C-2"))
        // A cutoff before these two: a run then subtracts their moves from the flows.
        let cutoff = Instant(millisecondsSinceEpoch: h.clock.now().millisecondsSinceEpoch - 1)
        try h.store.close()
        #expect(try h.verify().ok)
        let changed = try SQLiteTool.run(h.dir.url.appendingPathComponent("coalition.sqlite"), edit)
        #expect(changed.status == 0, "\(changed.stderr)")
        let r = try h.verify()
        #expect(!r.ok && r.breaches.contains { $0.contains(named) }, "\(r.breaches)")
        // A run made of the flows or the snapshot's flows: settle refuses it, and records nothing.
        if edit.contains("flow") || edit.contains("lot_move") {
            try h.reopen()
            #expect(throws: SettlementError.self) { try h.store.settle(through: cutoff) }
            #expect(try h.store.runs().count == 1, "no second run")
        }
    }

    /// A reversal gives its points back to the issuer its take names: SQLite refuses to change
    /// a take but its `returned`, or any move, and a take edited around that is a breach.
    @Test func aTakeOrAMoveIsFixedOnceWrittenAndAnEditedIssuerIsABreach() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(F, "f1", Fixtures.earn("M1", 100, "F-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 150, "C-1"))
        try h.store.close()
        let url = h.dir.url.appendingPathComponent("coalition.sqlite")
        for sql in [
            "UPDATE lot_take SET issuer = 'fuel' WHERE position = 0", "UPDATE lot_take SET points = 1", "DELETE FROM lot_take",
            "UPDATE lot_move SET issuer = 'fuel'", "DELETE FROM lot_move",
        ] {
            let r = try SQLiteTool.run(url, sql)
            #expect(r.status != 0 && (r.stderr.contains("lot_take:") || r.stderr.contains("lot_move:")), "\(sql): \(r.stderr)")
        }
        #expect(try h.verify().ok)
        let edit = try SQLiteTool.run(url, "DROP TRIGGER lot_take_only_returned_changes; UPDATE lot_take SET issuer = 'fuel' WHERE position = 0")
        #expect(edit.status == 0, "\(edit.stderr)")
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("lot_take 3/0") }, "\(r.breaches)")
    }

    /// A text read stops at a NUL byte, so text edited after one would decode, and hash, as
    /// before: the NUL itself is the breach, in the journal and in a ledger. (With such a
    /// reference, a reversal naming the real one was refused, and a new earn reusing it taken.)
    @Test(arguments: [
        ("coalition.sqlite", "DROP TRIGGER journal_no_update; UPDATE journal SET reference = reference || char(0) || 'X' WHERE id = 3", "journal grocer sequence 2"),
        ("ledgers/grocer.sqlite", "DROP TRIGGER entry_append_only_update; UPDATE entry SET member = member || char(0) || 'X' WHERE sequence = 4", "ledger grocer sequence 4"),
    ])
    func textAlteredAfterANulByteIsABreach(file: String, edit: String, named: String) throws {
        let h = try populated()
        #expect(try h.verify().ok)
        let r = try SQLiteTool.run(h.dir.url.appendingPathComponent(file), edit)
        #expect(r.status == 0, "\(r.stderr)")
        let report = try h.verify()
        #expect(report.breaches.contains { $0.contains(named) && $0.contains("NUL") }, "\(report.breaches)")
    }

    /// Figures altered to the edge of Int64 are breaches, never an arithmetic trap in verify.
    @Test(arguments: [
        "PRAGMA ignore_check_constraints = ON; DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET net_minor = 9223372036854775807",
        "DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET issue_price_per_1000 = 9223372036854775807",
        "PRAGMA ignore_check_constraints = ON; DROP TRIGGER run_immutable_u; UPDATE run SET last_journal_id = 9223372036854775807, first_journal_id = -9223372036854775807",
        "DROP TRIGGER run_immutable_u; UPDATE run SET last_journal_id = 9223372036854775807",
        "DROP TRIGGER journal_no_update; UPDATE journal SET sequence = 9223372036854775807 WHERE id = 2",
        "DROP TRIGGER journal_no_update; UPDATE journal SET id = 9223372036854775807 WHERE id = 2",
        "DROP TRIGGER run_flow_immutable_u; UPDATE run_flow SET points = 9223372036854775807; INSERT INTO run_flow SELECT run_number, 'fuel', redeemer, 9223372036854775807 FROM run_flow",
        "PRAGMA ignore_check_constraints = ON; DROP TRIGGER lot_open_update_within_its_lot; DROP TRIGGER lot_open_insert_within_its_lot; UPDATE lot_open SET remaining = 9223372036854775807",
    ])
    func figuresAtTheEdgeOfInt64AreBreachesNotACrash(edit: String) throws {
        #expect(try !verifiedAfterEditing(edit, after: { _ = $0.post(G, "g2", Fixtures.earn("M1", 5, "G-2")) }).ok)
    }

    /// A value of the wrong type where the schema keeps a number (SQLite stores what it is
    /// given where no CHECK refuses it), or a column gone, is a breach that names the table and
    /// column, never a trap in verify. Each of these stopped verify with a fatal error before (the first needs
    /// no trigger dropped at all); an open lot's position below 0 was an index out of range.
    @Test(arguments: [
        ("UPDATE member SET open_points = 'abc' WHERE member = 'M1'", "member: column open_points is not an integer"),
        ("PRAGMA ignore_check_constraints = ON; UPDATE flow SET points = 'abc'", "flow: column points is not an integer"),
        ("PRAGMA ignore_check_constraints = ON; UPDATE partner_head SET last_sequence = 'abc'", "column last_sequence is not an integer"),
        ("PRAGMA ignore_check_constraints = ON; UPDATE expiry_terms SET points_expire_after_days = 'abc'", "column points_expire_after_days is not an integer"),
        ("DROP TRIGGER run_immutable_u; UPDATE run SET cutoff_ms = 'abc'", "run 1: column cutoff_ms is not an integer"),
        ("DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET issued_points = 'abc'", "column issued_points is not an integer"),
        // A statement range of the wrong type was taken for a run of the old format, with none.
        ("DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET entry_count = 'abc'", "column entry_count is not an integer"),
        ("DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET last_sequence = 'x' WHERE last_sequence IS NOT NULL", "column last_sequence is not an integer"),
        ("DROP TRIGGER run_snapshot_immutable_u; UPDATE run_snapshot SET earned = 'abc'", "column earned is not an integer"),
        ("DROP TRIGGER run_flow_immutable_u; UPDATE run_flow SET points = 'abc'", "column points is not an integer"),
        ("PRAGMA ignore_check_constraints = ON; DROP TRIGGER lot_take_only_returned_changes; UPDATE lot_take SET returned = 'abc'", "lot_take: column returned is not an integer"),
        ("PRAGMA ignore_check_constraints = ON; DROP TRIGGER lot_take_only_returned_changes; UPDATE lot_take SET position = -5", "lot_take"),
        ("PRAGMA ignore_check_constraints = ON; UPDATE lot SET expired = 'abc'", "lot: column expired is not an integer"),
        // A real where an integer was: read as the integer it was before (rounded toward zero),
        // it hashed and replayed as the entry before the edit.
        ("UPDATE member SET open_points = open_points + 0.5 WHERE member = 'M1'", "member: column open_points is not an integer"),
        ("DROP TRIGGER journal_no_update; UPDATE journal SET points = points + 0.5 WHERE id = 1", "journal id 1: column points is not an integer"),
        ("DROP TRIGGER run_flow_immutable_u; UPDATE run_flow SET points = points + 0.25", "column points is not an integer"),
        // A column gone from a table verify reads whole (GRDB's lookup by name trapped too).
        ("ALTER TABLE run RENAME COLUMN cutoff_ms TO cutoff_ms_x", "run 1: column cutoff_ms is missing"),
        ("ALTER TABLE run_partner DROP COLUMN issued_points", "column issued_points is missing"),
        ("ALTER TABLE run_flow RENAME COLUMN points TO p", "column points is missing"),
    ])
    func aValueOfTheWrongTypeIsABreachNotACrash(edit: String, breach: String) throws {
        let report = try verifiedAfterEditing(edit, after: { _ = $0.post(C, "c2", Fixtures.redeem("M1", 5, "C-2")) })
        #expect(report.breaches.contains { $0.contains(breach) }, "\(report.breaches)")
    }

    /// One run's row that cannot be read is a breach of that run; the other runs, the notices
    /// and every ledger are still checked (verify used to stop there). Reading that run for
    /// `runs show` names the run and column (GRDB's subscripts trapped on text).
    @Test func aRunThatCannotBeReadIsABreachAndTheRestIsStillChecked() throws {
        let report = try verifiedAfterEditing(
            "DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET issued_points = 'abc' WHERE partner = 'grocer' AND run_number = 1",
            after: { h in
                _ = h.post(G, "g2", Fixtures.earn("M1", 50, "G-2"))
                h.clock.advance(milliseconds: 1_000)
                _ = try? h.store.settle()
            })
        #expect(report.breaches.contains { $0.hasPrefix("run R000001: column issued_points is not an integer") }, "\(report.breaches)")
        #expect(!report.breaches.contains { $0.contains("could not finish") }, "\(report.breaches)")
        // Its notice to grocer carries those figures: it cannot be checked either.
        #expect(report.breaches.filter { !$0.hasPrefix("run R000001:") && !$0.hasPrefix("notice R000001:grocer:") }.isEmpty,
                "the second run and the ledgers check out: \(report.breaches)")
        #expect(report.checks.contains { $0.hasPrefix("invariant 3:") }, "the ledgers were checked: \(report.checks)")
        #expect(report.checks.contains { $0.hasPrefix("invariants 4 and 5: 2 runs") }, "\(report.checks)")
    }

    /// A run's own row, held against itself: an empty run (here the second, closed with nothing
    /// in it) has no notice that carries its id or cutoff, so a renamed run, or one whose cutoff
    /// was moved past the moment it was closed, must still be a breach.
    @Test(arguments: [
        ("id = 'R000009'", "run R000009: its id is not the one run number 2 gets (R000002"),
        ("id = 'R26120100000100001'", "run R26120100000100001: its id is not the one run number 2 gets"),
        ("cutoff_ms = cutoff_ms + 864000000", "run R000002: its cutoff "),
        ("cutoff_ms = cutoff_ms + 864000000, id = 'R000009'", "run R000009: its cutoff "),
    ])
    func anEmptyRunEditedInItsOwnRowIsABreach(edit: String, breach: String) throws {
        let report = try verifiedAfterEditing(
            "DROP TRIGGER run_immutable_u; UPDATE run SET \(edit) WHERE number = 2",
            after: { h in
                h.clock.advance(milliseconds: 1_000)
                _ = try? h.store.settle()
            })
        #expect(report.breaches.contains { $0.hasPrefix(breach) }, "\(report.breaches)")
    }

    /// A file whose structure is damaged while every value still reads as before: an index
    /// that no longer matches its table (its definition changed under it), and a ledger whose
    /// header counts free pages it does not have. Only SQLite's integrity check sees either.
    @Test func aDamagedFileStructureIsABreach() throws {
        let report = try verifiedAfterEditing(
            "PRAGMA writable_schema = ON; UPDATE sqlite_schema SET sql = 'CREATE INDEX lot_expiry ON lot(points) WHERE expires_at_ms IS NOT NULL' WHERE name = 'lot_expiry'")
        #expect(report.breaches.contains { $0.hasPrefix("coalition.sqlite: damaged: row ") && $0.hasSuffix("missing from index lot_expiry") }, "\(report.breaches)")

        let h = try settledOnce()
        try h.store.close()
        #expect(try h.verify().ok)
        let ledger = h.dir.url.appendingPathComponent("ledgers/\(G.rawValue).sqlite")
        let file = try FileHandle(forUpdating: ledger)
        try file.seek(toOffset: 36)  // the header's count of free pages (SQLite's file format, §1.3)
        try file.write(contentsOf: Data([0, 0, 0, 7]))
        try file.close()
        let damaged = try h.verify()
        #expect(damaged.breaches.contains { $0.hasPrefix("ledger \(G.rawValue): damaged: ") && $0.contains("freelist") }, "\(damaged.breaches)")
        #expect(damaged.breaches.allSatisfy { $0.hasPrefix("ledger \(G.rawValue): damaged: ") }, "the ledger's entries still check out: \(damaged.breaches)")
    }

    /// The ids runs get, with no restore and after one, are their own; another number's is not.
    @Test func runIDsAreRecognisedAsTheirNumbers() {
        #expect(SettlementRun.isID("R000002", of: 2) && SettlementRun.isID("R1234567", of: 1_234_567))
        #expect(SettlementRun.isID("R26120100000100002", of: 2) && SettlementRun.isID("R261201000001123456", of: 123_456))
        for (id, number) in [("R000009", 2), ("R00002", 2), ("R2612010000010002", 2), ("R26120100000100009", 2), ("X000002", 2), ("R-00002", 2), ("R26120100000A00002", 2)] as [(String, Int64)] {
            #expect(!SettlementRun.isID(id, of: number), "\(id)")
        }
    }

    @Test func aRunThatCannotBeReadIsNamedByRunsShow() throws {
        let h = try settledOnce()
        try h.store.close()
        let edit = try SQLiteTool.run(
            h.dir.url.appendingPathComponent("coalition.sqlite"),
            "DROP TRIGGER run_flow_immutable_u; UPDATE run_flow SET points = 'abc'")
        #expect(edit.status == 0, "\(edit.stderr)")
        let reader = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true)
        defer { try? reader.close() }
        #expect { try reader.run(id: "R000001") } throws: { "\($0)".contains("run 1: column points is not an integer") }
    }

    /// The coalition's currency edited: every later run, notice and export would be in another
    /// currency than the runs before. The last run says which it is.
    @Test func anEditedCoalitionCurrencyIsABreach() throws {
        let report = try verifiedAfterEditing("DROP TRIGGER coalition_currency_no_update; UPDATE coalition_currency SET currency = 'GBP'")
        #expect(report.breaches.contains { $0.hasPrefix("coalition_currency: GBP, but the last run, R000001, is in ") }, "\(report.breaches)")
    }

    /// Rows that refer to rows that do not exist (added with foreign keys off, the `sqlite3`
    /// shell's default) are breaches: figures of a run not yet closed would be taken over by, or
    /// stop, the next settle.
    @Test(arguments: [
        ("INSERT INTO run_flow SELECT 7, issuer, redeemer, points FROM run_flow LIMIT 1", "run_flow: a row refers to a row of run"),
        ("INSERT INTO run_snapshot SELECT 7, partner, last_sequence, earned, redeemed, earn_reversed, redemption_reversed FROM run_snapshot LIMIT 1", "run_snapshot"),
        ("DROP TRIGGER lot_move_no_update; UPDATE lot_move SET lot_id = 999999", "lot_move: a row refers to a row of lot"),
    ])
    func rowsThatReferToNothingAreBreaches(edit: String, breach: String) throws {
        let report = try verifiedAfterEditing(edit)
        #expect(report.breaches.contains { $0.contains(breach) }, "\(report.breaches)")
    }

    /// A ledger with entries of a partner the journal holds none of (the journal's `-wal` lost,
    /// an older journal copied back) is refused at start, by writers and readers alike: taken
    /// as a new history, its old entries would make the ledger skip the new ones silently.
    @Test func aLedgerWhosePartnerTheJournalDoesNotKnowIsRefused() throws {
        let h = try Harness()
        _ = h.post(F, "f1", Fixtures.earn("M1", 10, "F-1"))
        try h.store.close()
        let journal = h.dir.url.appendingPathComponent("coalition.sqlite")
        let elsewhere = TemporaryDirectory("clearhouse-older-journal")
        defer { elsewhere.remove() }
        let older = elsewhere.url.appendingPathComponent("coalition.sqlite")
        try FileManager.default.copyItem(at: journal, to: older)
        try h.reopen()
        _ = h.post(G, "g1", Fixtures.earn("M1", 10, "G-1"))
        _ = h.post(G, "g2", Fixtures.earn("M2", 10, "G-2"))
        try h.store.close()
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(at: h.dir.url.appendingPathComponent("coalition.sqlite" + suffix)) }
        try FileManager.default.copyItem(at: older, to: journal)
        #expect {
            try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        } throws: { "\($0)".contains("ledger grocer holds sequence 2 but the journal ends at 0") }
        #expect(throws: (any Error).self) { try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true) }
        #expect(try h.verify().breaches.contains { $0.contains("ledger grocer") })
    }

    /// What is no configured partner's ledger is left alone at start (a copy kept by hand), and
    /// an empty file for a partner with no entry yet (a first batch in flight) opens read-only
    /// without being written.
    @Test func strayAndEmptyLedgerFilesDoNotStopAStart() throws {
        let h = try populated()
        let ledgers = h.dir.url.appendingPathComponent("ledgers")
        try FileManager.default.copyItem(at: h.store.ledgerURL(G), to: ledgers.appendingPathComponent("grocer-old.sqlite"))
        #expect(FileManager.default.createFile(atPath: h.store.ledgerURL(F).path, contents: Data()))
        let reader = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true)
        #expect(try reader.balance(of: MemberID("M1")!).value > 0)
        try reader.close()
        #expect(try FileManager.default.attributesOfItem(atPath: h.store.ledgerURL(F).path)[.size] as? Int == 0, "nothing written")
        try h.reopen()
        #expect(h.post(F, "f1", Fixtures.earn("M1", 10, "F-1")).httpStatus == 201)
    }

    @Test func ledgersRefuseUpdatesDeletesAndGapsThemselves() throws {
        let h = try populated()
        try h.reopen()
        // Even a tool with write access to the file cannot edit history through SQLite.
        for sql in ["UPDATE entry SET points = 1 WHERE sequence = 3", "DELETE FROM entry WHERE sequence = 20"] {
            let r = try SQLiteTool.run(h.store.ledgerURL(G), sql)
            #expect(r.status != 0 && r.stderr.contains("append-only"), "\(sql): \(r.stderr)")
        }
        #expect(try h.verify().ok)
    }
}
