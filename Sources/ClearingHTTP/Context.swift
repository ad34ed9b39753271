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

    /// Closes the connection shortly after the response now being written, so that a client
    /// whose body was refused unread (too large, unsupported, not authorised) cannot keep the
    /// server draining it: Hummingbird otherwise reads the rest of the body to reuse the
    /// connection. The response says `connection: close` and ``RequestDeadlineHandler`` closes
    /// once it is written; this timer is the backstop. The delay lets the response go out first.
    func closeConnectionSoon() {
        guard let channel else { return }
        channel.eventLoop.scheduleTask(in: .milliseconds(Int64(Limits.refusedBodyDrainMillisecondsMax))) {
            channel.close(promise: nil)
        }
    }

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
