import ClearhouseTestSupport
import ClearingDomain
import ClearingNotices
import ClearingStore
import Foundation
import PartnerTransport
import Testing

/// Notices over real HTTPS (libcurl) to ops/notice-receiver.py on loopback, which verifies
/// each with the official Python `standardwebhooks` package. Time in the back-off comes from a
/// manual clock (the receiver accepts its timestamps with --any-time), never from sleeping.
@Suite(.serialized) final class LiveDeliveryTests {
    let dir = TemporaryDirectory("clearhouse-live-notices")
    let certs: URL
    let receiver: NoticeReceiver
    let clock = ManualClock(SystemClock().now())

    init() throws {
        certs = dir.url.appendingPathComponent("certs")
        try TestCertificates.make(in: certs)
        let secrets = dir.url.appendingPathComponent("receiver-partners")
        try NoticeReceiver.writeSecrets(Fixtures.configuration(), to: secrets)
        receiver = try NoticeReceiver(
            certificate: certs.appendingPathComponent("server.crt"), key: certs.appendingPathComponent("server.key"),
            partners: secrets, directory: dir.url, stallSeconds: 5)
    }

    deinit {
        receiver.stop()
        dir.remove()
    }

    /// A store whose partners' notice endpoints are the receiver in the given modes, trusting `ca`.
    func store(_ modes: [PartnerID: String], ca: URL? = nil, name: String = "data") throws -> Store {
        var c = Fixtures.configuration()
        c.coalition.noticeAllowPrivateNetworks = true
        for (p, mode) in modes {
            c.partners[p]!.noticeURL = mode.hasPrefix("https://") ? mode : receiver.url(mode, p.rawValue)
            c.partners[p]!.noticeCAFile = (ca ?? certs.appendingPathComponent("ca.crt")).path
        }
        let s = try Store(dataDirectory: dir.url.appendingPathComponent(name), configuration: c, clock: clock)
        for (i, p) in modes.keys.sorted().enumerated() {
            _ = s.post([Submission(partner: p, webhookID: WebhookID("w\(i)")!, event: Fixtures.earn("M\(i)", 100, "E-\(i)"))])
        }
        clock.advance(milliseconds: 1000)
        _ = try s.settle()
        return s
    }

    func dispatcher(_ s: Store) -> NoticeDispatcher {
        var o = NoticeDeliveryOptions()
        o.connectTimeoutMilliseconds = 1_000
        o.totalTimeoutMilliseconds = 1_500
        return NoticeDispatcher(store: s, transport: CurlTransport(), clock: clock, options: o, jitterPPM: { 0 })
    }

    func received(_ id: String) -> [[String: Any]] { receiver.records().filter { $0["webhook_id"] as? String == id } }

    @Test func serverErrorsThenSuccess() async throws {
        let s = try store([Fixtures.grocer: "fail-2"])
        defer { try? s.close() }
        let d = dispatcher(s)
        try await d.deliverDue()
        clock.advance(milliseconds: 5_000)
        try await d.deliverDue()
        clock.advance(milliseconds: 300_000)
        #expect(try await d.deliverDue().delivered == 1)
        let got = received("R000001:grocer")
        #expect(got.map { $0["status"] as? Int } == [500, 500, 200])
        #expect(got.allSatisfy { $0["verified"] as? Bool == true }, "standardwebhooks verified every attempt")
        #expect(got.filter { $0["status"] as? Int == 200 && $0["duplicate"] as? Bool == false }.count == 1, "exactly once")
        let attempts = try #require(try s.notice("R000001:grocer")).1
        #expect(attempts.map(\.outcome) == [.retry, .retry, .delivered])
        #expect(attempts.map(\.httpStatus) == [500, 500, 200])
        #expect(attempts.allSatisfy { ($0.latencyMilliseconds ?? -1) >= 0 })
    }

    @Test func aReceiverThatStallsPastTheTimeoutIsRetried() async throws {
        let s = try store([Fixtures.fuel: "stall"])
        defer { try? s.close() }
        let pass = try await dispatcher(s).deliverDue()
        #expect(pass.retrying == 1)
        let (n, attempts) = try #require(try s.notice("R000001:fuel"))
        #expect(n.state == .pending && attempts.last?.error?.hasPrefix("timeout") == true, "\(attempts)")
    }

    @Test func aRefusedConnectionIsRetried() async throws {
        let port = try LoopbackPort.free()
        let s = try store([Fixtures.fuel: "https://127.0.0.1:\(port)/ok/fuel"])
        defer { try? s.close() }
        #expect(try await dispatcher(s).deliverDue().retrying == 1)
        let attempts = try #require(try s.notice("R000001:fuel")).1
        #expect(attempts.last?.error?.hasPrefix("connect") == true, "\(attempts)")
    }

    @Test func aCertificateFromAnotherCANeverGetsTheNotice() async throws {
        let other = dir.url.appendingPathComponent("other-ca")
        try TestCertificates.make(in: other)
        let s = try store([Fixtures.cinema: "ok"], ca: other.appendingPathComponent("ca.crt"))
        defer { try? s.close() }
        #expect(try await dispatcher(s).deliverDue().retrying == 1)
        let attempts = try #require(try s.notice("R000001:cinema")).1
        #expect(attempts.last?.error?.hasPrefix("tls") == true, "\(attempts)")
        #expect(received("R000001:cinema").isEmpty, "nothing was delivered insecurely")
    }

    @Test func aRedirectIsNotFollowed() async throws {
        let s = try store([Fixtures.grocer: "redirect"])
        defer { try? s.close() }
        #expect(try await dispatcher(s).deliverDue().retrying == 1)
        let attempts = try #require(try s.notice("R000001:grocer")).1
        #expect(attempts.last?.httpStatus == 302)
        #expect(received("R000001:grocer").map { $0["path"] as? String } == ["/redirect/grocer"], "the target never saw it")
    }

    @Test func loopbackIsRefusedUnlessTheConfigurationAllowsIt() async throws {
        let s = try store([Fixtures.grocer: "ok"])
        try s.close()
        var c = s.configuration
        c.coalition.noticeAllowPrivateNetworks = false
        let strict = try Store(dataDirectory: dir.url.appendingPathComponent("data"), configuration: c, clock: clock)
        defer { try? strict.close() }
        #expect(try await dispatcher(strict).deliverDue().retrying == 1)
        let attempts = try #require(try strict.notice("R000001:grocer")).1
        #expect(attempts.last?.error?.hasPrefix("refused-address") == true, "\(attempts)")
        #expect(received("R000001:grocer").isEmpty)
    }
}
