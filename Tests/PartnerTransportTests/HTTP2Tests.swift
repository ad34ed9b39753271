import ClearhouseTestSupport
import Foundation
import Hummingbird
import HummingbirdHTTP2
import NIOSSL
import PartnerTransport
import Testing

/// libcurl negotiates HTTP/2 (ALPN) with a server that offers it, and HTTP/1.1 otherwise
/// (the Python receiver of the other tests speaks only 1.1).
@Suite struct HTTP2Tests {
    @Test func http2IsNegotiatedWhenTheServerOffersIt() async throws {
        let dir = TemporaryDirectory("clearhouse-h2")
        defer { dir.remove() }
        let certs = dir.url.appendingPathComponent("certs")
        try TestCertificates.make(in: certs)
        let tls = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certs.appendingPathComponent("server.crt").path).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: certs.appendingPathComponent("server.key").path, format: .pem)))
        let router = Router()
        router.post("/notices") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 1024)
            return Response(status: .accepted, body: .init(byteBuffer: body))
        }
        let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = Application(
            router: router, server: try .http2Upgrade(tlsConfiguration: tls),
            configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { continuation.yield($0.localAddress?.port ?? 0) })
        let server = Task { try await app.runService() }
        defer { server.cancel() }
        var iterator = ports.makeAsyncIterator()
        let port = try #require(await iterator.next())
        let response = await CurlTransport().perform([
            OutboundRequest(
                url: "https://localhost:\(port)/notices", headers: [.init("Content-Type", "application/json")], body: Array("{}".utf8),
                caFile: certs.appendingPathComponent("ca.crt").path, allowPrivateNetworks: true, connectTimeoutMilliseconds: 2_000,
                totalTimeoutMilliseconds: 5_000, responseBytesMax: 1024)
        ])[0]
        #expect(response.status == 202, "\(response)")
        #expect(response.httpVersion == "2")
    }
}
