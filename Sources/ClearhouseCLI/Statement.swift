import ArgumentParser
import ClearingDomain
import ClearingStore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `clearhouse statement <partner> <run> [--format csv|json] [--output file]` (CONTRACT §8).
struct StatementCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "statement",
        abstract: "Write a partner's statement of a run: the same document the partner downloads.",
        discussion: "CSV (UTF-8, LF line ends, RFC 4180 quoting; a header row, one row per entry) or JSON (figures, flows touching the partner, entries). Written in pieces, so a statement of millions of entries needs little memory.")

    @OptionGroup var locations: Locations
    @Argument(help: "The partner id.") var partner: String
    @Argument(help: "The run id, e.g. R000001.") var run: String
    @Option(help: "csv or json.") var format: String = "csv"
    @Option(help: "Write to this file instead of standard output (replaced only when complete).") var output: String?

    func run() async throws {
        guard let format = StatementFormat(rawValue: format) else {
            printError("clearhouse statement: --format \(JSONWriter.quote(format)) is not csv or json")
            throw ExitCode(1)
        }
        let configuration = try locations.loadConfiguration()
        let store = try locations.openStore(configuration, readOnly: true)
        defer { try? store.close() }
        // A partner that has left the coalition (no file in partners/ any more) keeps its
        // ledger, and its past statements: they depend on nothing in today's configuration.
        guard let id = PartnerID(partner),
            configuration.partners[id] != nil || FileManager.default.fileExists(atPath: store.ledgerURL(id).path)
        else {
            printError("clearhouse statement: no partner \(JSONWriter.quote(partner)) in \(locations.partners), and no ledger of one in \(locations.data)")
            throw ExitCode(1)
        }
        guard let header = try store.statement(for: id, run: run) else {
            printError("clearhouse statement: no run \(JSONWriter.quote(run))")
            throw ExitCode(1)
        }
        if let output {
            // Written beside the target, then renamed: a reader never sees half a statement.
            let target = URL(fileURLWithPath: output)
            let partial = target.deletingLastPathComponent().appendingPathComponent(".\(target.lastPathComponent).partial")
            // Statements name members: readable by the operator only.
            guard FileManager.default.createFile(atPath: partial.path, contents: nil, attributes: [.posixPermissions: 0o600]),
                let handle = try? FileHandle(forWritingTo: partial)
            else {
                printError("clearhouse statement: --output \(output): cannot write there")
                throw ExitCode(1)
            }
            do {
                try await store.writeStatement(header, format) { try handle.write(contentsOf: Data($0.utf8)) }
                try handle.synchronize()
                try handle.close()
                guard rename(partial.path, target.path) == 0 else { throw StoreError("cannot rename into place (errno \(errno))") }
            } catch {
                try? handle.close()
                try? FileManager.default.removeItem(at: partial)
                printError("clearhouse statement: --output \(output): \(error)")
                throw ExitCode(1)
            }
        } else {
            try await store.writeStatement(header, format) { try writeStandardOutput($0, verb: "statement") }
        }
    }
}
