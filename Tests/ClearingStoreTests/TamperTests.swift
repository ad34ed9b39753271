import ClearhouseTestSupport
import ClearingDomain
import ClearingStore
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

    @Test func aMissingLedgerIsABreach() throws {
        let h = try populated()
        try FileManager.default.removeItem(at: h.store.ledgerURL(C))
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("ledger cinema") }, "\(r.breaches)")
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
