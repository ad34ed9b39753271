import ClearingDomain
import Foundation
import GRDB

/// Online backups of a data directory (SQLite's backup API), safe while `serve` writes.
///
/// Order matters: the ledgers are copied first and `coalition.sqlite` (the journal, the truth)
/// last, so the backup's journal holds every entry its ledgers hold, and perhaps a few more;
/// opening the restored directory copies those few into their ledgers (the same recovery
/// that follows a crash between the journal and ledger commits, docs/DURABILITY.md).
public enum Backup {
    public struct Summary: Sendable {
        public var files: Int
        public var bytes: Int64
    }

    /// Copies every database of `dataDirectory` into `destination`, which must not exist yet
    /// (or be empty). Each file is a consistent snapshot; written to `*.partial` and renamed.
    @discardableResult
    public static func run(dataDirectory: URL, to destination: URL) throws -> Summary {
        let fm = FileManager.default
        let coalition = dataDirectory.appendingPathComponent("coalition.sqlite")
        guard Store.hasJournal(dataDirectory) else {
            throw StoreError("\(dataDirectory.path) holds no coalition.sqlite: nothing to back up")
        }
        if FileSync.lies(destination, inside: dataDirectory) {
            throw StoreError("\(destination.path) is inside the data directory \(dataDirectory.path): a backup there is lost with it; write it elsewhere (nothing was written)")
        }
        try requireNewOrEmpty(destination, "a backup goes into a new directory")
        let existed = fm.fileExists(atPath: destination.path)
        do {
            return try copyAll(dataDirectory: dataDirectory, coalition: coalition, to: destination)
        } catch let error as PartialBackup {
            throw error.error  // the journal and every readable file are there: kept, and said
        } catch {
            // Nothing half-written is left: the directory was new or empty.
            if existed {
                for name in (try? fm.contentsOfDirectory(atPath: destination.path)) ?? [] {
                    try? fm.removeItem(at: destination.appendingPathComponent(name))
                }
            } else {
                try? fm.removeItem(at: destination)
            }
            throw StoreError("\(error); nothing was left in \(destination.path)")
        }
    }

    /// A backup written whole but for unreadable ledgers: kept (the journal rebuilds them).
    private struct PartialBackup: Error { var error: StoreError }

    private static func copyAll(dataDirectory: URL, coalition: URL, to destination: URL) throws -> Summary {
        let fm = FileManager.default
        try fm.createDirectory(at: destination.appendingPathComponent("ledgers"), withIntermediateDirectories: true)
        let ledgerDir = dataDirectory.appendingPathComponent("ledgers")
        let ledgers = Store.ledgerFileNames(dataDirectory)
        var summary = Summary(files: 0, bytes: 0)
        // A ledger that cannot be read does not cost the backup its journal (the truth, from
        // which a restore rebuilds any ledger): it is left out, and the backup then fails
        // naming it, after everything else is copied.
        var unreadable: [String] = []
        for name in ledgers {
            do {
                summary.bytes += try copy(ledgerDir.appendingPathComponent(name), to: destination.appendingPathComponent("ledgers/\(name)"))
                summary.files += 1
            } catch {
                unreadable.append("ledgers/\(name) (\(error))")
            }
        }
        try FileSync.directory(destination.appendingPathComponent("ledgers"))
        do {
            summary.bytes += try copy(coalition, to: destination.appendingPathComponent("coalition.sqlite"))
        } catch {
            throw StoreError("\(coalition.path) cannot be backed up: \(error)")
        }
        summary.files += 1
        if try copyStatementKey(from: dataDirectory, to: destination) { summary.files += 1 }
        // The renames and the new directories themselves: durable before "done" is said.
        try FileSync.directory(destination)
        try FileSync.directory(destination.deletingLastPathComponent())
        if !unreadable.isEmpty {
            throw PartialBackup(error: StoreError(
                "backed up without \(unreadable.joined(separator: "; ")): the journal and every other file are in \(destination.path), and a restore rebuilds a missing ledger from the journal; move a damaged ledger aside and the next start rebuilds it too (docs/OPERATIONS.md)"))
        }
        return summary
    }

    /// Where `restore` assembles a data directory before it is put in place: inside the target,
    /// so that the final renames stay on one file system (the target may be a mount point).
    public static let restoreStaging = "restore.partial"

    /// Whether `dataDirectory` holds what a restore that stopped before its last rename leaves:
    /// files in `restore.partial`, or `restore.partial` without a journal (part of the backup
    /// may be missing). An empty leftover beside the journal (the restore died after its last
    /// rename) is harmless.
    /// What every refusal of a directory holding `restoreStaging` says (the open, restore,
    /// every verb; verify as a breach).
    public static func interruptedRestoreRefusal(_ dataDirectory: String) -> String {
        "\(dataDirectory) holds an interrupted restore (\(restoreStaging), left by a restore that was refused or did not finish): look at it if you wish, empty the directory and restore the backup again (docs/OPERATIONS.md)"
    }

    public static func interruptedRestore(in dataDirectory: URL) -> Bool {
        let staging = dataDirectory.appendingPathComponent(restoreStaging)
        guard FileManager.default.fileExists(atPath: staging.path) else { return false }
        return !Store.hasJournal(dataDirectory) || !((try? FileManager.default.contentsOfDirectory(atPath: staging.path))?.isEmpty ?? false)
    }

    /// Puts a backup in place as a new data directory (which must not exist or be empty),
    /// opened, recovered and marked as restored; run `verify` on it afterwards.
    ///
    /// All or nothing, and durable once it returns: every file is copied into
    /// `<data>/restore.partial/` and synced, opened there as a store (migrated, ledgers behind
    /// their journal caught up; a backup whose files disagree is refused here), marked with
    /// the restore's time (`run_naming`: runs closed from now on get ids the lost timeline
    /// cannot have used), closed, then renamed into place, `coalition.sqlite` (the journal,
    /// what makes a directory a data directory) last, and the directories synced. A restore
    /// that fails or dies part way leaves `restore.partial` behind, which `Store` and `restore`
    /// refuse until the operator empties the directory: never a data directory that looks whole
    /// but lacks some of the backup.
    /// Returns the report of `verify` on the restored files: every invariant holds, since a
    /// backup with a breach is refused, unless `acceptBreaches` (the operator has looked, and
    /// this backup is the one to have: it is restored and its breaches returned).
    @discardableResult
    public static func restore(
        from backup: URL, to dataDirectory: URL, configuration: ClearingConfiguration, clock: any WallClock = SystemClock(),
        acceptBreaches: Bool = false
    ) throws -> VerifyReport {
        let fm = FileManager.default
        guard Store.hasJournal(backup) else {
            throw StoreError("\(backup.path) is not a backup: it has no coalition.sqlite")
        }
        let staging = dataDirectory.appendingPathComponent(restoreStaging)
        if fm.fileExists(atPath: staging.path) {
            throw StoreError(interruptedRestoreRefusal(dataDirectory.path))
        }
        // A backup's files are whole databases. A `-wal` with frames in it holds commits its
        // database file lacks (a directory copied while in use, or left by a crash): copying the
        // `.sqlite` files alone would silently lose them.
        for name in ["coalition.sqlite"] + Store.ledgerFileNames(backup).map({ "ledgers/\($0)" }) {
            let wal = backup.appendingPathComponent(name + "-wal")
            if let size = (try? fm.attributesOfItem(atPath: wal.path))?[.size] as? Int, size > 0 {
                throw StoreError(
                    "\(backup.path) is not a backup made by `clearhouse backup`: \(name)-wal holds commits its database file does not (a directory copied while in use, or one a crash left); nothing was restored. Restore from a backup, or start the service on that directory itself (its start-up recovers it)")
            }
        }
        try requireNewOrEmpty(dataDirectory, "restore into a new data directory")
        try fm.createDirectory(at: staging.appendingPathComponent("ledgers"), withIntermediateDirectories: true)
        for name in Store.ledgerFileNames(backup) {
            try FileSync.copyWhole(backup.appendingPathComponent("ledgers/\(name)"), to: staging.appendingPathComponent("ledgers/\(name)"))
        }
        try FileSync.copyWhole(backup.appendingPathComponent("coalition.sqlite"), to: staging.appendingPathComponent("coalition.sqlite"))
        let hasKey = try copyStatementKey(from: backup, to: staging)
        do {
            let store = try Store(dataDirectory: staging, configuration: configuration, clock: clock)
            do {
                try store.markRestored(at: clock.now())
            } catch {
                try? store.close()
                throw error
            }
            try store.close()
        } catch let mismatch as Store.CurrencyMismatch {
            // The configuration is at fault, not the backup: nothing to look at, nothing kept.
            try? fm.removeItem(at: staging)
            throw StoreError(
                "--partners names currency \(mismatch.configured) in coalition.toml, but \(backup.path) is of a coalition that settles in \(mismatch.recorded): nothing was restored; restore with that coalition's configuration")
        } catch {
            // The ledgers' errors name their file; SQLite's own (a damaged page, not a database)
            // come from the journal, which is opened first.
            let what = error is DatabaseError ? "coalition.sqlite: \(error)" : "\(error)"
            throw StoreError("\(backup.path) is not a consistent backup: \(what). Nothing was restored; its files are in \(staging.path) for a look")
        }
        // Every invariant, checked before anything is put in place: a backup with a breach (a
        // stray ledger, a damaged page, an edited row) is refused, not restored and then
        // reported.
        let report = try Verifier.verify(dataDirectory: staging)
        guard report.ok || acceptBreaches else {
            let shown = report.breaches.prefix(Limits.verifyBreachesShownMax).joined(separator: "; ")
            throw StoreError(
                "\(backup.path) does not verify (\(report.breaches.count) breaches: \(shown)). Nothing was restored; its files are in \(staging.path) for a look (empty the directory, then restore with --accept-breaches to restore it as it is)")
        }
        try FileSync.directory(staging.appendingPathComponent("ledgers"))
        try FileSync.directory(staging)
        try FileSync.directory(dataDirectory)
        var moves = ["ledgers"]
        if hasKey { moves.append("statement.key") }
        // Closed cleanly, the store leaves an empty -wal and the -shm; they go with their database.
        for suffix in ["-wal", "-shm"] where fm.fileExists(atPath: staging.appendingPathComponent("coalition.sqlite" + suffix).path) {
            moves.append("coalition.sqlite" + suffix)
        }
        moves.append("coalition.sqlite")
        for name in moves {
            guard rename(staging.appendingPathComponent(name).path, dataDirectory.appendingPathComponent(name).path) == 0 else {
                throw StoreError("cannot move \(staging.path)/\(name) into \(dataDirectory.path) (\(String(cString: strerror(errno))))")
            }
        }
        try fm.removeItem(at: staging)
        try FileSync.directory(dataDirectory)
        try FileSync.directory(dataDirectory.deletingLastPathComponent())
        return report
    }

    /// The statement key `serve` made in the data directory (when the certificate directory has
    /// none) goes with the data: without it, the statements it signed could not be checked
    /// against a key the restored server publishes. Owner-only, like the original.
    @discardableResult
    private static func copyStatementKey(from source: URL, to target: URL) throws -> Bool {
        let key = source.appendingPathComponent("statement.key")
        guard FileManager.default.fileExists(atPath: key.path) else { return false }
        // Owner-only from the start (never readable by others, not even for a moment), whole.
        let copy = target.appendingPathComponent("statement.key")
        guard try FileSync.createWhole(copy, Array(try Data(contentsOf: key)), mode: 0o600) else {
            throw StoreError("\(copy.path) exists already")
        }
        return true
    }

    private static func requireNewOrEmpty(_ directory: URL, _ advice: String) throws {
        let fm = FileManager.default
        var isDirectory: ObjCBool = false
        guard fm.fileExists(atPath: directory.path, isDirectory: &isDirectory) else { return }
        guard isDirectory.boolValue else { throw StoreError("\(directory.path) is a file, not a directory; \(advice)") }
        if !((try? fm.contentsOfDirectory(atPath: directory.path))?.isEmpty ?? false) {
            throw StoreError("\(directory.path) exists and is not empty; \(advice)")
        }
    }

    /// One database, through the backup API from a read-only connection, into `target`.
    private static func copy(_ source: URL, to target: URL) throws -> Int64 {
        let partial = target.deletingLastPathComponent().appendingPathComponent(target.lastPathComponent + ".partial")
        try? FileManager.default.removeItem(at: partial)
        let from = try DatabasePool(path: source.path, configuration: Store.databaseConfiguration(readonly: true))
        defer { try? from.close() }
        var c = GRDB.Configuration()
        c.prepareDatabase { db in try db.execute(sql: "PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL") }
        let to = try DatabaseQueue(path: partial.path, configuration: c)
        try from.backup(to: to)
        try to.close()
        guard rename(partial.path, target.path) == 0 else { throw StoreError("cannot rename \(partial.path) into place") }
        return ((try? FileManager.default.attributesOfItem(atPath: target.path))?[.size] as? NSNumber)?.int64Value ?? 0
    }
}
