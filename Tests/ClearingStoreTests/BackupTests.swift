import ClearhouseTestSupport
import ClearingDomain
@testable import ClearingStore
import Foundation
import Synchronization
import Testing

@Suite struct BackupTests {
    /// A backup taken while a writer posts is consistent: restored, recovered and verified, it
    /// holds every posting acknowledged before the backup began, each exactly once.
    @Test func aBackupTakenUnderLoadRestoresAndVerifies() async throws {
        let h = try Harness()
        let writer = PostingWriter(store: h.store)
        let acknowledged = Mutex<[String]>([])
        let stop = Atomic<Bool>(false)
        let load = Task.detached {
            var i = 0
            while !stop.load(ordering: .relaxed) && i < 20_000 {
                i += 1
                let p = [G, F, C][i % 3]
                let outcome = await writer.post(Submission(
                    partner: p, webhookID: WebhookID("w\(i)")!, event: Fixtures.earn("M\(i % 50)", 10, "E-\(i)")))
                if case .created = outcome { acknowledged.withLock { $0.append("E-\(i)") } }
            }
        }
        // Let the load run, then back up in the middle of it.
        while acknowledged.withLock({ $0.count }) < 500 { try await Task.sleep(for: .milliseconds(5)) }
        let before = acknowledged.withLock { Set($0) }
        let backup = h.dir.url.deletingLastPathComponent().appendingPathComponent("backup-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: backup) }
        // The statement key serve made in the data directory goes with the data, owner-only.
        try "a key\n".write(to: h.dir.url.appendingPathComponent("statement.key"), atomically: false, encoding: .utf8)
        let summary = try Backup.run(dataDirectory: h.dir.url, to: backup)
        #expect(summary.files == 5)
        stop.store(true, ordering: .relaxed)
        _ = await load.value
        writer.shutdown()

        // A backup directory is never overwritten.
        #expect(throws: StoreError.self) { try Backup.run(dataDirectory: h.dir.url, to: backup) }

        let restored = h.dir.url.deletingLastPathComponent().appendingPathComponent("restored-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: restored) }
        try Backup.restore(from: backup, to: restored, configuration: h.configuration, clock: h.clock)
        #expect(throws: StoreError.self) { try Backup.restore(from: backup, to: restored, configuration: h.configuration, clock: h.clock) }
        for dir in [backup, restored] {
            let key = dir.appendingPathComponent("statement.key").path
            #expect(try String(contentsOfFile: key, encoding: .utf8) == "a key\n")
            #expect(try FileManager.default.attributesOfItem(atPath: key)[.posixPermissions] as? Int == 0o600)
        }
        let store = try Store(dataDirectory: restored, configuration: h.configuration, clock: h.clock)
        var references: [String] = []
        for p in [G, F, C] { references += try store.ledgerEntries(p).map(\.event.reference.rawValue) }
        try store.close()
        #expect(Set(references).count == references.count, "each entry once")
        #expect(before.isSubset(of: Set(references)), "every posting acknowledged before the backup began is in it")
        let report = try Verifier.verify(dataDirectory: restored)
        #expect(report.ok, "\(report.breaches)")
    }
}

/// The verbs that only read open the store read-only: nothing is written on opening (they
/// answer on a full disk), and a directory that needs a write first says so.
@Suite struct ReadOnlyStoreTests {
    @Test func aReadOnlyStoreReadsEverythingAndCannotWrite() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 400, "C-1"))
        h.clock.advance(milliseconds: 1_000)
        _ = try h.store.settle()
        try h.store.close()
        h.store = nil
        let coalition = h.dir.url.appendingPathComponent("coalition.sqlite")
        let before = try Data(contentsOf: coalition)

        let store = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true)
        #expect(store.readOnly)
        #expect(try store.runs().map(\.id) == ["R000001"])
        #expect(try store.balance(of: MemberID("M1")!).value == 600)
        #expect(try store.statement(for: C, run: "R000001")?.notice.figures.redeemedPoints == Points(400))
        #expect(try store.notice("R000001:cinema") != nil)
        // A posting cannot be written through it.
        #expect(store.post([Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.earn("M1", 5, "G-2"))])[0].httpStatus == 503)
        try store.close()
        #expect(try Data(contentsOf: coalition) == before, "nothing written")

        // A ledger behind its journal needs recovery, a write: refused read-only.
        try FileManager.default.removeItem(at: h.dir.url.appendingPathComponent("ledgers/cinema.sqlite"))
        #expect(throws: Store.NeedsWriting.self) {
            try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true)
        }
        // Another currency is refused read-only too.
        var usd = h.configuration
        usd.coalition.currency = "USD"
        #expect(throws: Store.CurrencyMismatch.self) { try Store(dataDirectory: h.dir.url, configuration: usd, clock: h.clock, readOnly: true) }

        // An empty ledger file, or a ledger of another history (longer, so not behind): not
        // served read-only; the writable open then recovers it or refuses it by name.
        let fm = FileManager.default
        let cinema = h.dir.url.appendingPathComponent("ledgers/cinema.sqlite")
        #expect(fm.createFile(atPath: cinema.path, contents: Data()))
        #expect(throws: Store.NeedsWriting.self) { try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true) }
        let other = try Harness()
        for i in 1...3 { _ = other.post(C, "o\(i)", Fixtures.earn("X\(i)", 7, "O-\(i)")) }
        try other.store.close()
        other.store = nil
        try fm.removeItem(at: cinema)
        try fm.copyItem(at: other.dir.url.appendingPathComponent("ledgers/cinema.sqlite"), to: cinema)
        #expect(throws: Store.NeedsWriting.self) { try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock, readOnly: true) }
        #expect(throws: StoreError.self) { try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock) }
    }

    /// A read verb that must open writable (a pending migration) records no currency: a wrong
    /// --partners on a read does no lasting harm.
    @Test func aReadThatMustOpenWritableRecordsNoCurrency() throws {
        let (h, url) = try Harness.closedWithOneEarn()
        try MigrationTests.rawQueue(url).write { db in
            try db.execute(sql: "DROP TABLE coalition_currency; DELETE FROM grdb_migrations WHERE identifier = 'v10-coalition-currency'")
        }
        var jpy = h.configuration
        jpy.coalition.currency = "JPY"
        let read = try Store(dataDirectory: h.dir.url, configuration: jpy, clock: h.clock, recordsCurrency: false)
        try read.close()
        #expect(try MigrationTests.rawQueue(url).read { try String.fetchOne($0, sql: "SELECT currency FROM coalition_currency") } == nil)
        let store = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        try store.close()
        #expect(try MigrationTests.rawQueue(url).read { try String.fetchOne($0, sql: "SELECT currency FROM coalition_currency") } == "EUR")
    }
}

/// One damaged ledger does not cost the backup its journal, and every error names the file.
@Suite struct DamagedLedgerTests {
    /// A journal that cannot be backed up fails the backup and leaves nothing behind: no
    /// directory of ledgers without their journal (a new directory is removed, an empty one
    /// emptied), so the same command can run again once the cause is fixed.
    @Test func aBackupWhoseJournalFailsLeavesNothingBehind() throws {
        let h = try Harness()
        for i in 1...6 { _ = h.post([G, F][i % 2], "w\(i)", Fixtures.earn("M\(i)", 10, "E-\(i)")) }
        try h.store.close()
        h.store = nil
        let journal = h.dir.url.appendingPathComponent("coalition.sqlite")
        for suffix in ["-wal", "-shm"] { try? FileManager.default.removeItem(atPath: journal.path + suffix) }
        let size = try #require((try FileManager.default.attributesOfItem(atPath: journal.path))[.size] as? Int)
        #expect(truncate(journal.path, off_t(size / 2)) == 0)
        for existing in [false, true] {
            let backup = h.dir.url.deletingLastPathComponent().appendingPathComponent("backup-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: backup) }
            if existing { try FileManager.default.createDirectory(at: backup, withIntermediateDirectories: false) }
            do {
                try Backup.run(dataDirectory: h.dir.url, to: backup)
                Issue.record("a backup of a damaged journal said done")
            } catch {
                #expect("\(error)".contains("coalition.sqlite cannot be backed up") && "\(error)".contains("nothing was left in"), "\(error)")
            }
            if existing {
                #expect(try FileManager.default.contentsOfDirectory(atPath: backup.path).isEmpty, "the empty directory is left empty")
            } else {
                #expect(!FileManager.default.fileExists(atPath: backup.path), "the new directory is removed")
            }
        }
    }

    @Test func aDamagedLedgerIsNamedAndTheJournalIsStillBackedUpAndRebuildsIt() throws {
        let h = try Harness()
        for i in 1...6 { _ = h.post([G, F][i % 2], "w\(i)", Fixtures.earn("M\(i)", 10, "E-\(i)")) }
        try h.store.close()
        let fuel = h.dir.url.appendingPathComponent("ledgers/fuel.sqlite")
        #expect(truncate(fuel.path, 4096) == 0)
        for suffix in ["-wal", "-shm"] { try? FileManager.default.removeItem(atPath: fuel.path + suffix) }

        // Opening names the file and the way out.
        do {
            h.store = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
            Issue.record("a damaged ledger opened")
        } catch {
            #expect("\(error)".contains("ledgers/fuel.sqlite cannot be opened") && "\(error)".contains("move it aside"), "\(error)")
        }
        h.store = nil

        // The backup copies the rest, the journal included, then fails naming the ledger.
        let backup = h.dir.url.deletingLastPathComponent().appendingPathComponent("backup-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: backup) }
        do {
            try Backup.run(dataDirectory: h.dir.url, to: backup)
            Issue.record("a backup with a damaged ledger said done")
        } catch {
            #expect("\(error)".contains("backed up without ledgers/fuel.sqlite"), "\(error)")
        }
        #expect(Store.hasJournal(backup) && Store.ledgerFileNames(backup) == ["grocer.sqlite"])
        // A backup inside the data directory (it would be lost with it) is refused, and
        // nothing is made there.
        let inside = h.dir.url.appendingPathComponent("backups/tonight")
        do {
            try Backup.run(dataDirectory: h.dir.url, to: inside)
            Issue.record("a backup inside the data directory was taken")
        } catch {
            #expect("\(error)".contains("is inside the data directory") && "\(error)".contains("nothing was written"), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: h.dir.url.appendingPathComponent("backups").path))

        // Restored, the missing ledger is rebuilt from the journal, and all verifies.
        let restored = h.dir.url.deletingLastPathComponent().appendingPathComponent("restored-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: restored) }
        try Backup.restore(from: backup, to: restored, configuration: h.configuration, clock: h.clock)
        let store = try Store(dataDirectory: restored, configuration: h.configuration, clock: h.clock)
        #expect(try store.ledgerEntries(F).count == 3)
        try store.close()
        #expect(try Verifier.verify(dataDirectory: restored).ok)
    }
}

/// A restore is all or nothing: one that died part way is refused, not taken for the backup.
@Suite struct RestoreAtomicityTests {
    /// A directory copied while in use (or left by a crash) is no backup: its `-wal` holds
    /// commits its database files lack. Restore refuses it and writes nothing, rather than
    /// copying the `.sqlite` files alone and losing those commits.
    @Test(arguments: ["coalition.sqlite-wal", "ledgers/grocer.sqlite-wal"])
    func aCopyWithAWriteAheadLogIsNotRestored(wal: String) throws {
        let h = try Harness()
        for i in 1...5 { _ = h.post(G, "w\(i)", Fixtures.earn("M\(i)", 10, "E-\(i)")) }
        try h.store.close()
        let parent = h.dir.url.deletingLastPathComponent()
        let copy = parent.appendingPathComponent("copy-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: copy) }
        try FileManager.default.copyItem(at: h.dir.url, to: copy)
        // As the copy of a directory in use has: frames in a log (an empty one is a clean stop's).
        try Data(repeating: 0x37, count: 4096).write(to: copy.appendingPathComponent(wal))
        let target = parent.appendingPathComponent("restored-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: target) }
        #expect {
            try Backup.restore(from: copy, to: target, configuration: h.configuration, clock: h.clock)
        } throws: { "\($0)".contains("is not a backup made by `clearhouse backup`") && "\($0)".contains(wal) }
        #expect(!FileManager.default.fileExists(atPath: target.path), "nothing written")
        // Emptied (a clean stop leaves an empty -wal), the same copy restores.
        try Data().write(to: copy.appendingPathComponent(wal))
        try Backup.restore(from: copy, to: target, configuration: h.configuration, clock: h.clock)
        #expect(try Verifier.verify(dataDirectory: target).ok)
    }

    /// A backup that does not verify (here a stray ledger beside the others: an edited or
    /// damaged one fails the same way) is refused before anything is put in place; its staged
    /// files are kept for a look, and every verb refuses the directory until it is emptied.
    @Test func aBackupWithABreachIsNotRestored() throws {
        try withBackup(earns: 4) { h, parent, backup in
            try FileManager.default.copyItem(at: backup.appendingPathComponent("ledgers/grocer.sqlite"), to: backup.appendingPathComponent("ledgers/stranger.sqlite"))
            let target = parent.appendingPathComponent("restored-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: target) }
            #expect {
                try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
            } throws: { "\($0)".contains("does not verify (2 breaches: ledger stranger: belongs to grocer") && "\($0)".contains("Nothing was restored") }
            #expect(try FileManager.default.contentsOfDirectory(atPath: target.path) == [Backup.restoreStaging])
            // The operator may restore it as it is, breaches listed.
            let asItIs = parent.appendingPathComponent("as-it-is-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: asItIs) }
            let accepted = try Backup.restore(from: backup, to: asItIs, configuration: h.configuration, clock: h.clock, acceptBreaches: true)
            #expect(accepted.breaches.count == 2 && Store.hasJournal(asItIs))
            // Without the stray file, the same backup restores and verifies.
            try FileManager.default.removeItem(at: backup.appendingPathComponent("ledgers/stranger.sqlite"))
            try FileManager.default.removeItem(at: target)
            #expect(try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock).ok)
        }
    }

    /// A store with `earns` earns and a backup of it beside its directory (removed after `body`).
    private func withBackup(earns: Int, _ body: (Harness, URL, URL) throws -> Void) throws {
        let h = try Harness()
        for i in 1...earns { _ = h.post(G, "w\(i)", Fixtures.earn("M\(i)", 10, "E-\(i)")) }
        let parent = h.dir.url.deletingLastPathComponent()
        let backup = parent.appendingPathComponent("backup-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: backup) }
        try Backup.run(dataDirectory: h.dir.url, to: backup)
        try body(h, parent, backup)
    }

    /// A backup whose journal is damaged (truncated) is refused naming coalition.sqlite, and
    /// the staging it leaves is then described as what it is.
    @Test func aBackupWithADamagedJournalIsRefusedNamingIt() throws {
        try withBackup(earns: 200) { h, parent, backup in
            let journal = backup.appendingPathComponent("coalition.sqlite")
            let size = try FileManager.default.attributesOfItem(atPath: journal.path)[.size] as! Int
            let handle = try FileHandle(forWritingTo: journal)
            try handle.truncate(atOffset: UInt64(size / 2))
            try handle.close()
            let target = parent.appendingPathComponent("restored-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: target) }
            #expect {
                try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
            } throws: { "\($0)".contains("is not a consistent backup: coalition.sqlite: ") && "\($0)".contains("Nothing was restored") }
            #expect {
                try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
            } throws: { "\($0)".contains("left by a restore that was refused or did not finish") }
        }
    }

    /// Several processes opening a new data directory at once (serve and `post` beside it)
    /// all open it: the one that loses the race to a migration finds it applied and goes on
    /// (each store here has its own connections, as a process has).
    @Test func storesOpeningANewDirectoryAtOnceAllOpenIt() throws {
        for _ in 0..<5 {
            let dir = TemporaryDirectory("clearhouse-race")
            defer { dir.remove() }
            let configuration = Fixtures.configuration()
            let opened = Mutex<[Result<Store, any Error>]>([])
            let threads = (0..<4).map { i in
                Thread {
                    let r = Result { try Store(dataDirectory: dir.url, configuration: configuration, clock: ManualClock()) }
                    if case .success(let store) = r {
                        // Each one's first posting for a partner opens (and migrates) that ledger.
                        _ = store.post([Submission(partner: Fixtures.grocer, webhookID: WebhookID("race-\(i)")!, event: Fixtures.earn("M\(i)", 10, "RACE-\(i)"))])
                    }
                    opened.withLock { $0.append(r) }
                }
            }
            threads.forEach { $0.start() }
            for _ in 0..<2_000 where opened.withLock({ $0.count }) < threads.count { Thread.sleep(forTimeInterval: 0.005) }
            let results = opened.withLock { $0 }
            #expect(results.count == threads.count)
            for r in results {
                switch r {
                case .success(let store): try store.close()
                case .failure(let e): Issue.record("a store did not open: \(e)")
                }
            }
            #expect(try Verifier.verify(dataDirectory: dir.url).ok)
        }
    }

    @Test func anInterruptedRestoreIsRefusedAndACompleteOneLeavesNoStaging() throws {
        let h = try Harness()
        for i in 1...5 { _ = h.post([G, F][i % 2], "w\(i)", Fixtures.earn("M\(i)", 10, "E-\(i)")) }
        let parent = h.dir.url.deletingLastPathComponent()
        let backup = parent.appendingPathComponent("backup-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: backup) }
        try Backup.run(dataDirectory: h.dir.url, to: backup)

        // Into an existing empty directory (a mount point, say): everything in place, no staging left.
        let target = parent.appendingPathComponent("restored-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: target) }
        try FileManager.default.createDirectory(at: target, withIntermediateDirectories: false)
        try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
        let fm = FileManager.default
        #expect(!fm.fileExists(atPath: target.appendingPathComponent(Backup.restoreStaging).path))
        #expect(Store.ledgerFileNames(target) == ["fuel.sqlite", "grocer.sqlite"])
        for name in Store.ledgerFileNames(target) {
            #expect(FileSync.modeOpenToOthers(target.appendingPathComponent("ledgers/\(name)").path) == nil, "owner-only")
        }
        #expect(try Verifier.verify(dataDirectory: target).ok)

        // As if the restore had died before its last rename: the journal still in staging.
        let staging = target.appendingPathComponent(Backup.restoreStaging)
        try fm.createDirectory(at: staging, withIntermediateDirectories: false)
        try fm.moveItem(at: target.appendingPathComponent("coalition.sqlite"), to: staging.appendingPathComponent("coalition.sqlite"))
        #expect(throws: StoreError.self) { try Store(dataDirectory: target, configuration: h.configuration, clock: h.clock) }
        #expect(!Store.hasJournal(target), "the refusal made no new journal")
        do {
            try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
            Issue.record("a restore into an interrupted one must be refused")
        } catch {
            #expect("\(error)".contains("interrupted restore"))
        }

        // Only ledgers in place and an empty staging, no journal: refused too (a new journal
        // beside the staging would start the coalition over).
        try fm.removeItem(at: staging.appendingPathComponent("coalition.sqlite"))
        try fm.removeItem(at: target.appendingPathComponent("ledgers"))
        #expect(throws: StoreError.self) { try Store(dataDirectory: target, configuration: h.configuration, clock: h.clock) }
        #expect(!Store.hasJournal(target))

        // Runs closed after the restore carry its time in their ids: the partners may hold
        // notices of runs closed after the backup (a lost timeline), numbered as these are.
        #expect(try h.store.settle().id == "R000001", "the original timeline's first run, notified to the partners")
        try fm.removeItem(at: target)
        h.clock.set(Instant(rfc3339: "2026-11-29T21:05:30Z")!)
        try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
        let after = try Store(dataDirectory: target, configuration: h.configuration, clock: h.clock)
        #expect(try after.settle().id == "R26112921053000001")
        let notices = try after.notices()
        #expect(!notices.isEmpty && notices.allSatisfy { $0.run == "R26112921053000001" && $0.id.hasPrefix("R26112921053000001:") }, "\(notices.map(\.run))")
        try after.close()
        #expect(try Verifier.verify(dataDirectory: target).ok)

        // Restored with another coalition's configuration (another currency): the configuration
        // is blamed, not the backup, and nothing is left behind.
        var usd = h.configuration
        usd.coalition.currency = "USD"
        let elsewhere = parent.appendingPathComponent("restored-usd-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: elsewhere) }
        do {
            try Backup.restore(from: backup, to: elsewhere, configuration: usd, clock: h.clock)
            Issue.record("restored under another currency")
        } catch {
            #expect("\(error)".contains("names currency USD") && !"\(error)".contains("not a consistent backup"), "\(error)")
        }
        #expect((try? fm.contentsOfDirectory(atPath: elsewhere.path)) ?? [] == [])

        // Died after the last rename (the journal in place, the staging empty): nothing missing, opens.
        try fm.removeItem(at: target)
        try Backup.restore(from: backup, to: target, configuration: h.configuration, clock: h.clock)
        try fm.createDirectory(at: staging, withIntermediateDirectories: false)
        let store = try Store(dataDirectory: target, configuration: h.configuration, clock: h.clock)
        try store.close()
        #expect(try Verifier.verify(dataDirectory: target).ok, "the same rule in verify: whole data, no breach")
    }
}

/// Found by ops/crash-test: a process starting while another writes read the journal's head,
/// then found the ledger further along (the other process had committed and appended in
/// between) and refused to start. The ledger is only written after the journal, so a ledger
/// ahead of a stale read is not damage.
@Suite struct StartWhileAnotherWritesTests {
    @Test func aLedgerAheadOfAStaleJournalReadIsNotDamage() throws {
        let h = try Harness()
        for i in 1...3 { _ = h.post(G, "a\(i)", Fixtures.earn("M1", 10, "A-\(i)")) }
        let other = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        defer { try? other.close() }
        for i in 4...5 { _ = h.post(G, "a\(i)", Fixtures.earn("M1", 10, "A-\(i)")) }
        // `other` read the head at 3 when it started; its ledger copy now ends at 5.
        #expect(try other.catchUpLedger(G, through: 3) == 0)
        // A ledger really ahead of its journal is still refused.
        let db = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(db, "UPDATE partner_head SET last_sequence = 2 WHERE partner = 'grocer';").status == 0)
        #expect(throws: StoreError.self) { try other.catchUpLedger(G, through: 2) }
    }
}
