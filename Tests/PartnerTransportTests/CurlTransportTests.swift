import ClearhouseTestSupport
import ClearingDomain
import Foundation
import PartnerTransport
import StandardWebhooks
import Testing

/// libcurl against a real HTTPS receiver on loopback (ops/notice-receiver.py).
@Suite(.serialized) final class CurlTransportTests {
    let dir = TemporaryDirectory("clearhouse-transport")
    let certs: URL
    let receiver: NoticeReceiver

    init() throws {
        certs = dir.url.appendingPathComponent("certs")
        try TestCertificates.make(in: certs)
        let partners = dir.url.appendingPathComponent("partners")
        try FileManager.default.createDirectory(at: partners, withIntermediateDirectories: true)
        try "id = \"fuelco\"\nnotice_secret = \"whsec_\(Data(repeating: 7, count: 32).base64EncodedString())\"\n"
            .write(to: partners.appendingPathComponent("fuelco.toml"), atomically: true, encoding: .utf8)
        receiver = try NoticeReceiver(
            certificate: certs.appendingPathComponent("server.crt"), key: certs.appendingPathComponent("server.key"),
            partners: partners, directory: dir.url, clientCA: nil)
    }

    deinit {
        receiver.stop()
        dir.remove()
    }

    /// A POST signed with fuelco's notice secret, so that the receiver answers with its mode.
    func request(_ url: String, allowPrivate: Bool = true, ca: Bool = true, limit: Int = 64 * 1024) -> OutboundRequest {
        let body = Array(#"{"type":"test"}"#.utf8)
        let id = "msg_\(UUID().uuidString)"
        let ts = Int64(Date().timeIntervalSince1970)
        let signature = WebhookSignature.sign(id: id, timestamp: ts, body: body, secret: SecretBytes(Array(repeating: 7, count: 32)))
        return OutboundRequest(
            url: url,
            headers: [
                .init("Content-Type", "application/json"), .init("webhook-id", id), .init("webhook-timestamp", String(ts)),
                .init("webhook-signature", signature),
            ],
            body: body,
            caFile: ca ? certs.appendingPathComponent("ca.crt").path : nil, allowPrivateNetworks: allowPrivate,
            connectTimeoutMilliseconds: 2_000, totalTimeoutMilliseconds: 5_000, responseBytesMax: limit)
    }

    @Test func severalRequestsAtOnceAnswerInOrder() async throws {
        let responses = await CurlTransport().perform([
            request(receiver.url("gone", "fuelco")), request(receiver.url("ok", "fuelco")), request(receiver.url("fail-9", "fuelco")),
        ])
        #expect(responses.map(\.status) == [410, 200, 500])
        #expect(responses.allSatisfy { $0.httpVersion == "1.1" })
        #expect(receiver.records().count == 3)
    }

    @Test func aPrivateAddressIsRefusedBeforeConnectingUnlessAllowed() async throws {
        let r = await CurlTransport().perform([request(receiver.url("ok", "fuelco"), allowPrivate: false)])[0]
        guard case .failure(let f) = r.result else { Issue.record("expected a refusal, got \(r)"); return }
        #expect(f.kind == .refusedAddress)
        #expect(f.message.contains("loopback"))
        #expect(receiver.records().isEmpty, "nothing reached the receiver")
    }

    @Test func onlyHTTPS() async throws {
        let r = await CurlTransport().perform([request("http://localhost:\(receiver.port)/ok/fuelco")])[0]
        #expect(r.result == .failure(TransportFailure(.invalidRequest, "only https URLs are allowed")))
        #expect(receiver.records().isEmpty)
    }

    @Test func withoutTheCAFileTheSystemStoreDoesNotTrustTheDevelopmentCA() async throws {
        let r = await CurlTransport().perform([request(receiver.url("ok", "fuelco"), ca: false)])[0]
        guard case .failure(let f) = r.result else { Issue.record("expected a TLS failure, got \(r)"); return }
        #expect(f.kind == .tls)
        #expect(receiver.records().isEmpty, "nothing was sent insecurely")
    }

    @Test func aResponseLongerThanTheLimitIsCutOffButKeepsItsStatus() async throws {
        let responses = await CurlTransport().perform([
            request(receiver.url("big-500", "fuelco"), limit: 64 * 1024), request(receiver.url("big", "fuelco"), limit: 64 * 1024),
        ])
        #expect(responses[0].status == 500, "a long error answer is still that error (a 429 waits for its retry-after): \(responses[0])")
        #expect(responses[1].status == 200, "success is any 2xx, however long its body: \(responses[1])")
    }

    /// A stopping sender's transfers end within a poll interval of its cancellation (the
    /// receiver stalls for 10 s), as failures: the notices are sent again after the restart.
    @Test func cancellingTheCallerEndsStalledTransfers() async throws {
        let stalled = request(receiver.url("stall", "fuelco"))
        let task = Task { await CurlTransport().perform([stalled]) }
        // Cancelled from a thread of its own half a second in: a sleep on the concurrency pool
        // can resume seconds late while other tests hold its threads, past the 5 s timeout.
        Thread {
            Thread.sleep(forTimeInterval: 0.5)
            task.cancel()
        }.start()
        let responses = await task.value
        // Not the transfer's 5 s timeout nor the receiver's answer after 10 s: the cancellation.
        guard case .failure(let f) = responses[0].result else { Issue.record("expected a failure, got \(responses[0])"); return }
        #expect(f.message.contains("cancelled"), "\(f)")
    }

    /// TLS verification includes the host name: a certificate from the trusted CA, but for
    /// another name, is refused before anything is sent (CONTRACT §7: never turned off).
    @Test func aCertificateForAnotherNameIsRefused() async throws {
        let script = """
            set -e; cd "$1"
            openssl ecparam -name prime256v1 -genkey -noout -out other.key 2>/dev/null
            openssl req -new -key other.key -subj /CN=wrong.example -out other.csr
            printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:wrong.example\n' > other.ext
            openssl x509 -req -in other.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 2 -extfile other.ext -out other.crt 2>/dev/null
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = ["-c", script, "issue", certs.path]
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let partners = dir.url.appendingPathComponent("partners")
        let other = try NoticeReceiver(
            certificate: certs.appendingPathComponent("other.crt"), key: certs.appendingPathComponent("other.key"),
            partners: partners, directory: dir.url, clientCA: nil)
        defer { other.stop() }
        // https://localhost:<port>/…, while the certificate names only wrong.example.
        let response = await CurlTransport().perform([request(other.url("ok", "fuelco"))])[0]
        guard case .failure(let f) = response.result else { Issue.record("expected a TLS failure, got \(response)"); return }
        #expect(f.kind == .tls, "\(f)")
        #expect(other.records().isEmpty, "nothing was sent to a server of another name")
    }

    @Test func aRefusedConnectionIsAConnectFailure() async throws {
        let port = try LoopbackPort.free()
        let r = await CurlTransport().perform([request("https://127.0.0.1:\(port)/ok/fuelco")])[0]
        guard case .failure(let f) = r.result else { Issue.record("expected a connect failure, got \(r)"); return }
        #expect(f.kind == .connect)
    }

    @Test func headersCannotBeInjected() async throws {
        var bad = request(receiver.url("ok", "fuelco"))
        bad.headers.append(.init("X-Evil", "a\r\nInjected: yes"))
        let r = await CurlTransport().perform([bad])[0]
        guard case .failure(let f) = r.result else { Issue.record("expected a refusal, got \(r)"); return }
        #expect(f.kind == .invalidRequest)
        #expect(receiver.records().isEmpty)
    }

    @Test func aClientCertificateIsPresentedWhenTheReceiverAsksForOne() async throws {
        let partners = dir.url.appendingPathComponent("partners")
        let mtls = try NoticeReceiver(
            certificate: certs.appendingPathComponent("server.crt"), key: certs.appendingPathComponent("server.key"),
            partners: partners, directory: dir.url, clientCA: certs.appendingPathComponent("ca.crt"))
        defer { mtls.stop() }
        let without = await CurlTransport().perform([request(mtls.url("gone", "fuelco"))])[0]
        #expect(without.status == nil, "no client certificate: no answer")
        var with = request(mtls.url("gone", "fuelco"))
        with.clientCertificateFile = certs.appendingPathComponent("client-fuelco.crt").path
        with.clientKeyFile = certs.appendingPathComponent("client-fuelco.key").path
        let answered = await CurlTransport().perform([with])[0]
        #expect(answered.status == 410, "the TLS handshake passed: \(answered)")
    }
}
