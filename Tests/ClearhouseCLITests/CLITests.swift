import ClearhouseTestSupport
import ClearingConfig
import ClearingDomain
import ClearingStore
import Foundation
import Testing

let packageRoot = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Runs the built `clearhouse` binary, as a user would.
struct CLI {
    let data: URL
    let partners: URL

    static var binary: URL {
        // The test bundle sits in the same products directory as the executable.
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let beside = dir.appendingPathComponent("clearhouse")
        if FileManager.default.isExecutableFile(atPath: beside.path) { return beside }
        return packageRoot.appendingPathComponent(".build/debug/clearhouse")
    }

    struct Result {
        var status: Int32
        var out: String
        var err: String
    }

    @discardableResult
    func run(_ args: [String], stdin: String = "", env: [String: String] = [:]) throws -> Result {
        let p = Process()
        p.executableURL = CLI.binary
        // The locations go before a '--' (after it, everything is an argument).
        let locations = ["--data", data.path, "--partners", partners.path]
        p.arguments = args.firstIndex(of: "--").map { Array(args[..<$0]) + locations + args[$0...] } ?? args + locations
        p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
        let input = Pipe(), output = Pipe(), error = Pipe()
        p.standardInput = input
        p.standardOutput = output
        p.standardError = error
        try p.run()
        // A verb that refuses before it reads its input closes the pipe first: the write then
        // fails (EPIPE), which is the verb's answer, not the test's error.
        try? input.fileHandleForWriting.write(contentsOf: Data(stdin.utf8))
        try? input.fileHandleForWriting.close()
        let out = output.fileHandleForReading.readDataToEndOfFile()
        let err = error.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(status: p.terminationStatus, out: String(decoding: out, as: UTF8.self), err: String(decoding: err, as: UTF8.self))
    }

    func json(_ r: Result) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as! [String: Any]
    }
}

/// A copy of the sample partners in `dir`, with `file` changed by `change` (if given).
func samplePartners(in dir: TemporaryDirectory, editing file: String? = nil, _ change: (String) -> String = { $0 }) throws -> URL {
    let partners = dir.url.appendingPathComponent("partners")
    try FileManager.default.copyItem(at: packageRoot.appendingPathComponent("partners"), to: partners)
    if let file {
        let f = partners.appendingPathComponent(file)
        try change(String(contentsOf: f, encoding: .utf8)).write(to: f, atomically: true, encoding: .utf8)
    }
    return partners
}

func withCLI(_ body: (CLI) throws -> Void) throws {
    let dir = TemporaryDirectory("clearhouse-cli")
    defer { dir.remove() }
    try body(CLI(data: dir.url.appendingPathComponent("data"), partners: packageRoot.appendingPathComponent("partners")))
}

let earnM1 = #"{"type":"points.earned","data":{"member":"M1","points":100,"reference":"R-1","occurred_at":"2026-11-22T10:00:00Z","amount_minor":2599}}"#

@Suite(.serialized) struct CLITests {
    @Test func postPrintsTheSuccessBodyAndReplaysIt() throws {
        try withCLI { cli in
            let first = try cli.run(["post", "--partner", "fuelco", "--webhook-id", "msg_1"], stdin: earnM1)
            #expect(first.status == 0, "\(first.err)")
            let body = try cli.json(first)
            #expect(body["partner"] as? String == "fuelco" && body["sequence"] as? Int == 1 && body["member_balance"] as? Int == 100)
            #expect(body["type"] as? String == "points.earned" && body["reference"] as? String == "R-1")
            let again = try cli.run(["post", "--partner", "fuelco", "--webhook-id", "msg_1"], stdin: earnM1)
            #expect(again.status == 0 && again.out == first.out, "the original body, unchanged")
            let byRef = try cli.run(["post", "--partner", "fuelco"], stdin: earnM1)
            #expect(byRef.status == 0 && byRef.out == first.out)
            let balance = try cli.run(["balance", "M1"])
            #expect(balance.out.trimmingCharacters(in: .newlines) == #"{"member":"M1","balance":100}"#)
            // A member id may start with '-' (CONTRACT §1): after '--', as the help says.
            let dashed = try cli.run(["balance", "--", "-lead"])
            #expect(dashed.status == 0 && dashed.out.trimmingCharacters(in: .newlines) == #"{"member":"-lead","balance":0}"#, "\(dashed.err)")
            #expect(try cli.run(["balance", "--help"]).out.contains("goes after '--'"))
        }
    }

    @Test func postPrintsProblemsAndExits1() throws {
        try withCLI { cli in
            _ = try cli.run(["post", "--partner", "fuelco", "--webhook-id", "msg_1"], stdin: earnM1)
            let cases: [([String], String, String)] = [
                (["--partner", "fuelco", "--webhook-id", "msg_1"], earnM1.replacingOccurrences(of: "100", with: "101"), "conflict"),
                (["--partner", "fuelco"], earnM1.replacingOccurrences(of: "100", with: "101"), "conflict"),
                (["--partner", "nobody"], earnM1, "unknown-partner"),
                (["--partner", "fuelco"], "{", "malformed"),
                (["--partner", "fuelco", "--webhook-id", "bad id"], earnM1, "malformed"),
                (["--partner", "cinestar"], #"{"type":"points.redeemed","data":{"member":"M1","points":101,"reference":"C-1"}}"#, "insufficient-points"),
                (["--partner", "fuelco"], #"{"type":"points.earn_reversed","data":{"member":"M1","points":1,"reference":"F-2","original_reference":"X"}}"#, "unknown-original"),
                (["--partner", "fuelco"], #"{"type":"points.earn_reversed","data":{"member":"M2","points":1,"reference":"F-3","original_reference":"R-1"}}"#, "member-mismatch"),
                (["--partner", "fuelco"], #"{"type":"points.earn_reversed","data":{"member":"M1","points":101,"reference":"F-4","original_reference":"R-1"}}"#, "reversal-exceeds-original"),
                (["--partner", "fuelco"], String(repeating: " ", count: 70_000) + earnM1, "too-large"),
            ]
            for (args, body, slug) in cases {
                let r = try cli.run(["post"] + args, stdin: body)
                #expect(r.status == 1, "\(slug): \(r.out) \(r.err)")
                let doc = try cli.json(r)
                #expect(doc["type"] as? String == "urn:clearhouse:problem:\(slug)", "\(r.out)")
                #expect(doc["status"] is Int && doc["title"] is String && doc["detail"] is String)
            }
            let v = try cli.run(["verify"])
            #expect(v.status == 0 && v.out.contains("journal: 1 entries"), "nothing was written by a refusal: \(v.out)")
        }
    }

    @Test func verifyNamesTheTamperedPartnerAndSequence() throws {
        try withCLI { cli in
            for i in 1...5 {
                let body = earnM1.replacingOccurrences(of: "R-1", with: "R-\(i)").replacingOccurrences(of: "\"M1\"", with: i == 4 ? "\"CARD-4444\"" : "\"M1\"")
                #expect(try cli.run(["post", "--partner", "medipharm"], stdin: body).status == 0)
            }
            #expect(try cli.run(["verify"]).status == 0)
            let file = cli.data.appendingPathComponent("ledgers/medipharm.sqlite")
            var bytes = try Data(contentsOf: file)
            let r = bytes.range(of: Data("CARD-4444".utf8))!
            bytes[r.lowerBound] = UInt8(ascii: "K")  // one byte: CARD -> KARD
            try bytes.write(to: file)
            let v = try cli.run(["verify"])
            #expect(v.status == 1)
            #expect(v.out.contains("BREACH") && v.out.contains("ledger medipharm sequence 4"), "\(v.out)")
        }
    }

    @Test(arguments: ["before-journal-commit", "after-journal-commit", "after-ledger-commit"])
    func aKilledPostIsRecoveredAtTheNextStart(point: String) throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            let body = #"{"type":"points.redeemed","data":{"member":"M1","points":30,"reference":"C-9"}}"#
            let crashed = try cli.run(["post", "--partner", "cinestar", "--webhook-id", "msg_9"], stdin: body, env: ["CLEARHOUSE_CRASH_AT": point])
            #expect(crashed.status == 86 && crashed.out.isEmpty, "the process died without answering")
            let v = try cli.run(["verify"])
            // verify is read-only: a batch that committed its journal but not its ledger is
            // reported until a writer starts and recovers it.
            if point == "after-journal-commit" { #expect(v.status == 1 && v.out.contains("ledger cinestar")) } else { #expect(v.status == 0, "\(v.out)") }
            let balance = try cli.run(["balance", "M1"])  // opening the store recovers
            #expect(balance.out.contains(point == "before-journal-commit" ? #""balance":100"# : #""balance":70"#), "\(balance.out)")
            #expect(try cli.run(["verify"]).status == 0)
            let retry = try cli.run(["post", "--partner", "cinestar", "--webhook-id", "msg_9"], stdin: body)
            #expect(retry.status == 0)
            #expect(try cli.json(retry)["member_balance"] as? Int == 70)
        }
    }

    @Test func aBadPartnerFileStopsStartUpWithOneLine() throws {
        let dir = TemporaryDirectory("clearhouse-cli-cfg")
        defer { dir.remove() }
        let partners = try samplePartners(in: dir, editing: "cinestar.toml") {
            $0.replacingOccurrences(of: "redeem_credit_per_1000 = 1050", with: "redeem_credit_per_1000 = \"lots\"")
        }
        let cli = CLI(data: dir.url.appendingPathComponent("data"), partners: partners)
        for verb in [["partners", "check"], ["balance", "M1"], ["post", "--partner", "fuelco"]] {
            let r = try cli.run(verb, stdin: earnM1)
            // `post` answers every failure with a problem document and exit 1 (CONTRACT §10).
            #expect(r.status == (verb[0] == "post" ? 1 : 2))
            let lines = r.err.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].contains("cinestar.toml: redeem_credit_per_1000: must be an integer"), "\(r.err)")
            if verb[0] == "post" {
                #expect(r.out.contains(#""type":"urn:clearhouse:problem:unavailable""#) && r.out.contains("cinestar.toml: redeem_credit_per_1000: must be an integer"), "\(r.out)")
            }
        }
        // verify answers for the data alone (CONTRACT §10: 0 or 1; here the directory is
        // missing, a breach), and says what it could not read.
        let v = try cli.run(["verify"])
        #expect(v.status == 1, "\(v.out) \(v.err)")
        #expect(v.err.contains("warning") && v.err.contains("cinestar.toml: redeem_credit_per_1000: must be an integer"), "\(v.err)")
        // One line, in words (it used to add a second, "configuration refused", and end with
        // Swift's `ExitCode(rawValue: 2)`).
        #expect(v.err.split(separator: "\n").count == 1 && !v.err.contains("ExitCode"), "\(v.err)")
        #expect(!FileManager.default.fileExists(atPath: dir.url.appendingPathComponent("data").path), "nothing written")
    }

    /// A cutoff before the last run's names that run; the clock is suspected only when no
    /// --through was given (the cutoff was now).
    @Test func aCutoffBeforeTheLastRunsNamesItAndSuspectsTheClockOnlyWithoutThrough() throws {
        let dir = TemporaryDirectory("clearhouse-cli-cutoff")
        defer { dir.remove() }
        let cli = CLI(data: dir.url.appendingPathComponent("data"), partners: packageRoot.appendingPathComponent("partners"))
        #expect(try cli.run(["post", "--partner", "fuelco", "--webhook-id", "c-1"], stdin: earnM1).status == 0)
        #expect(try cli.run(["settle"]).status == 0)
        let r = try cli.run(["settle", "--through", "2020-01-01T00:00:00Z"])
        #expect(r.status == 1 && r.err.contains("before the last run's cutoff") && r.err.contains("run R000001"), "\(r.err)")
        #expect(r.err.contains("never reopens") && !r.err.contains("clock"), "\(r.err)")
    }

    /// Figures past 64-bit integers are an error, never a wrap (CONTRACT §6); the operator is
    /// told the data is sound and what to change (a shorter period, or the prices), not sent
    /// to restore a backup.
    @Test func aRunWhoseFiguresOverflowIsRefusedWithTheWayOut() throws {
        let dir = TemporaryDirectory("clearhouse-cli-overflow")
        defer { dir.remove() }
        let partners = try samplePartners(in: dir, editing: "fuelco.toml") { text in
            text.split(separator: "\n", omittingEmptySubsequences: false).map {
                $0.hasPrefix("issue_price_per_1000") ? "issue_price_per_1000 = \(Limits.pricePer1000MinorMax)" : String($0)
            }.joined(separator: "\n")
        }
        let data = dir.url.appendingPathComponent("data")
        // 9,300 earns of 10^9 points at 10^9 per 1000: 9.3·10^18 minor units, past Int64.
        let store = try Store(dataDirectory: data, configuration: ConfigurationLoader(directory: partners).load())
        let fuelco = PartnerID("fuelco")!
        for batch in stride(from: 0, to: 9_300, by: Limits.postingBatchMax) {
            let postings = (batch..<min(batch + Limits.postingBatchMax, 9_300)).map { i in
                Submission(partner: fuelco, webhookID: WebhookID("big-\(i)")!, event: Fixtures.earn("M\(i)", 1_000_000_000, "BIG-\(i)"))
            }
            #expect(store.post(postings).allSatisfy { $0.httpStatus == 201 })
        }
        try store.close()
        let cli = CLI(data: data, partners: partners)
        let r = try cli.run(["settle"])
        #expect(r.status == 1, "\(r.out) \(r.err)")
        #expect(r.err.contains("do not fit in 64-bit integers") && r.err.contains("--through") && r.err.contains("issue_price_per_1000"), "\(r.err)")
        #expect(!r.err.contains("restore"), "\(r.err)")
        #expect(try cli.run(["runs"]).out.contains("R000001") == false, "nothing was settled")
        #expect(try cli.run(["verify"]).status == 0)
    }

    /// A partner that left the coalition (its file removed from partners/) keeps its past
    /// statements, the same document as before; a partner that never was is still refused.
    @Test func aPartnerThatLeftKeepsItsStatements() throws {
        let dir = TemporaryDirectory("clearhouse-cli-left")
        defer { dir.remove() }
        let partners = try samplePartners(in: dir)
        let cli = CLI(data: dir.url.appendingPathComponent("data"), partners: partners)
        #expect(try cli.run(["post", "--partner", "medipharm", "--webhook-id", "left-1"], stdin: earnM1).status == 0)
        #expect(try cli.run(["settle"]).status == 0)
        let before = try cli.run(["statement", "medipharm", "R000001"])
        #expect(before.status == 0 && before.out.contains("R-1"), "\(before.err)")
        try FileManager.default.removeItem(at: partners.appendingPathComponent("medipharm.toml"))
        let after = try cli.run(["statement", "medipharm", "R000001"])
        #expect(after.status == 0 && after.out == before.out, "\(after.err)")
        let never = try cli.run(["statement", "nosuchpartner", "R000001"])
        #expect(never.status == 1 && never.err.contains("no partner \"nosuchpartner\""), "\(never.err)")
    }

    @Test func serveRefusesToStartWithoutACertificateAndSaysHowToMakeOne() throws {
        try withCLI { cli in
            let empty = cli.data.deletingLastPathComponent().appendingPathComponent("no-certs")
            try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
            let r = try cli.run(["serve", "--port", "0", "--certs", empty.path])
            #expect(r.status == 2)
            #expect(r.err.contains("server.crt") && r.err.contains("ops/certs"), "\(r.err)")
        }
    }

    @Test func helpOnEveryVerb() throws {
        try withCLI { cli in
            for verb in [[], ["partners"], ["partners", "check"], ["serve"], ["post"], ["balance"], ["settle"], ["runs"], ["runs", "show"], ["verify"], ["simulate"]] {
                let p = Process()
                p.executableURL = CLI.binary
                p.arguments = verb + ["--help"]
                let out = Pipe()
                p.standardOutput = out
                try p.run()
                let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                p.waitUntilExit()
                #expect(p.terminationStatus == 0 && text.contains("USAGE"), "\(verb)")
            }
        }
    }

    /// Ctrl-C (SIGINT) during a run: nothing is settled, the operator is told so in words, and
    /// the exit status is 128 + 2; the next settle closes the run whole. The signal is sent by
    /// the process to itself just before the run's COMMIT (the last moment it can still stop).
    @Test func anInterruptedSettleSaysNothingWasSettledAndTheNextOneIsWhole() throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            let stopped = try cli.run(["settle", "--json"], env: ["CLEARHOUSE_SETTLE_SIGNAL_BEFORE_COMMIT": "1"])
            #expect(stopped.status == 130, "\(stopped.out) \(stopped.err)")
            #expect(stopped.err.contains("clearhouse settle: interrupted (SIGINT): nothing was settled"), "\(stopped.err)")
            #expect(stopped.out.isEmpty, "no run printed: \(stopped.out)")
            let runs = try cli.run(["runs"])
            #expect(runs.status == 0 && !runs.out.contains("R000001"), "\(runs.out)")
            let settled = try cli.run(["settle", "--json"])
            #expect(settled.status == 0, "\(settled.err)")
            let run = try cli.json(settled)
            #expect(run["run"] as? String == "R000001" && run["entries"] as? Int == 1, "\(settled.out)")
            #expect(try cli.run(["verify"]).status == 0)
        }
    }

    /// A signal once the run is recorded (a night job's timeout, a Ctrl-C while it prints)
    /// changes nothing: the run is printed whole and the exit status is 0, never the 143 that
    /// says nothing was settled. The signal is sent by the process to itself after printing,
    /// just before the store closes (where the default action used to be back).
    @Test func aSignalAfterTheRunIsRecordedEndsNothing() throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            let settled = try cli.run(["settle", "--json"], env: ["CLEARHOUSE_SETTLE_SIGNAL_AFTER_COMMIT": "1"])
            #expect(settled.status == 0, "\(settled.status) \(settled.err)")
            let run = try cli.json(settled)
            #expect(run["run"] as? String == "R000001" && run["entries"] as? Int == 1, "\(settled.out)")
            #expect(try cli.run(["runs"]).out.contains("R000001"))
            #expect(try cli.run(["verify"]).status == 0)
        }
    }

    @Test func settleJSONHasTheContractShape() throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            let redeem = #"{"type":"points.redeemed","data":{"member":"M1","points":40,"reference":"C-1"}}"#
            #expect(try cli.run(["post", "--partner", "cinestar"], stdin: redeem).status == 0)
            let r = try cli.run(["settle", "--json"])
            #expect(r.status == 0, "\(r.err)")
            let run = try cli.json(r)
            for key in ["run", "cutoff", "operator_margin_minor", "gross_minor", "net_transfers_minor", "netting_efficiency", "partners", "flows"] {
                #expect(run[key] != nil, "\(key) missing: \(r.out)")
            }
            let partners = run["partners"] as! [[String: Any]]
            let fuel = partners.first { $0["partner"] as? String == "fuelco" }!
            // fuelco issued 100 at 1100 per 1000: payable 110
            #expect(fuel["issued_points"] as? Int == 100 && fuel["payable_minor"] as? Int == 110 && fuel["net_minor"] as? Int == -110)
            let cine = partners.first { $0["partner"] as? String == "cinestar" }!
            // cinestar redeemed 40 at 1050 per 1000: receivable 42
            #expect(cine["redeemed_points"] as? Int == 40 && cine["receivable_minor"] as? Int == 42)
            #expect(run["operator_margin_minor"] as? Int == 68)
            // gross = |110| + |42|, net transfers = |−110| + |42|: nothing netted, efficiency 0.
            #expect(run["gross_minor"] as? Int == 152 && run["net_transfers_minor"] as? Int == 152)
            #expect((run["netting_efficiency"] as? NSNumber)?.doubleValue == 0 && r.out.contains(#""netting_efficiency":0.0,"#), "\(r.out)")
            let flows = run["flows"] as! [[String: Any]]
            #expect(flows.count == 1 && flows[0]["issuer"] as? String == "fuelco" && flows[0]["redeemer"] as? String == "cinestar" && flows[0]["points"] as? Int == 40)
            // On a terminal, settle draws a progress bar on stderr (here through a pseudo-terminal).
            let script = Process()
            script.executableURL = URL(fileURLWithPath: "/usr/bin/script")
            script.arguments = ["-qc", "\(CLI.binary.path) settle --data \(cli.data.path) --partners \(cli.partners.path)", "/dev/null"]
            let tty = Pipe()
            script.standardOutput = tty
            try script.run()
            let shown = String(decoding: tty.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            script.waitUntilExit()
            #expect(shown.contains("settling [") && shown.contains("Settlement run R000002"), "\(shown)")
            let table = try cli.run(["runs", "show", run["run"] as! String])
            #expect(table.out.contains("partner pays") && table.out.contains("coalition pays") && table.out.contains("Settlement plan"))
            // The run is read by its id: the first of the two, and none for an id no run has.
            #expect(table.out.contains(run["run"] as! String) && !table.out.contains("R000002"), "\(table.out)")
            let unknown = try cli.run(["runs", "show", "R999999"])
            #expect(unknown.status == 1 && unknown.err.contains(#"no run "R999999""#), "\(unknown.err)")
            #expect(try cli.run(["runs"]).out.contains(run["run"] as! String))
            #expect(try cli.run(["verify"]).status == 0)
        }
    }

    /// The same damage gives the same breaches in the same order, run after run (each process
    /// hashes with its own seed: nothing reported may follow a dictionary's order).
    @Test func verifyReportsTheSameBreachesInTheSameOrderEveryTime() throws {
        try withCLI { cli in
            #expect(try cli.run(["simulate", "--members", "40", "--events", "400", "--seed", "3"]).status == 0)
            #expect(try cli.run(["settle"]).status == 0)
            let edit = try SQLiteTool.run(
                cli.data.appendingPathComponent("coalition.sqlite"),
                """
                DROP TRIGGER run_partner_immutable_u; DROP TRIGGER run_snapshot_immutable_u; DROP TRIGGER run_flow_immutable_u;
                UPDATE run_partner SET issued_points = issued_points + 1; UPDATE run_snapshot SET earned = earned + 1;
                UPDATE run_flow SET points = points + 1
                """)
            #expect(edit.status == 0, "\(edit.stderr)")
            let first = try cli.run(["verify"])
            #expect(first.status == 1)
            #expect(first.out.components(separatedBy: "BREACH").count > 8, "\(first.out)")
            for _ in 0..<4 { #expect(try cli.run(["verify"]).out == first.out) }
        }
    }

    @Test func simulateThenVerify() throws {
        try withCLI { cli in
            let s = try cli.run(["simulate", "--members", "300", "--events", "3000", "--seed", "5"])
            #expect(s.status == 0, "\(s.out)\(s.err)")
            #expect(s.out.contains("accepted:") && s.out.contains("insufficient-points"))
            #expect(try cli.run(["verify"]).status == 0)
            // Never again into a coalition that exists, unless asked: its entries would be real.
            let again = try cli.run(["simulate", "--members", "10", "--events", "10", "--seed", "6"])
            #expect(again.status == 2 && again.err.contains("--force"), "\(again.err)")
            #expect(try cli.run(["simulate", "--members", "10", "--events", "10", "--seed", "6", "--force"]).status == 0)
        }
    }

    /// A port out of range is a usage error (it used to wrap: 70000 listened on 4464).
    @Test func servePortOutOfRangeIsAUsageError() throws {
        try withCLI { cli in
            let r = try cli.run(["serve", "--port", "70000"])
            #expect(r.status == 64 && r.err.contains("--port must be 0...65535"), "\(r.status) \(r.err)")
        }
    }

    /// A mistyped --data: the verbs that only read or settle say there is nothing there (exit 2)
    /// and make nothing; `verify` finds a breach (exit 1); `post` starts a new coalition.
    @Test func verbsThatDoNotAcceptEventsRefuseADataDirectoryWithoutAJournal() throws {
        try withCLI { cli in
            for verb in [["balance", "M1"], ["settle"], ["runs"], ["notices", "list"], ["statement", "fuelco", "R000001"]] {
                let r = try cli.run(verb)
                #expect(r.status == 2 && r.err.contains("no coalition.sqlite"), "\(verb): \(r.status) \(r.err)")
            }
            #expect(!FileManager.default.fileExists(atPath: cli.data.path), "nothing was created")
            let v = try cli.run(["verify"])
            #expect(v.status == 1 && v.out.contains("no such data directory"), "\(v.out)")
            let first = try cli.run(["post", "--partner", "fuelco"], stdin: earnM1)
            #expect(first.status == 0 && first.err.contains("no coalition.sqlite in \(cli.data.path): starting a new coalition there"), "\(first.err)")
            #expect(try cli.run(["balance", "M1"]).status == 0)
            let second = try cli.run(["post", "--partner", "fuelco"], stdin: earnM1.replacingOccurrences(of: "R-1", with: "R-2"))
            #expect(second.status == 0 && !second.err.contains("new coalition"), "\(second.err)")
        }
    }

    /// `partners check` with a data directory refuses what every verb would refuse at start
    /// (another currency than the history's), and names a ledger whose partner file is gone.
    @Test func partnersCheckComparesTheConfigurationWithTheData() throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            #expect(try cli.run(["partners", "check"]).out.contains("ok: 4 partners"))
            #expect(try cli.run(["partners"]).out.contains("ok: 4 partners"), "check is the default, with --data and --partners as every verb")
            let copy = cli.data.deletingLastPathComponent().appendingPathComponent("partners-usd")
            try FileManager.default.copyItem(at: cli.partners, to: copy)
            let coalition = copy.appendingPathComponent("coalition.toml")
            try String(contentsOf: coalition, encoding: .utf8).replacingOccurrences(of: #"currency = "EUR""#, with: #"currency = "USD""#)
                .write(to: coalition, atomically: true, encoding: .utf8)
            try FileManager.default.removeItem(at: copy.appendingPathComponent("fuelco.toml"))
            let other = CLI(data: cli.data, partners: copy)
            let refused = try other.run(["partners", "check"])
            #expect(refused.status == 2 && refused.err.contains("currency: is USD, but this coalition settles in EUR"), "\(refused.err)")
            try String(contentsOf: coalition, encoding: .utf8).replacingOccurrences(of: #"currency = "USD""#, with: #"currency = "EUR""#)
                .write(to: coalition, atomically: true, encoding: .utf8)
            let gone = try other.run(["partners", "check"])
            #expect(gone.status == 0 && gone.out.contains("partner fuelco has a ledger but no file in"), "\(gone.out)")
        }
    }

    /// A damaged journal, or a directory where it should be: every verb names the cause and
    /// the way out, not only SQLite's words.
    @Test func aDamagedOrMisplacedJournalIsExplained() throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            #expect(truncate(cli.data.appendingPathComponent("coalition.sqlite").path, 100_000) == 0)
            let damaged = try cli.run(["runs"])
            #expect(damaged.status == 2 && damaged.err.contains("is damaged: `clearhouse verify --data"), "\(damaged.err)")
            for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: cli.data.appendingPathComponent("coalition.sqlite").path + suffix) }
            try FileManager.default.removeItem(at: cli.data.appendingPathComponent("ledgers"))
            try FileManager.default.createDirectory(at: cli.data.appendingPathComponent("coalition.sqlite"), withIntermediateDirectories: false)
            let misplaced = try cli.run(["settle"])
            #expect(misplaced.status == 2 && misplaced.err.contains("coalition.sqlite is a directory, not a database"), "\(misplaced.err)")
            // --data naming a file, and ledgers/ a file: said so (they were raw Foundation errors).
            let file = cli.data.deletingLastPathComponent().appendingPathComponent("a-file")
            try Data("x".utf8).write(to: file)
            let asData = try CLI(data: file, partners: cli.partners).run(["post", "--partner", "fuelco"], stdin: earnM1)
            #expect(asData.status == 1 && asData.err.contains("is a file, not a data directory"), "\(asData.err)")
            #expect(try CLI(data: file, partners: cli.partners).run(["verify"]).out.contains("a file, not a data directory"))
            let backup = try cli.run(["backup", file.path])
            #expect(backup.status == 1 && backup.err.contains("is a file, not a directory"), "\(backup.err)")
            try FileManager.default.removeItem(at: cli.data.appendingPathComponent("coalition.sqlite"))
            try? FileManager.default.removeItem(at: cli.data.appendingPathComponent("ledgers"))
            try Data().write(to: cli.data.appendingPathComponent("ledgers"))
            let ledgers = try cli.run(["post", "--partner", "fuelco"], stdin: earnM1)
            #expect(ledgers.err.contains("ledgers is a file, not the directory of the ledgers"), "\(ledgers.err)")
        }
    }

    /// A ledger file lost (deleted, or truncated to nothing) is rebuilt from the journal by the
    /// next verb that opens the store, and every verb says so: the loss is not hidden.
    @Test func aLedgerRebuiltFromTheJournalIsSaid() throws {
        try withCLI { cli in
            #expect(try cli.run(["post", "--partner", "fuelco"], stdin: earnM1).status == 0)
            let ledger = cli.data.appendingPathComponent("ledgers/fuelco.sqlite")
            for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: ledger.path + suffix) }
            let runs = try cli.run(["runs"])
            #expect(runs.status == 0 && runs.err.contains("ledger file was missing or empty: rebuilt from the journal"), "\(runs.err)")
            #expect(runs.err.contains("partner=fuelco") && runs.err.contains("entries=1"), "\(runs.err)")
            let again = try cli.run(["runs"])
            #expect(again.status == 0 && !again.err.contains("rebuilt"), "\(again.err)")
            #expect(try cli.run(["verify"]).status == 0)
        }
    }

    /// Certificates that cannot be read are named, with the reason (it used to print only
    /// `failedToLoadCertificate`); negative numbers are refused by their range, not taken for
    /// options; a body over the limit is not said to be of a size it was not read to.
    @Test func badCertificatesNegativeNumbersAndHugeBodiesAreNamed() throws {
        try withCLI { cli in
            let certs = cli.data.deletingLastPathComponent().appendingPathComponent("bad-certs")
            try FileManager.default.createDirectory(at: certs, withIntermediateDirectories: true)
            try Data("garbage".utf8).write(to: certs.appendingPathComponent("server.crt"))
            try Data("garbage".utf8).write(to: certs.appendingPathComponent("server.key"))
            let serve = try cli.run(["serve", "--port", "0", "--certs", certs.path])
            #expect(serve.status == 2 && serve.err.contains("\(certs.path)/server.crt holds no PEM certificate that can be read"), "\(serve.err)")
            for (args, words) in [(["serve", "--port", "-1"], "--port must be 0...65535"), (["simulate", "--members", "-5"], "--members must be 1..."),
                                  (["simulate", "--events", "-1"], "--events must be 0...")] {
                let r = try cli.run(args)
                #expect(r.status == 64 && r.err.contains(words), "\(args): \(r.err)")
            }
            let huge = try cli.run(["post", "--partner", "fuelco"], stdin: String(repeating: " ", count: 120_000) + earnM1)  // what the pipe holds past the 65,537 bytes read
            #expect(huge.status == 1 && huge.out.contains("more than 65536 bytes") && !huge.out.contains("65537"), "\(huge.out)")
        }
    }
}
