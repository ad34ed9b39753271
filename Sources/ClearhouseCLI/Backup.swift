import ArgumentParser
import ClearingDomain
import ClearingStore
import Foundation

/// `clearhouse backup <dir>`: a consistent online copy of every database, safe while serving.
struct BackupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up every database of --data into a new directory, online (safe while serve runs).",
        discussion: "Uses SQLite's backup API: each file is a consistent snapshot. The ledgers are copied first and coalition.sqlite (the journal, the truth) last; `clearhouse restore` puts a backup back and verifies it. A ledger that cannot be read is left out: everything else is copied, then exit 1 naming it. If the journal cannot be copied, exit 1 and nothing is left in the directory.")

    @OptionGroup var locations: Locations
    @Argument(help: "The new directory to write the backup into.") var directory: String

    func run() async throws {
        do {
            let s = try Backup.run(dataDirectory: locations.dataURL, to: URL(fileURLWithPath: directory))
            print("backup: \(s.files) databases, \(s.bytes / 1024) KiB, in \(directory)")
        } catch {
            printError("clearhouse backup: \(error)")
            throw ExitCode(1)
        }
    }
}

/// `clearhouse restore <backup-dir>`: a backup back into --data (a new directory), then verify.
struct RestoreCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a backup into --data (which must be new or empty), recover and verify it.",
        discussion: "All or nothing: staged in <data>/restore.partial, opened there, then put in place. Every invariant is verified before the files are put in place: a refused backup (files that disagree, a breach, another currency) restores nothing and exits 1. Runs closed afterwards are named R<yyMMddHHmmss><nnnnn>.")

    @OptionGroup var locations: Locations
    @Argument(help: "The directory `clearhouse backup` wrote.") var backup: String
    @Flag(help: "Restore a backup that does not verify, as it is, listing its breaches (exit 3).") var acceptBreaches = false

    func run() async throws {
        let configuration = try locations.loadConfiguration()
        // Copied, opened (ledgers behind their journal caught up; a backup whose files disagree
        // refused), marked as restored, then put in place: all or nothing (Backup.restore).
        // Verified before it is put in place: a backup with any breach restores nothing.
        let report: VerifyReport
        do {
            report = try Backup.restore(
                from: URL(fileURLWithPath: backup), to: locations.dataURL, configuration: configuration, acceptBreaches: acceptBreaches)
        } catch {
            printError("clearhouse restore: \(error)")
            throw ExitCode(1)
        }
        for b in report.breaches { print("BREACH   \(b)") }
        guard report.ok else {
            // Exit 3, not 1: the files are in place (1 means nothing was restored).
            print("restore: \(locations.data) restored from \(backup) as it is (--accept-breaches): \(report.breaches.count) breaches")
            throw ExitCode(3)
        }
        print("restore: \(locations.data) restored from \(backup) and verified (\(report.checks.count) checks)")
    }
}
