import ClearingDomain
import Foundation
import NIOSSL

/// The server's TLS configuration, set explicitly to Mozilla's "intermediate" profile:
/// TLS 1.2 and 1.3 only, ECDHE key exchange with AEAD ciphers only, curves X25519, P-256 and
/// P-384. swift-nio-ssl's defaults (TLS 1.0 minimum, CBC and RSA key exchange suites) are
/// never used.
public enum ServerTLS {
    /// TLS 1.2 suites of the intermediate profile, in its order (TLS 1.3 suites are all AEAD).
    public static let cipherSuites = [
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    ].joined(separator: ":")

    public struct MissingCertificate: Error, CustomStringConvertible {
        public let description: String
    }

    /// Reads `server.crt` and `server.key` (and `ca.crt` when `mutualTLS`) from `directory`.
    /// With `ca.crt`, clients may present a certificate, which must then chain to that CA
    /// (routes decide which partners require one).
    public static func configuration(directory: URL, mutualTLS: Bool) throws -> TLSConfiguration {
        let crt = directory.appendingPathComponent("server.crt").path
        let key = directory.appendingPathComponent("server.key").path
        let ca = directory.appendingPathComponent("ca.crt").path
        for (path, what) in [(crt, "server certificate"), (key, "server private key")] + (mutualTLS ? [(ca, "client CA (a partner uses mutual TLS)")] : [])
        where !FileManager.default.isReadableFile(atPath: path) {
            throw MissingCertificate(description: "no \(what) at \(path); run ops/certs to make development certificates")
        }
        let chain: [NIOSSLCertificate], privateKey: NIOSSLPrivateKey
        do { chain = try NIOSSLCertificate.fromPEMFile(crt) } catch {
            throw MissingCertificate(description: "\(crt) holds no PEM certificate that can be read (\(error)); run ops/certs to make development certificates")
        }
        do { privateKey = try NIOSSLPrivateKey(file: key, format: .pem) } catch {
            throw MissingCertificate(description: "\(key) holds no PEM private key that can be read (\(error)); run ops/certs to make development certificates")
        }
        guard !chain.isEmpty else {
            throw MissingCertificate(description: "\(crt) holds no certificate; run ops/certs to make development certificates")
        }
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        tls.minimumTLSVersion = .tlsv12
        tls.maximumTLSVersion = .tlsv13
        tls.cipherSuites = cipherSuites
        tls.curves = [.x25519, .secp256r1, .secp384r1]
        // On close the TLS layer waits for the peer's close_notify, reading (and discarding)
        // whatever still arrives; keep that short so a refused stream is really cut off.
        tls.shutdownTimeout = .milliseconds(Int64(Limits.tlsShutdownTimeoutMillisecondsMax))
        if mutualTLS {
            tls.trustRoots = .file(ca)
            tls.certificateVerification = .optionalVerification
            tls.sendCANameList = true
        }
        return tls
    }
}
