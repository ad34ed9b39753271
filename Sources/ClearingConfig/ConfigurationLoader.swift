import ClearingDomain
import Crypto
import Foundation
import TOMLKit

/// A configuration file that cannot be used: which file, which key, and why. Its description
/// is the one line printed when start-up is refused.
public struct ConfigurationError: Error, Equatable, CustomStringConvertible {
    public let file: String
    public let key: String?
    public let reason: String

    public init(file: String, key: String?, reason: String) {
        self.file = file
        self.key = key
        self.reason = reason
    }

    public var description: String {
        key.map { "\(file): \($0): \(reason)" } ?? "\(file): \(reason)"
    }
}

/// Reads `coalition.toml` and every `<id>.toml` of a partners directory (CONTRACT §2).
/// Keys not in the contract (nor among the documented optional ones) are refused, so that a
/// misspelt optional key cannot silently change behaviour.
public struct ConfigurationLoader {
    /// Every ISO 4217 code, current and historic (Foundation's list, from ICU).
    static let isoCurrencies = Set(Locale.Currency.isoCurrencies.map(\.identifier))

    public let directory: URL
    /// Looks up `env:NAME` secrets; injectable for tests.
    public let environment: [String: String]
    /// Warnings `resolve` found on the way (a secret file others can read), which `load` returns.
    private let found = FoundWarnings()

    public init(directory: URL, environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.directory = directory
        self.environment = environment
    }

    public func load() throws(ConfigurationError) -> ClearingConfiguration {
        found.warnings.removeAll()
        let coalitionFile = directory.appendingPathComponent("coalition.toml")
        let coalition = try loadCoalition(coalitionFile)
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
                .filter { $0.hasSuffix(".toml") && $0 != "coalition.toml" }.sorted()
        } catch {
            throw ConfigurationError(file: directory.path, key: nil, reason: "cannot list the partners directory")
        }
        guard names.count <= Limits.partnersMax else {
            throw ConfigurationError(file: directory.path, key: nil, reason: "more than \(Limits.partnersMax) partner files")
        }
        var partners: [PartnerID: PartnerTerms] = [:]
        var owners: [String: PartnerID] = [:]  // "key:value" -> partner, to refuse shared credentials
        for name in names {
            let url = directory.appendingPathComponent(name)
            let terms = try loadPartner(url)
            // Webhook and notice secrets are HMAC keys, compared as HMAC uses them: one partner's
            // notice secret as another's webhook secret would let the first sign the second's
            // events, and so would two spellings of one key (`hmacKey`).
            var credentials: [(String, String, [UInt8])] = terms.webhookSecrets.map { ("webhook_secrets", "hmac", ConfigurationLoader.hmacKey($0.bytes)) }
            credentials += [("notice_secret", "hmac", ConfigurationLoader.hmacKey(terms.noticeSecret.bytes)), ("api_token_sha256", "api_token_sha256", terms.apiTokenSHA256)]
            if let c = terms.clientCertSHA256 { credentials.append(("client_cert_sha256", "client_cert_sha256", c)) }
            for (key, group, value) in credentials {
                let k = "\(group):\(Hex.encode(value))"
                if let other = owners[k], other != terms.id {
                    throw ConfigurationError(file: url.path, key: key, reason: "the same credential is configured for partner \(other); each partner needs its own")
                }
                owners[k] = terms.id
            }
            partners[terms.id] = terms
        }
        var configuration = ClearingConfiguration(coalition: coalition, partners: partners)
        configuration.directory = directory.path
        if partners.isEmpty {
            // Not refused (a coalition may be set up before its first partner signs), but said:
            // a mistyped --partners is the likelier cause.
            found.warnings.append("\(directory.path): no partner file (<id>.toml) beside coalition.toml: no partner can post or read until one is added")
        }
        for id in configuration.partnerIDs {
            let terms = partners[id]!
            // CONTRACT §2: only when the coalition allows it may a notice_url resolve to a loopback
            // or private address. A literal address (or `localhost`) is told now, and refused like
            // any bad value: the service does not start with notices that could never be sent.
            // A name is resolved, and checked, at each attempt (the transport's `AddressPolicy`).
            if let host = URLComponents(string: terms.noticeURL)?.host,
                let refused = ConfigurationLoader.refusedHost(host, allowPrivateNetworks: coalition.noticeAllowPrivateNetworks)
            {
                throw ConfigurationError(file: directory.appendingPathComponent("\(id).toml").path, key: "notice_url", reason: "\(host) is \(refused)")
            }
            let secrets = terms.webhookSecrets.enumerated().map { ("webhook_secrets[\($0.offset)]", $0.element) } + [("notice_secret", terms.noticeSecret)]
            for (key, secret) in secrets where secret.bytes.count < Limits.secretBytesRecommendedMin {
                configuration.warnings.append(
                    "\(directory.appendingPathComponent("\(id).toml").path): \(key): only \(secret.bytes.count) bytes; Standard Webhooks recommends \(Limits.secretBytesRecommendedMin)-64 random bytes")
            }
        }
        configuration.warnings += found.warnings
        return configuration
    }

    /// An HMAC-SHA256 key as HMAC uses it (RFC 2104): a key longer than the 64-byte block is
    /// its SHA-256, and the block is padded with zero bytes, so a key and the same key with
    /// zero bytes after it sign alike. Two secrets are the same credential when these agree.
    public static func hmacKey(_ key: [UInt8]) -> [UInt8] {
        var k = key.count > 64 ? Array(SHA256.hash(data: key)) : key
        while k.last == 0 { k.removeLast() }
        return k
    }

    /// Why every notice to this host would be refused (`AddressPolicy`, as the transport
    /// checks at connect time), for a literal address or `localhost`; nil for any other host
    /// (a name is resolved only when a notice is sent).
    static func refusedHost(_ host: String, allowPrivateNetworks: Bool) -> String? {
        var h = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        if let zone = h.firstIndex(of: "%") { h = String(h[..<zone]) }  // fe80::1%25eth0
        if h.hasSuffix(".") { h = String(h.dropLast()) }  // localhost.
        var bytes: [UInt8]?
        if h.lowercased() == "localhost" || h.lowercased().hasSuffix(".localhost") {
            bytes = [127, 0, 0, 1]
        } else {
            var v4 = in_addr(), v6 = in6_addr()
            // inet_aton also reads the shorthands a resolver takes (127.1, 2130706433).
            if inet_aton(h, &v4) == 1 {
                bytes = withUnsafeBytes(of: v4) { Array($0) }
            } else if inet_pton(AF_INET6, h, &v6) == 1 {
                bytes = withUnsafeBytes(of: v6) { Array($0) }
            }
        }
        guard let bytes, let address = IPAddress(bytes: bytes),
            let reason = AddressPolicy.refusal(address, allowPrivateNetworks: allowPrivateNetworks)
        else { return nil }
        let article = AddressPolicy.withArticle(reason)
        let c = AddressPolicy.classify(address)
        return c == .loopback || c == .private
            ? "\(article): notices may go to one only when coalition.toml sets notice_allow_private_networks = true (development and tests)"
            : "\(article): notices never go to one"
    }

    func loadCoalition(_ url: URL) throws(ConfigurationError) -> CoalitionTerms {
        let t = try Table(
            url: url,
            allowed: [
                "currency", "points_expire_after_days", "notice_allow_private_networks", "notice_client_cert_file", "notice_client_key_file",
                "metrics_token_sha256",
            ])
        let currency = try t.string("currency")
        guard currency.utf8.count == 3, currency.utf8.allSatisfy({ $0 >= 0x41 && $0 <= 0x5A }) else {
            throw t.error("currency", "must be an ISO 4217 code of three capital letters (got \(JSONWriter.quote(currency)))")
        }
        guard ConfigurationLoader.isoCurrencies.contains(currency) else {
            throw t.error("currency", "\(JSONWriter.quote(currency)) is not an ISO 4217 currency code (such as EUR, USD, GBP)")
        }
        let days = try t.int("points_expire_after_days", 0...Limits.pointsExpireAfterDaysMax)
        let allowPrivate = try t.optionalBool("notice_allow_private_networks") ?? false
        // The coalition's own client certificate for notices, for partners that ask for mutual TLS.
        var clientFiles: [String] = []
        for key in ["notice_client_cert_file", "notice_client_key_file"] {
            guard let file = try t.optionalString(key) else { continue }
            let path = file.hasPrefix("/") ? file : directory.appendingPathComponent(file).path
            guard FileManager.default.isReadableFile(atPath: path) else { throw t.error(key, "cannot read \(path)") }
            clientFiles.append(path)
        }
        guard clientFiles.count != 1 else {
            throw t.error("notice_client_key_file", "notice_client_cert_file and notice_client_key_file go together")
        }
        let metricsToken = try t.optionalString("metrics_token_sha256").map { (s: String) throws(ConfigurationError) in
            try hex32(resolve(s, t, "metrics_token_sha256"), t, "metrics_token_sha256")
        }
        return CoalitionTerms(
            currency: currency, pointsExpireAfterDays: days, noticeAllowPrivateNetworks: allowPrivate,
            noticeClientCertificateFile: clientFiles.first, noticeClientKeyFile: clientFiles.last, metricsTokenSHA256: metricsToken)
    }

    func loadPartner(_ url: URL) throws(ConfigurationError) -> PartnerTerms {
        let t = try Table(url: url, allowed: [
            "id", "name", "issue_price_per_1000", "redeem_credit_per_1000", "webhook_secrets", "api_token_sha256",
            "notice_url", "notice_secret", "client_cert_sha256", "notice_ca_file", "rate_per_second",
        ])
        let stem = url.deletingPathExtension().lastPathComponent
        let idText = try t.string("id")
        guard let id = PartnerID(idText) else {
            throw t.error("id", "must match ^[a-z0-9][a-z0-9-]{1,31}$ and not be \"coalition\" (got \(JSONWriter.quote(idText)))")
        }
        guard idText == stem else { throw t.error("id", "must equal the file name \(JSONWriter.quote(stem))") }
        let name = try t.string("name")
        guard !name.isEmpty, name.count <= Limits.partnerNameCharactersMax else {
            throw t.error("name", "must be 1-\(Limits.partnerNameCharactersMax) characters")
        }
        // It is printed in statements, notices and logs: a control character (a NUL cut it
        // short, a line break forged a line) is refused.
        guard !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw t.error("name", "must not contain control characters (line breaks, tabs, NUL)")
        }
        let issue = try t.int("issue_price_per_1000", 0...Limits.pricePer1000MinorMax)
        let credit = try t.int("redeem_credit_per_1000", 0...Limits.pricePer1000MinorMax)
        let secretTexts = try t.stringArray("webhook_secrets")
        guard !secretTexts.isEmpty, secretTexts.count <= Limits.webhookSecretsPerPartnerMax else {
            throw t.error("webhook_secrets", "must list 1-\(Limits.webhookSecretsPerPartnerMax) secrets")
        }
        var secrets: [SecretBytes] = []
        for (i, text) in secretTexts.enumerated() {
            secrets.append(try webhookSecret(resolve(text, t, "webhook_secrets[\(i)]"), t, "webhook_secrets[\(i)]"))
        }
        let token = try hex32(resolve(t.string("api_token_sha256"), t, "api_token_sha256"), t, "api_token_sha256")
        let noticeURL = try t.string("notice_url")
        // Spaces and control characters (a line break would forge a header) make libcurl refuse
        // the URL at every attempt: refused here, once.
        guard !noticeURL.unicodeScalars.contains(where: { $0.value <= 0x20 || $0.value == 0x7F }) else {
            throw t.error("notice_url", "must not contain spaces or control characters (percent-encode them)")
        }
        // A scheme in any case is the same scheme (RFC 3986 §3.1), as the transport reads it.
        guard let u = URLComponents(string: noticeURL), u.scheme?.lowercased() == "https", let host = u.host, !host.isEmpty else {
            throw t.error("notice_url", "must be an https:// URL with a host")
        }
        // What libcurl would refuse at every attempt (until the notice is a dead letter), or
        // what would put a credential into the configuration and the logs, is refused here.
        guard noticeURL.utf8.count <= Limits.noticeURLBytesMax else {
            throw t.error("notice_url", "must be at most \(Limits.noticeURLBytesMax) bytes")
        }
        guard u.user == nil && u.password == nil else {
            throw t.error("notice_url", "must not carry a user name or password (authenticate the coalition by the notice's signature, or by mutual TLS)")
        }
        if let port = u.port, !(1...65535).contains(port) {
            throw t.error("notice_url", "port \(port) is not between 1 and 65535")
        }
        guard u.fragment == nil else {
            throw t.error("notice_url", "must not have a #fragment (it is never sent)")
        }
        let noticeSecret = try webhookSecret(resolve(t.string("notice_secret"), t, "notice_secret"), t, "notice_secret")
        let cert = try t.optionalString("client_cert_sha256").map { (s: String) throws(ConfigurationError) in
            try hex32(resolve(s, t, "client_cert_sha256"), t, "client_cert_sha256")
        }
        var caFile: String?
        if let ca = try t.optionalString("notice_ca_file") {
            let path = ca.hasPrefix("/") ? ca : directory.appendingPathComponent(ca).path
            guard FileManager.default.isReadableFile(atPath: path), let bytes = FileManager.default.contents(atPath: path) else {
                throw t.error("notice_ca_file", "cannot read \(path)")
            }
            // libcurl would refuse it at every attempt; a whole parse is TLS's, at the first.
            guard ["-----BEGIN CERTIFICATE-----", "-----BEGIN X509 CERTIFICATE-----", "-----BEGIN TRUSTED CERTIFICATE-----"]
                .contains(where: { bytes.range(of: Data($0.utf8)) != nil })
            else {
                throw t.error("notice_ca_file", "\(path) holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
            }
            caFile = path
        }
        let rate = try t.optionalInt("rate_per_second", 1...Limits.ratePerSecondMax)
        return PartnerTerms(
            id: id, name: name, issuePricePer1000: MoneyMinor(issue), redeemCreditPer1000: MoneyMinor(credit),
            webhookSecrets: secrets, apiTokenSHA256: token, noticeURL: noticeURL, noticeSecret: noticeSecret,
            clientCertSHA256: cert, noticeCAFile: caFile, ratePerSecond: rate)
    }

    /// A secret given literally, as `env:NAME`, or as `file:PATH` (relative to the partners directory).
    func resolve(_ value: String, _ t: Table, _ key: String) throws(ConfigurationError) -> String {
        if value.hasPrefix("env:") {
            let name = String(value.dropFirst(4))
            guard !name.isEmpty else { throw t.error(key, "env: names no environment variable (write env:NAME)") }
            guard let v = environment[name] else { throw t.error(key, "environment variable \(name) is not set") }
            guard !v.isEmpty else { throw t.error(key, "environment variable \(name) is empty") }
            return v
        }
        if value.hasPrefix("file:") {
            let p = String(value.dropFirst(5))
            let path = p.hasPrefix("/") ? p : directory.appendingPathComponent(p).path
            guard let data = FileManager.default.contents(atPath: path) else { throw t.error(key, "cannot read secret file \(path)") }
            guard data.count <= Limits.secretFileBytesMax else {
                throw t.error(key, "secret file \(path) is larger than \(Limits.secretFileBytesMax) bytes (\(data.count)): is it the right file?")
            }
            guard let s = String(data: data, encoding: .utf8) else { throw t.error(key, "secret file \(path) is not UTF-8 text") }
            guard !s.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else { throw t.error(key, "secret file \(path) is empty") }
            // Others may read it: said, not refused (as the server's TLS key).
            if let mode = (try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? Int, mode & 0o077 != 0 {
                found.warnings.append("\(t.file): \(key): the secret file \(path) can be read by others (mode \(String(mode & 0o777, radix: 8))); chmod 600 it")
            }
            return s.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return value
    }

    func webhookSecret(_ text: String, _ t: Table, _ key: String) throws(ConfigurationError) -> SecretBytes {
        guard text.hasPrefix("whsec_"), let bytes = Data(base64Encoded: String(text.dropFirst(6))) else {
            throw t.error(key, "must be whsec_ followed by base64")
        }
        guard bytes.count >= Limits.secretBytesMin, bytes.count <= Limits.secretBytesMax else {
            throw t.error(key, "must decode to \(Limits.secretBytesMin)-\(Limits.secretBytesMax) bytes (got \(bytes.count))")
        }
        return SecretBytes(Array(bytes))
    }

    func hex32(_ s: String, _ t: Table, _ key: String) throws(ConfigurationError) -> [UInt8] {
        guard let bytes = Hex.decode(s), bytes.count == 32 else {
            throw t.error(key, "must be 64 hexadecimal characters (a SHA-256)")
        }
        return bytes
    }
}

public enum Hex {
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func decode(_ s: String) -> [UInt8]? {
        let u = Array(s.lowercased().utf8)
        guard u.count % 2 == 0 else { return nil }
        func v(_ c: UInt8) -> UInt8? {
            switch c {
            case 0x30...0x39: c - 0x30
            case 0x61...0x66: c - 0x61 + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(u.count / 2)
        var i = 0
        while i < u.count {
            guard let hi = v(u[i]), let lo = v(u[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    /// The SHA-256 of a token, as stored in `api_token_sha256`.
    public static func sha256(_ text: String) -> String { encode(SHA256.hash(data: Array(text.utf8))) }
}

/// Warnings found while a configuration loads, outside the checks of the loaded terms.
private final class FoundWarnings {
    var warnings: [String] = []
}

/// One parsed TOML file with typed, error-naming accessors.
struct Table {
    let file: String
    let table: TOMLTable

    init(url: URL, allowed: Set<String>) throws(ConfigurationError) {
        file = url.path
        guard let data = FileManager.default.contents(atPath: url.path) else {
            var isDirectory: ObjCBool = false
            let reason = !FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory) ? "no such file"
                : isDirectory.boolValue ? "is a directory, not a file" : "cannot be read by this user (check its permissions)"
            throw ConfigurationError(file: file, key: nil, reason: reason)
        }
        guard data.count <= Limits.configFileBytesMax, let text = String(data: data, encoding: .utf8) else {
            throw ConfigurationError(file: file, key: nil, reason: "not UTF-8 text of at most \(Limits.configFileBytesMax) bytes")
        }
        // The TOML reader ends a string at a NUL (`\u0000`), silently: a value would be cut short.
        // An escape counts where an odd number of backslashes starts it (`\\u0000` is text).
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        if let line = lines.firstIndex(where: { $0.contains("\0") || Table.hasNulEscape($0) }) {
            throw ConfigurationError(file: file, key: nil, reason: "line \(line + 1) holds a NUL character, which no value may contain")
        }
        do {
            table = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw ConfigurationError(
                file: file, key: nil,
                reason: "not valid TOML: \(e.description) at line \(e.source.begin.line), column \(e.source.begin.column)")
        } catch {
            throw ConfigurationError(file: file, key: nil, reason: "not valid TOML")
        }
        for key in table.keys.sorted() where !allowed.contains(key) {
            throw ConfigurationError(file: file, key: key, reason: "unknown key")
        }
    }

    /// Whether `line` holds `\u0000` or `\U00000000` as an escape (in a comment too: harmless).
    static func hasNulEscape(_ line: Substring) -> Bool {
        let chars = Array(line)
        var i = 0
        while i < chars.count {
            guard chars[i] == "\\" else { i += 1; continue }
            var run = 0
            while i < chars.count && chars[i] == "\\" { run += 1; i += 1 }
            if run % 2 == 1 {
                let rest = String(chars[i..<min(chars.count, i + 9)])
                if rest.hasPrefix("u0000") || rest.hasPrefix("U00000000") { return true }
            }
        }
        return false
    }

    func error(_ key: String, _ reason: String) -> ConfigurationError {
        ConfigurationError(file: file, key: key, reason: reason)
    }

    func string(_ key: String) throws(ConfigurationError) -> String {
        guard let v = table[key] else { throw error(key, "missing") }
        guard let s = v.string else { throw error(key, "must be a string") }
        return s
    }

    func optionalString(_ key: String) throws(ConfigurationError) -> String? {
        table[key] == nil ? nil : try string(key)
    }

    func int(_ key: String, _ range: ClosedRange<Int64>) throws(ConfigurationError) -> Int64 {
        guard let v = table[key] else { throw error(key, "missing") }
        guard let i = v.int else { throw error(key, "must be an integer") }
        guard range.contains(Int64(i)) else {
            throw error(key, "must be between \(range.lowerBound) and \(range.upperBound) (got \(i))")
        }
        return Int64(i)
    }

    func optionalInt(_ key: String, _ range: ClosedRange<Int64>) throws(ConfigurationError) -> Int64? {
        table[key] == nil ? nil : try int(key, range)
    }

    func optionalBool(_ key: String) throws(ConfigurationError) -> Bool? {
        guard let v = table[key] else { return nil }
        guard let b = v.bool else { throw error(key, "must be true or false") }
        return b
    }

    func stringArray(_ key: String) throws(ConfigurationError) -> [String] {
        guard let v = table[key] else { throw error(key, "missing") }
        guard let a = v.array else { throw error(key, "must be an array of strings") }
        var out: [String] = []
        for item in a {
            guard let s = item.string else { throw error(key, "must be an array of strings") }
            out.append(s)
        }
        return out
    }
}
