import ArgumentParser
import ClearingDomain
import ClearingStore
import Foundation

/// `clearhouse export --format beancount [--output file]`: the coalition's books.
struct Export: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Export the coalition's books of every closed run (Beancount).",
        discussion: "Each partner's receivable or payable per run (Assets:Partners:<Id>), the points liability (Liabilities:Points:Outstanding), the coalition's margin on redemptions (Income:Margin) and breakage (Income:Breakage), with the operator's margin per run, and balance assertions that bean-check verifies. Refuses (exit 1) runs in several currencies. See docs/STATEMENTS.md.")

    @OptionGroup var locations: Locations
    @Option(help: "The format: beancount.") var format: String = "beancount"
    @Option(help: "Write to this file (owner-only) instead of standard output; it appears only when complete. Never inside --data, never over an SQLite database.") var output: String?

    func run() async throws {
        guard format == "beancount" else {
            printError("clearhouse export: --format \(JSONWriter.quote(format)) is not supported (beancount)")
            throw ExitCode(1)
        }
        let configuration = try locations.loadConfiguration()
        let store = try locations.openStore(configuration, readOnly: true)
        defer { try? store.close() }
        let runs = try store.runs().map {
            BeancountExport.Run(
                id: $0.id, cutoff: $0.cutoff, partners: $0.partners, issuePrices: $0.issuePrices, flows: $0.flows,
                operatorMarginMinor: $0.totals.operatorMarginMinor, nettingEfficiency: $0.totals.nettingEfficiencyText)
        }
        // The books are in one currency: the runs' own (runs closed before v10 carry the one
        // their notices were in), not today's configuration's.
        let currencies = try store.runCurrencies()
        guard currencies.count <= 1 else {
            printError("clearhouse export: the runs are in several currencies (\(currencies.sorted().joined(separator: ", "))); Beancount books here are in one")
            throw ExitCode(1)
        }
        let text = try BeancountExport.ledger(
            runs: runs, currency: currencies.first ?? configuration.coalition.currency,
            prices: configuration.partners.mapValues(\.issuePricePer1000), generatedAt: SystemClock().now())
        if let output {
            try await OutputFile(output, verb: "export", dataDirectory: locations.dataURL).write { write in try write(text) }
        } else {
            try writeStandardOutput(text, verb: "export")
        }
    }
}
