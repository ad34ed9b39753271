import ClearingDomain
import ClearingStore
import Crypto
import Foundation

/// The coalition's statement key (Ed25519). Each statement response carries a detached
/// signature over a manifest naming the partner, the run, the format and the SHA-256 of the
/// exact body bytes, so a partner can later prove what it was sent (docs/STATEMENTS.md).
public struct StatementSigner: Sendable {
    let key: Curve25519.Signing.PrivateKey
    /// Public keys of earlier statement keys, still published so old signatures stay checkable.
    public var retiredPublicKeys: [[UInt8]] = []

    public init(key: Curve25519.Signing.PrivateKey) { self.key = key }

    /// Reads `statement-retired.pub`: one base64 Ed25519 public key (32 bytes) per line; `#` comments.
    public mutating func loadRetired(file: URL) throws {
        guard FileManager.default.fileExists(atPath: file.path) else { return }
        let text = try String(contentsOf: file, encoding: .utf8)
        for (n, line) in text.split(separator: "\n").enumerated() {
            let t = line.trimmingCharacters(in: .whitespaces)
            if t.isEmpty || t.hasPrefix("#") { continue }
            guard let raw = StatementSigner.publicKeyBytes(t), raw.count == 32 else {
                throw StatementKeyError("\(file.path) line \(n + 1): not an Ed25519 public key in base64 (or base64url, as the `x` of GET /v1/keys)")
            }
            retiredPublicKeys.append(Array(raw))
        }
    }

    /// A public key as written in `statement-retired.pub`: base64, or base64url with or without
    /// padding (the `x` that `GET /v1/keys` served while the key was current).
    static func publicKeyBytes(_ text: String) -> Data? {
        var b64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        b64 += String(repeating: "=", count: (4 - b64.utf8.count % 4) % 4)
        return Data(base64Encoded: b64)
    }

    /// Reads a key file: the 32-byte Ed25519 seed, base64 (what `ops/certs` writes).
    public init(file: URL) throws {
        let text: String
        do { text = try String(contentsOf: file, encoding: .utf8) } catch {
            throw StatementKeyError("cannot read \(file.path) (\(error.localizedDescription)); ops/certs makes a development statement key")
        }
        if let mode = FileSync.modeOpenToOthers(file.path) {
            throw StatementKeyError("\(file.path) can be read by others (mode \(String(mode, radix: 8))); chmod 600 it")
        }
        guard let seed = Data(base64Encoded: text.trimmingCharacters(in: .whitespacesAndNewlines)), seed.count == 32,
            let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: seed)
        else { throw StatementKeyError("\(file.path): must hold a 32-byte Ed25519 seed in base64") }
        self.key = key
    }

    /// Reads the key at `file`, or, when there is no file there, makes one: a new random seed,
    /// mode 0600, written whole and synced before it takes its name (a crash leaves no key or
    /// the whole key, never a short file that would keep `serve` from starting), never over an
    /// existing file. `created` says which.
    public static func loadOrCreate(file: URL) throws -> (signer: StatementSigner, created: Bool) {
        if FileManager.default.fileExists(atPath: file.path) { return (try StatementSigner(file: file), false) }
        let key = Curve25519.Signing.PrivateKey()
        let text = Array((key.rawRepresentation.base64EncodedString() + "\n").utf8)
        guard try FileSync.createWhole(file, text, mode: 0o600) else {
            return (try StatementSigner(file: file), false)  // another process made it first
        }
        return (StatementSigner(key: key), true)
    }

    public var publicKey: [UInt8] { Array(key.publicKey.rawRepresentation) }

    /// A stable id for the key: the first 16 hex digits of SHA-256 of the public key.
    public var keyID: String { StatementSigner.keyID(publicKey) }

    static func keyID(_ publicKey: [UInt8]) -> String { SHA256.hash(data: publicKey).prefix(8).map { String(format: "%02x", $0) }.joined() }

    /// What is signed: `clearhouse.statement.v1`, partner, run, format and the body's SHA-256
    /// (base64), one per line.
    public static func manifest(partner: PartnerID, run: String, format: StatementFormat, sha256: [UInt8]) -> String {
        "clearhouse.statement.v1\n\(partner)\n\(run)\n\(format.rawValue)\n\(Data(sha256).base64EncodedString())"
    }

    /// The `Clearhouse-Signature` header value.
    public func header(partner: PartnerID, run: String, format: StatementFormat, sha256: [UInt8]) throws -> String {
        let signature = try key.signature(for: Data(StatementSigner.manifest(partner: partner, run: run, format: format, sha256: sha256).utf8))
        return "keyid=\"\(keyID)\", alg=\"ed25519\", digest=\"sha-256=:\(Data(sha256).base64EncodedString()):\", signature=\"\(Data(signature).base64EncodedString())\""
    }

    /// `/v1/keys`: a JSON Web Key Set with the public key.
    /// The current key first, then the retired ones.
    public var jwks: String {
        let keys = ([publicKey] + retiredPublicKeys).map { raw -> String in
            var k = JSONWriter()
            k.string("kty", "OKP")
            k.string("crv", "Ed25519")
            k.string("x", Data(raw).base64EncodedString()
                .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: ""))
            k.string("kid", StatementSigner.keyID(raw))
            k.string("alg", "EdDSA")
            k.string("use", "sig")
            return k.finish()
        }
        var w = JSONWriter()
        w.raw("keys", "[" + keys.joined(separator: ",") + "]")
        return w.finish()
    }
}

public struct StatementKeyError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
