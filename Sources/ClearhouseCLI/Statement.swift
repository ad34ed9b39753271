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
    @Option(help: "Write to this file (owner-only) instead of standard output; it appears only when complete. Never inside --data, never over an SQLite database.") var output: String?

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
            // Statements name members: the file is readable by the operator only.
            try await OutputFile(output, verb: "statement", dataDirectory: locations.dataURL)
                .write { write in try await store.writeStatement(header, format, write) }
        } else {
            try await store.writeStatement(header, format) { try writeStandardOutput($0, verb: "statement") }
        }
    }
}
