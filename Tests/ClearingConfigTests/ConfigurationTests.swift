import ClearingConfig
import ClearingDomain
import Foundation
import Testing

let repositoryPartners = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("partners")

/// A partners directory made from the shipped sample, with one file changed.
struct ConfigDir {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString)")

    init() throws {
        try FileManager.default.copyItem(at: repositoryPartners, to: url)
    }

    func write(_ name: String, _ text: String) throws {
        try text.write(to: url.appendingPathComponent(name), atomically: true, encoding: .utf8)
    }

    func read(_ name: String) throws -> String { try String(contentsOf: url.appendingPathComponent(name), encoding: .utf8) }

    func edit(_ name: String, _ change: (String) -> String) throws { try write(name, change(read(name))) }

    func load(_ env: [String: String] = [:]) throws(ConfigurationError) -> ClearingConfiguration {
        try ConfigurationLoader(directory: url, environment: env).load()
    }

    func error(_ env: [String: String] = [:]) -> ConfigurationError? {
        do { _ = try load(env); return nil } catch { return error }
    }
}

@Suite struct ConfigurationTests {
    @Test func theShippedSampleLoads() throws {
        let c = try ConfigurationLoader(directory: repositoryPartners).load()
        #expect(c.coalition.currency == "EUR")
        #expect(c.coalition.pointsExpireAfterDays == 1095)
        #expect(c.partnerIDs.map(\.rawValue) == ["cinestar", "freshmart", "fuelco", "medipharm"])
        let fuel = c.partners[PartnerID("fuelco")!]!
        #expect(fuel.issuePricePer1000 == MoneyMinor(1100) && fuel.redeemCreditPer1000 == MoneyMinor(950))
        #expect(fuel.webhookSecrets.count == 1 && fuel.webhookSecrets[0].bytes.count == 32)
        #expect(Hex.encode(fuel.apiTokenSHA256) == Hex.sha256("dev-token-fuelco"))
        #expect("\(fuel.noticeSecret)".contains("secret") && !"\(fuel.noticeSecret)".contains("whsec"), "secrets never print")
    }

    @Test func secretsFromEnvironmentAndFiles() throws {
        let d = try ConfigDir()
        let secret = "whsec_" + Data(repeating: 7, count: 32).base64EncodedString()
        try (secret + "\n").write(to: d.url.appendingPathComponent("fuel.secret"), atomically: true, encoding: .utf8)
        try d.edit("fuelco.toml") {
            $0.replacingOccurrences(of: #"webhook_secrets = ["#, with: #"webhook_secrets = ["env:FUEL_NEW_SECRET", "file:fuel.secret", "#)
        }
        let c = try d.load(["FUEL_NEW_SECRET": "whsec_" + Data(repeating: 9, count: 32).base64EncodedString()])
        let s = c.partners[PartnerID("fuelco")!]!.webhookSecrets
        #expect(s.count == 3 && s[0].bytes == Array(repeating: 9, count: 32) && s[1].bytes == Array(repeating: 7, count: 32))
        let e = d.error([:])
        #expect(e?.key == "webhook_secrets[0]" && e?.reason.contains("FUEL_NEW_SECRET") == true)
        // A secret file others can read is said, naming the TOML file, the key and the file.
        let secretFile = d.url.appendingPathComponent("fuel.secret").path
        let environment = ["FUEL_NEW_SECRET": "whsec_" + Data(repeating: 9, count: 32).base64EncodedString()]
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: secretFile)
        let open = try d.load(environment).warnings.filter { $0.contains("can be read by others") }
        #expect(open == ["\(d.url.appendingPathComponent("fuelco.toml").path): webhook_secrets[1]: the secret file \(secretFile) can be read by others (mode 644); chmod 600 it"])
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: secretFile)
        #expect(try d.load(environment).warnings.allSatisfy { !$0.contains("can be read by others") })
    }

    @Test(arguments: [
        ("fuelco.toml", #"id = "fuelco""#, #"id = "fuel""#, "id", "file name"),
        ("fuelco.toml", #"name = "FuelCo Stations""#, "", "name", "missing"),
        ("fuelco.toml", "issue_price_per_1000 = 1100", #"issue_price_per_1000 = "1100""#, "issue_price_per_1000", "integer"),
        ("fuelco.toml", "issue_price_per_1000 = 1100", "issue_price_per_1000 = -1", "issue_price_per_1000", "between"),
        ("fuelco.toml", "issue_price_per_1000 = 1100", "issue_price_per_1000 = 11.5", "issue_price_per_1000", "integer"),
        ("fuelco.toml", "rate_per_second = 2000", "rate_per_secnod = 2000", "rate_per_secnod", "unknown key"),
        ("fuelco.toml", "https://notices.fuelco.example", "http://127.0.0.1:9443", "notice_url", "https"),
        ("fuelco.toml", "https://notices.fuelco.example", "https://127.0.0.1:99999", "notice_url", "port 99999 is not between 1 and 65535"),
        ("fuelco.toml", "https://notices.fuelco.example", "https://127.0.0.1:0", "notice_url", "port 0"),
        ("fuelco.toml", "https://notices.fuelco.example", "https://ops:hunter2@127.0.0.1:9443", "notice_url", "user name or password"),
        ("fuelco.toml", "https://notices.fuelco.example", "https://127.0.0.1:9443/#top", "notice_url", "fragment"),
        ("fuelco.toml", "https://notices.fuelco.example", "https://127.0.0.1:9443/" + String(repeating: "a", count: 2_048), "notice_url", "at most 2048 bytes"),
        ("fuelco.toml", "https://notices.fuelco.example", #"https://notices.fuelco.example/n\r\nX-Injected: 1"#, "notice_url", "spaces or control characters"),
        ("fuelco.toml", "https://notices.fuelco.example", "https://notices.fuelco.example/a b", "notice_url", "spaces or control characters"),
        ("fuelco.toml", #"name = "FuelCo Stations""#, #"name = "Fuel\tCo\nX""#, "name", "control characters"),
        ("fuelco.toml", "https://notices.fuelco.example/clearhouse\"", "https://notices.fuelco.example/clearhouse\"\nnotice_ca_file = \"coalition.toml\"", "notice_ca_file", "holds no PEM certificate"),
        ("fuelco.toml", #"webhook_secrets = ["whsec_"#, #"webhook_secrets = ["wh_"#, "webhook_secrets[0]", "whsec_"),
        ("fuelco.toml", #"api_token_sha256 = "6"#, #"api_token_sha256 = "z"#, "api_token_sha256", "hexadecimal"),
        ("coalition.toml", #"currency = "EUR""#, #"currency = "euro""#, "currency", "ISO 4217"),
        ("coalition.toml", #"currency = "EUR""#, #"currency = "ABC""#, "currency", "\"ABC\" is not an ISO 4217 currency code"),
        ("fuelco.toml", #"webhook_secrets = ["#, #"webhook_secrets = ["env:", "#, "webhook_secrets[0]", "env: names no environment variable"),
        ("fuelco.toml", #"webhook_secrets = ["#, #"webhook_secrets = ["env:CH_TEST_NEVER_SET_9F2", "#, "webhook_secrets[0]", "environment variable CH_TEST_NEVER_SET_9F2 is not set"),
        ("fuelco.toml", #"webhook_secrets = ["#, #"webhook_secrets = ["file:no-such.secret", "#, "webhook_secrets[0]", "cannot read secret file"),
        ("fuelco.toml", #"webhook_secrets = ["#, #"webhook_secrets = ["file:coalition.toml", "#, "webhook_secrets[0]", "must be whsec_"),
        ("coalition.toml", "points_expire_after_days = 1095", "", "points_expire_after_days", "missing"),
        ("coalition.toml", "points_expire_after_days = 1095", "points_expire_after_days = 1095\nnotice_allow_private_networks = 1", "notice_allow_private_networks", "true or false"),
    ])
    func badFilesAreRefusedNamingFileKeyAndReason(file: String, find: String, replace: String, key: String, reason: String) throws {
        let d = try ConfigDir()
        try d.edit(file) {
            precondition($0.contains(find), "fixture drifted: \(find)")
            return $0.replacingOccurrences(of: find, with: replace)
        }
        let e = d.error()
        #expect(e?.file.hasSuffix(file) == true, "\(String(describing: e))")
        #expect(e?.key == key, "\(String(describing: e))")
        #expect(e?.reason.contains(reason) == true, "\(String(describing: e))")
        #expect(e.map { "\($0)" }?.contains("\(file): \(key): ") == true, "one line: file, key, reason")
    }

    /// A partners directory with coalition.toml alone loads (a coalition may start before its
    /// first partner) and says so.
    @Test func noPartnerFileIsSaid() throws {
        let d = try ConfigDir()
        for name in try FileManager.default.contentsOfDirectory(atPath: d.url.path) where name != "coalition.toml" {
            try FileManager.default.removeItem(at: d.url.appendingPathComponent(name))
        }
        let c = try d.load()
        #expect(c.partners.isEmpty)
        #expect(c.warnings.contains { $0.contains("no partner file (<id>.toml) beside coalition.toml") }, "\(c.warnings)")
    }

    /// A secret that cannot be used says why: an empty variable, a secret file that is empty,
    /// too large, or not text.
    @Test func unusableSecretSourcesSayWhy() throws {
        let d = try ConfigDir()
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: #"webhook_secrets = ["#, with: #"webhook_secrets = ["env:FUEL_SECRET", "#) }
        #expect(d.error(["FUEL_SECRET": ""])?.reason == "environment variable FUEL_SECRET is empty")
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: "env:FUEL_SECRET", with: "file:fuel.secret") }
        let path = d.url.appendingPathComponent("fuel.secret")
        let cases: [(Data, String)] = [
            (Data(" \n".utf8), "secret file \(path.path) is empty"),
            (Data(repeating: 0x41, count: 5_000), "secret file \(path.path) is larger than 4096 bytes (5000)"),
            (Data([0x77, 0xFF, 0xFE]), "secret file \(path.path) is not UTF-8 text"),
        ]
        for (content, reason) in cases {
            try content.write(to: path)
            let e = d.error()
            #expect(e?.key == "webhook_secrets[0]" && e?.reason.hasPrefix(reason) == true, "\(String(describing: e))")
        }
    }

    /// A NUL in a value (the TOML reader would end the string there, silently) refuses the
    /// file, naming the line; a partner file that cannot be read says why.
    @Test func aNulAnywhereAndAnUnreadableFileAreNamed() throws {
        let d = try ConfigDir()
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: #"name = "FuelCo Stations""#, with: #"name = "Fuel\u0000Co""#) }
        let e = d.error()
        #expect(e?.file.hasSuffix("fuelco.toml") == true && e?.reason.contains("holds a NUL character") == true, "\(String(describing: e))")
        // An escaped backslash before it is text, not a NUL.
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: #"name = "Fuel\u0000Co""#, with: #"name = "Fuel\\u0000Co""#) }
        #expect(try d.load([:]).partners[PartnerID("fuelco")!]?.name == #"Fuel\u0000Co"#)
        let missing = try ConfigDir()
        try FileManager.default.removeItem(at: missing.url.appendingPathComponent("coalition.toml"))
        try FileManager.default.createDirectory(at: missing.url.appendingPathComponent("coalition.toml"), withIntermediateDirectories: false)
        #expect(missing.error()?.reason == "is a directory, not a file", "\(String(describing: missing.error()))")
    }

    /// A notice_url whose host is a literal address the transport refuses (or `localhost`) is
    /// refused at load, naming the file, the key and the reason (CONTRACT §2: "only when true
    /// may a notice_url resolve to a loopback or private address"; a bad file stops start-up):
    /// loopback and private ones unless the coalition allows private networks, link-local,
    /// metadata and unspecified ones always. A name loads (it is checked at each attempt).
    @Test func aPrivateNoticeAddressIsRefusedUnlessAllowed() throws {
        let unless = ": notices may go to one only when coalition.toml sets notice_allow_private_networks = true (development and tests)"
        let always = ": notices never go to one"
        for (host, kind, allowed) in [
            ("127.0.0.1", "a loopback address" + unless, true), ("localhost", "a loopback address" + unless, true),
            ("10.1.2.3", "a private address" + unless, true), ("192.168.0.9", "a private address" + unless, true),
            ("[::1]", "a loopback address" + unless, true), ("[fd00::5]", "a private address" + unless, true),
            ("[::ffff:10.0.0.1]", "a private address" + unless, true), ("127.1", "a loopback address" + unless, true),
            ("localhost.", "a loopback address" + unless, true), ("[fe80::1%25eth0]", "a link-local address" + always, false),
            ("169.254.169.254", "a metadata address" + always, false), ("169.254.1.1", "a link-local address" + always, false),
            ("0.0.0.0", "an unspecified address" + always, false), ("notices.example.com", nil, true), ("8.8.8.8", nil, true),
        ] {
            let d = try ConfigDir()
            try d.edit("fuelco.toml") { $0.replacingOccurrences(of: "https://notices.fuelco.example", with: "https://\(host):8443") }
            let shown = host.replacingOccurrences(of: "%25", with: "%")  // the URL's host, decoded
            let expected = kind.map { ConfigurationError(file: d.url.appendingPathComponent("fuelco.toml").path, key: "notice_url", reason: "\(shown) is \($0)") }
            #expect(d.error() == expected, "\(host): \(String(describing: d.error()))")
            try d.edit("coalition.toml") { $0 + "\nnotice_allow_private_networks = true\n" }
            #expect((d.error() == nil) == allowed, "\(host) with private networks allowed: \(String(describing: d.error()))")
        }
    }

    /// URL schemes are case-insensitive (RFC 3986 §3.1): `HTTPS://` is https; `HTTP://` is not.
    @Test func aNoticeURLsSchemeIsReadInAnyCase() throws {
        let d = try ConfigDir()
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: "https://notices.fuelco.example", with: "HTTPS://notices.fuelco.example") }
        #expect(d.error() == nil, "\(String(describing: d.error()))")
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: "HTTPS://notices.fuelco.example", with: "HTTP://notices.fuelco.example") }
        #expect(d.error()?.key == "notice_url", "\(String(describing: d.error()))")
    }

    /// CONTRACT §2 sets no length for a secret: a short one loads, with a warning naming the
    /// file and key; an empty one is refused. The token hash, like any secret, may come from
    /// the environment or a file.
    @Test func shortSecretsLoadWithAWarningAndHashesMayComeFromTheEnvironment() throws {
        let d = try ConfigDir()
        let short = "whsec_" + Data("fuel-secret".utf8).base64EncodedString()
        try d.edit("fuelco.toml") { text in
            text.split(separator: "\n", omittingEmptySubsequences: false).map { line in
                line.hasPrefix("webhook_secrets") ? "webhook_secrets = [\"\(short)\"]"
                    : line.hasPrefix("api_token_sha256") ? #"api_token_sha256 = "env:FUEL_TOKEN_SHA256""# : String(line)
            }.joined(separator: "\n")
        }
        let hash = Hex.sha256("a production token")
        let c = try d.load(["FUEL_TOKEN_SHA256": hash])
        let fuel = c.partners[PartnerID("fuelco")!]!
        #expect(fuel.webhookSecrets[0].bytes == Array("fuel-secret".utf8))
        #expect(Hex.encode(fuel.apiTokenSHA256) == hash)
        #expect(c.warnings.count == 1 && c.warnings[0].contains("fuelco.toml: webhook_secrets[0]: only 11 bytes"), "\(c.warnings)")
        #expect(try ConfigurationLoader(directory: repositoryPartners).load().warnings.isEmpty, "the sample's secrets are long enough, its notice_urls public")
        try d.edit("fuelco.toml") { $0.replacingOccurrences(of: short, with: "whsec_") }
        let e = d.error(["FUEL_TOKEN_SHA256": hash])
        #expect(e?.key == "webhook_secrets[0]" && e?.reason.contains("1-1024 bytes") == true, "\(String(describing: e))")
    }

    /// The optional scraper token for /metrics, as a hash, literal or from the environment.
    @Test func aMetricsTokenHashMayBeConfigured() throws {
        let d = try ConfigDir()
        #expect(try d.load().coalition.metricsTokenSHA256 == nil)
        try d.edit("coalition.toml") { $0 + "\nmetrics_token_sha256 = \"env:METRICS_TOKEN_SHA256\"\n" }
        let hash = Hex.sha256("scraper")
        #expect(try d.load(["METRICS_TOKEN_SHA256": hash]).coalition.metricsTokenSHA256.map(Hex.encode) == hash)
        try d.edit("coalition.toml") { $0.replacingOccurrences(of: "env:METRICS_TOKEN_SHA256", with: "not hex") }
        #expect(d.error()?.key == "metrics_token_sha256")
    }

    @Test func credentialsSharedBetweenPartnersAreRefused() throws {
        let d = try ConfigDir()
        let fuel = try d.read("fuelco.toml")
        let token = fuel.split(separator: "\n").first { $0.hasPrefix("api_token_sha256") }!
        try d.edit("medipharm.toml") { text in
            text.split(separator: "\n", omittingEmptySubsequences: false)
                .map { $0.hasPrefix("api_token_sha256") ? String(token) : String($0) }.joined(separator: "\n")
        }
        let e = d.error()
        #expect(e?.key == "api_token_sha256" && e?.reason.contains("fuelco") == true, "\(String(describing: e))")
    }

    /// Webhook and notice secrets are all HMAC keys: one partner's notice secret as another's
    /// webhook secret is the same credential (the first could sign the second's events), and
    /// so is a key written with a zero byte after it (HMAC pads its key with zeros).
    @Test func hmacSecretsSharedBetweenPartnersAreRefusedInAnySpelling() throws {
        func sharing(_ key: String, _ value: String) throws -> ConfigurationError? {
            let d = try ConfigDir()
            try d.edit("medipharm.toml") { text in
                text.split(separator: "\n", omittingEmptySubsequences: false)
                    .map { $0.hasPrefix(key) ? "\(key) = \(value)" : String($0) }.joined(separator: "\n")
            }
            return d.error()
        }
        // fuelco's notice secret as medipharm's webhook secret.
        let a = try sharing("webhook_secrets", #"["whsec_05goLk2l9iO5HeBUCs2Nr7BB5uKzP86Rp1pbJpRdmAs="]"#)
        #expect(a?.file.hasSuffix("medipharm.toml") == true && a?.key == "webhook_secrets" && a?.reason.contains("fuelco") == true, "\(String(describing: a))")
        // fuelco's webhook secret with a zero byte after it, as medipharm's notice secret.
        let b = try sharing("notice_secret", #""whsec_PBZShz+TO1mfE89M1ECxYR0ibqyK0ogzRBc3+O0O58wA""#)
        #expect(b?.key == "notice_secret" && b?.reason.contains("fuelco") == true, "\(String(describing: b))")
        // A key that differs only in a byte that is not a trailing zero is its own.
        #expect(ConfigurationLoader.hmacKey([1, 2, 0]) == [1, 2] && ConfigurationLoader.hmacKey([1, 0, 2]) == [1, 0, 2])
        #expect(ConfigurationLoader.hmacKey(Array(repeating: 7, count: 65)).count == 32)
    }

    @Test func invalidTOMLNamesTheLine() throws {
        let d = try ConfigDir()
        try d.write("cinestar.toml", "id = \"cinestar\"\nname = \n")
        let e = d.error()
        #expect(e?.file.hasSuffix("cinestar.toml") == true && e?.reason.contains("line 2") == true, "\(String(describing: e))")
    }

    @Test func reservedAndInvalidPartnerIDs() throws {
        let d = try ConfigDir()
        let text = try d.read("cinestar.toml")
        try FileManager.default.removeItem(at: d.url.appendingPathComponent("cinestar.toml"))
        try d.write("coalition-x.toml", text.replacingOccurrences(of: #"id = "cinestar""#, with: #"id = "Coalition-X""#))
        #expect(d.error()?.key == "id")
    }
}
