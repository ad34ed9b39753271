import ClearingDomain
import Crypto
import Hummingbird
import NIOCore
import NIOSSL

/// The request context: Hummingbird's core storage plus the connection, so that a route can
/// ask for the client certificate the TLS handshake validated.
public struct ClearhouseContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: (any Channel)?

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }

    /// Event bodies are at most 64 KiB (CONTRACT §3); nothing else takes a body.
    public var maxUploadSize: Int { Limits.eventBodyBytesMax }

    /// SHA-256 of the DER of the client certificate this connection presented and the server
    /// validated against `ca.crt`; nil without one (or without TLS, as in in-process tests).
    func clientCertificateSHA256() async -> [UInt8]? {
        guard let channel,
            let certificate = try? await channel.nioSSL_peerCertificate().get(),
            let der = try? certificate.toDERBytes()
        else { return nil }
        return Array(SHA256.hash(data: der))
    }
}
