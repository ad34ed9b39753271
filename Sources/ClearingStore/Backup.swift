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
        try requireNewOrEmpty(destination, "a backup goes into a new directory")
        try fm.createDirectory(at: destination.appendingPathComponent("ledgers"), withIntermediateDirectories: true)
        let ledgerDir = dataDirectory.appendingPathComponent("ledgers")
        let ledgers = Store.ledgerFileNames(dataDirectory)
        var summary = Summary(files: 0, bytes: 0)
        for name in ledgers {
            summary.bytes += try copy(ledgerDir.appendingPathComponent(name), to: destination.appendingPathComponent("ledgers/\(name)"))
            summary.files += 1
        }
        try FileSync.directory(destination.appendingPathComponent("ledgers"))
        summary.bytes += try copy(coalition, to: destination.appendingPathComponent("coalition.sqlite"))
        summary.files += 1
        if try copyStatementKey(from: dataDirectory, to: destination) { summary.files += 1 }
        // The renames and the new directories themselves: durable before "done" is said.
        try FileSync.directory(destination)
        try FileSync.directory(destination.deletingLastPathComponent())
        return summary
    }

    /// Puts a backup in place as a new data directory (which must not exist or be empty).
    /// Open it with `Store` (which recovers ledgers behind their journal) and run `verify`.
    public static func restore(from backup: URL, to dataDirectory: URL) throws {
        let fm = FileManager.default
        guard Store.hasJournal(backup) else {
            throw StoreError("\(backup.path) is not a backup: it has no coalition.sqlite")
        }
        try requireNewOrEmpty(dataDirectory, "restore into a new data directory")
        try fm.createDirectory(at: dataDirectory.appendingPathComponent("ledgers"), withIntermediateDirectories: true)
        let names = Store.ledgerFileNames(backup)
        for name in names {
            try fm.copyItem(at: backup.appendingPathComponent("ledgers/\(name)"), to: dataDirectory.appendingPathComponent("ledgers/\(name)"))
        }
        try fm.copyItem(at: backup.appendingPathComponent("coalition.sqlite"), to: dataDirectory.appendingPathComponent("coalition.sqlite"))
        try copyStatementKey(from: backup, to: dataDirectory)
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
        if fm.fileExists(atPath: directory.path), !((try? fm.contentsOfDirectory(atPath: directory.path))?.isEmpty ?? false) {
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
