import ClearhouseTestSupport
import ClearingDomain
import ClearingHTTP
import ClearingStore
import StandardWebhooks
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Testing

let fuel = PartnerID("fuel")!, cinema = PartnerID("cinema")!, slow = PartnerID("slow")!, secure = PartnerID("secure")!
let secretA = SecretBytes(Array(repeating: 1, count: 32)), secretB = SecretBytes(Array(repeating: 2, count: 32))

func sha(_ s: String) -> [UInt8] { Array(SHA256.hash(data: Array(s.utf8))) }

func httpConfiguration() -> ClearingConfiguration {
    func terms(_ id: PartnerID, secrets: [SecretBytes], rate: Int64? = nil, cert: [UInt8]? = nil) -> PartnerTerms {
        PartnerTerms(
            id: id, name: id.rawValue, issuePricePer1000: MoneyMinor(1000), redeemCreditPer1000: MoneyMinor(900),
            webhookSecrets: secrets, apiTokenSHA256: sha("token-\(id)"), noticeURL: "https://127.0.0.1/\(id)",
            noticeSecret: secretA, clientCertSHA256: cert, ratePerSecond: rate)
    }
    return ClearingConfiguration(
        coalition: CoalitionTerms(currency: "EUR", pointsExpireAfterDays: 1095),
        partners: [
            fuel: terms(fuel, secrets: [secretA, secretB]),  // rotating: two secrets
            cinema: terms(cinema, secrets: [secretB]),
            slow: terms(slow, secrets: [secretA], rate: 1),
            secure: terms(secure, secrets: [secretA], cert: sha("a certificate")),
        ])
}

/// The intake over a real store, served in-process.
final class Server: @unchecked Sendable {
    let dir = TemporaryDirectory("clearhouse-http")
    let clock = ManualClock(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
    let store: Store
    let writer: PostingWriter
    let intake: Intake

    init() throws {
        store = try Store(dataDirectory: dir.url, configuration: httpConfiguration(), clock: clock)
        writer = PostingWriter(store: store)
        intake = Intake(configuration: httpConfiguration(), store: store, writer: writer, clock: clock)
    }

    deinit {
        writer.shutdown()
        try? store.close()
        dir.remove()
    }

    var nowSeconds: Int64 { clock.now().millisecondsSinceEpoch / 1000 }

    func headers(id: String, body: String, secret: SecretBytes = secretA, timestamp: Int64? = nil, contentType: String = "application/json") -> HTTPFields {
        let ts = timestamp ?? nowSeconds
        var h = HTTPFields()
        h[.contentType] = contentType
        h[HTTPField.Name("webhook-id")!] = id
        h[HTTPField.Name("webhook-timestamp")!] = String(ts)
        h[HTTPField.Name("webhook-signature")!] = WebhookSignature.sign(id: id, timestamp: ts, body: Array(body.utf8), secret: secret)
        return h
    }

    func test(_ body: @escaping @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        let app = Application(router: intake.router())
        try await app.test(.router, body)
    }
}

let earn = #"{"type":"points.earned","data":{"member":"M1","points":100,"reference":"R-1"}}"#

func problemType(_ r: TestResponse) -> String? {
    (try? JSONSerialization.jsonObject(with: Data(buffer: r.body)) as? [String: Any])?["type"] as? String
}

@Suite struct IntakeTests {
    @Test func signedEventIsCreatedThenReplayed() async throws {
        let s = try Server()
        try await s.test { client in
            let first = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "msg_1", body: earn), body: ByteBuffer(string: earn))
            #expect(first.status == .created)
            #expect(first.headers[.contentType] == "application/json")
            let body = String(buffer: first.body)
            #expect(body.contains(#""sequence":1"#) && body.contains(#""member_balance":100"#))
            let again = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "msg_1", body: earn), body: ByteBuffer(string: earn))
            #expect(again.status == .ok && String(buffer: again.body) == body)
            let byRef = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "msg_2", body: earn), body: ByteBuffer(string: earn))
            #expect(byRef.status == .ok && String(buffer: byRef.body) == body)
        }
        #expect(try s.store.ledgerEntries(fuel).count == 1)
    }

    @Test func everyProblemOfTheTable() async throws {
        let s = try Server()
        try await s.test { client in
            func post(_ partner: String, _ id: String, _ body: String, _ headers: HTTPFields? = nil) async throws -> TestResponse {
                try await client.execute(uri: "/v1/partners/\(partner)/events", method: .post, headers: headers ?? s.headers(id: id, body: body), body: ByteBuffer(string: body))
            }
            _ = try await post("fuel", "ok", earn)
            // The media type is compared case-insensitively, parameters and spaces aside.
            let earn2 = earn.replacingOccurrences(of: "R-1", with: "R-5").replacingOccurrences(of: "\"M1\"", with: "\"M9\"")
            let mixed = try await post("fuel", "ct0", earn2, s.headers(id: "ct0", body: earn2, contentType: " Application/JSON ; charset=utf-8"))
            #expect(mixed.status == .created, "\(String(buffer: mixed.body))")
            var noSig = s.headers(id: "x", body: earn)
            noSig[HTTPField.Name("webhook-signature")!] = nil
            let tampered = earn.replacingOccurrences(of: "100", with: "900")
            let redeem101 = #"{"type":"points.redeemed","data":{"member":"M1","points":101,"reference":"C-1"}}"#
            var gzipped = s.headers(id: "ce", body: earn)
            gzipped[.contentEncoding] = "gzip"
            var identity = s.headers(id: "ce2", body: earn2.replacingOccurrences(of: "R-5", with: "R-6"))
            identity[.contentEncoding] = "Identity"
            let plainIdentity = try await post("fuel", "ce2", earn2.replacingOccurrences(of: "R-5", with: "R-6"), identity)
            #expect(plainIdentity.status == .created, "identity is no coding: \(String(buffer: plainIdentity.body))")
            let cases: [(TestResponse, Int, String)] = [
                (try await post("fuel", "ce", earn, gzipped), 415, "unsupported-media-type"),
                (try await post("fuel", "m1", "{not json"), 400, "malformed"),
                (try await post("fuel", "m2", #"{"type":"points.earned","data":{"member":"M1","points":0,"reference":"R-9"}}"#), 400, "malformed"),
                (try await post("fuel", "bad id!", earn.replacingOccurrences(of: "R-1", with: "R-8")), 400, "malformed"),
                (try await post("fuel", "s1", tampered, s.headers(id: "s1", body: earn)), 401, "bad-signature"),
                (try await post("fuel", "s2", earn, noSig), 401, "bad-signature"),
                (try await post("cinema", "s3", earn, s.headers(id: "s3", body: earn, secret: secretA)), 401, "bad-signature"),
                (try await post("fuel", "t1", earn, s.headers(id: "t1", body: earn, timestamp: s.nowSeconds - 301)), 401, "stale-timestamp"),
                (try await post("fuel", "t2", earn, s.headers(id: "t2", body: earn, timestamp: s.nowSeconds + 301)), 401, "stale-timestamp"),
                (try await post("secure", "w1", earn), 403, "wrong-partner"),
                (try await post("nobody", "u1", earn), 404, "unknown-partner"),
                (try await post("fuel", "c1", earn.replacingOccurrences(of: "100", with: "101")), 409, "conflict"),
                (try await post("fuel", "ok", earn.replacingOccurrences(of: "R-1", with: "R-7")), 409, "conflict"),
                (try await post("fuel", "ct", earn, s.headers(id: "ct", body: earn, contentType: "text/plain")), 415, "unsupported-media-type"),
                (try await post("fuel", "ct2", earn, s.headers(id: "ct2", body: earn, contentType: "application/jsonx")), 415, "unsupported-media-type"),
                (try await post("fuel", "ct3", earn, s.headers(id: "ct3", body: earn, contentType: "application/json-seq; x=1")), 415, "unsupported-media-type"),
                (try await post("fuel", "ct4", earn, s.headers(id: "ct4", body: earn, contentType: "")), 415, "unsupported-media-type"),
                (try await post("cinema", "r1", redeem101, s.headers(id: "r1", body: redeem101, secret: secretB)), 422, "insufficient-points"),
                (try await post("fuel", "o1", #"{"type":"points.earn_reversed","data":{"member":"M1","points":1,"reference":"F-1","original_reference":"NONE"}}"#), 422, "unknown-original"),
                (try await post("fuel", "o2", #"{"type":"points.earn_reversed","data":{"member":"M1","points":101,"reference":"F-2","original_reference":"R-1"}}"#), 422, "reversal-exceeds-original"),
                (try await post("fuel", "o3", #"{"type":"points.earn_reversed","data":{"member":"M2","points":1,"reference":"F-3","original_reference":"R-1"}}"#), 422, "member-mismatch"),
            ]
            for (r, status, slug) in cases {
                #expect(Int(r.status.code) == status, "\(slug): \(String(buffer: r.body))")
                #expect(r.headers[.contentType] == "application/problem+json", "\(slug)")
                #expect(problemType(r) == "urn:clearhouse:problem:\(slug)", "\(String(buffer: r.body))")
                // Every 401 says which scheme it wants (RFC 9110 §15.5.2); no other answer does.
                #expect(r.headers[.wwwAuthenticate] == (status == 401 ? #"Standard-Webhooks realm="clearhouse""# : nil), "\(slug)")
            }
        }
        // Nothing of any refused request was written.
        #expect(try s.store.ledgerEntries(fuel).count == 3, "ok, ct0 and ce2")
        #expect(try s.store.ledgerEntries(cinema).isEmpty)
    }

    @Test func bodiesJustUnderAndOver64KiB() async throws {
        let s = try Server()
        try await s.test { client in
            let prefix = #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-2"}}"#
            let under = prefix + String(repeating: " ", count: Limits.eventBodyBytesMax - prefix.utf8.count)
            #expect(under.utf8.count == Limits.eventBodyBytesMax)
            let ok = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "big1", body: under), body: ByteBuffer(string: under))
            #expect(ok.status == .created, "\(String(buffer: ok.body))")
            let over = under + " "
            let refused = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "big2", body: over), body: ByteBuffer(string: over))
            #expect(refused.status.code == 413 && problemType(refused) == "urn:clearhouse:problem:too-large")
        }
    }

    @Test func secretRotationAndSeveralSignatures() async throws {
        let s = try Server()
        try await s.test { client in
            let b = earn
            let withNew = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "rot1", body: b, secret: secretB), body: ByteBuffer(string: b))
            #expect(withNew.status == .created)
            var h = s.headers(id: "rot2", body: b.replacingOccurrences(of: "R-1", with: "R-2"), secret: secretA)
            let good = h[HTTPField.Name("webhook-signature")!]!
            h[HTTPField.Name("webhook-signature")!] = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v2,zzz " + good
            let several = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: h, body: ByteBuffer(string: b.replacingOccurrences(of: "R-1", with: "R-2")))
            #expect(several.status == .created)
            let edge = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "rot3", body: b.replacingOccurrences(of: "R-1", with: "R-3"), timestamp: s.nowSeconds - 300), body: ByteBuffer(string: b.replacingOccurrences(of: "R-1", with: "R-3")))
            #expect(edge.status == .created, "300 s is still within the tolerance")
            let ahead = b.replacingOccurrences(of: "R-1", with: "R-4")
            let future = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "rot4", body: ahead, timestamp: s.nowSeconds + 300), body: ByteBuffer(string: ahead))
            #expect(future.status == .created, "300 s ahead too")

            // Entries on several header lines (one per secret), in either order, or folded by a
            // proxy into one line joined with ", ": any matching entry is enough.
            let bogus = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            for i in 0..<3 {
                let body = b.replacingOccurrences(of: "R-1", with: "R-lines-\(i)")
                var h = s.headers(id: "lines\(i)", body: body)
                let good = h[HTTPField.Name("webhook-signature")!]!
                h[values: HTTPField.Name("webhook-signature")!] = [[bogus, good], [good, bogus], ["\(good), \(bogus)"]][i]
                let r = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: h, body: ByteBuffer(string: body))
                #expect(r.status == .created, "\(i): \(String(buffer: r.body))")
            }
            // Any listed signature: the matching one may come after many others (as many as
            // the request's headers hold, past 4 KiB in one header).
            let late = b.replacingOccurrences(of: "R-1", with: "R-late")
            var lateHeaders = s.headers(id: "late", body: late)
            let lateGood = lateHeaders[HTTPField.Name("webhook-signature")!]!
            lateHeaders[HTTPField.Name("webhook-signature")!] = Array(repeating: bogus, count: 200).joined(separator: " ") + " " + lateGood
            let lateAnswer = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: lateHeaders, body: ByteBuffer(string: late))
            #expect(lateAnswer.status == .created, "\(String(buffer: lateAnswer.body))")
            // A signed `webhook-id` longer than any id, even past 4 KiB, is a bad id (400), not
            // an unsigned message (401).
            for length in [129, 5_000] {
                let longID = String(repeating: "a", count: length)
                let r = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: longID, body: b), body: ByteBuffer(string: b))
                #expect(r.status.code == 400 && problemType(r) == "urn:clearhouse:problem:malformed", "\(length): \(String(buffer: r.body))")
            }
        }
    }

    @Test func rateLimitedPartnerGets429WithRetryAfter() async throws {
        let s = try Server()
        try await s.test { client in
            var statuses: [Int] = []
            var retryAfter: String?
            for i in 0..<4 {
                let b = earn.replacingOccurrences(of: "R-1", with: "S-\(i)")
                let r = try await client.execute(uri: "/v1/partners/slow/events", method: .post, headers: s.headers(id: "sl\(i)", body: b), body: ByteBuffer(string: b))
                statuses.append(Int(r.status.code))
                if r.status.code == 429 { retryAfter = r.headers[.retryAfter] }
            }
            #expect(statuses == [201, 201, 429, 429], "burst of 2 s at 1/s")
            #expect(retryAfter == "1")
            s.clock.advance(milliseconds: 1000)
            let b = earn.replacingOccurrences(of: "R-1", with: "S-9")
            let later = try await client.execute(uri: "/v1/partners/slow/events", method: .post, headers: s.headers(id: "sl9", body: b), body: ByteBuffer(string: b))
            #expect(later.status == .created)
        }
    }

    /// Reads are held to the partner's rate too (a token must not try member ids at full
    /// speed), in a bucket of their own: postings that spent their rate leave the reads theirs,
    /// and reads never spend the postings'. Reads without the partner's credentials spend nothing.
    @Test func readsHaveTheirOwnBucketAtThePartnersRate() async throws {
        let s = try Server()
        try await s.test { client in
            func read(_ path: String, _ token: String = "token-slow") async throws -> TestResponse {
                var h = HTTPFields()
                h[.authorization] = "Bearer \(token)"
                return try await client.execute(uri: path, method: .get, headers: h)
            }
            func post(_ i: Int) async throws -> Int {
                let b = earn.replacingOccurrences(of: "R-1", with: "S-\(i)")
                return Int(try await client.execute(uri: "/v1/partners/slow/events", method: .post, headers: s.headers(id: "sl\(i)", body: b), body: ByteBuffer(string: b)).status.code)
            }
            // Postings spend their burst (2 s at 1/s)...
            #expect(try await [post(0), post(1), post(2)] == [201, 201, 429])
            // ...and the reads still have theirs; a wrong token spends none of it.
            #expect(try await read("/v1/partners/slow/members/M1/balance", "token-wrong").status.code == 401)
            let first = try await read("/v1/partners/slow/members/M1/balance")
            #expect(first.status == .ok && String(buffer: first.body) == #"{"member":"M1","balance":200}"#)
            #expect(try await read("/v1/partners/slow/statements").status == .ok)
            let over = try await read("/v1/partners/slow/members/M2/balance")
            #expect(over.status.code == 429 && over.headers[.retryAfter] == "1", "\(String(buffer: over.body))")
            #expect(String(buffer: over.body).contains("rate-limited"))
            // A second later, one more read (and, from their own bucket, one more posting).
            s.clock.advance(milliseconds: 1000)
            #expect(try await read("/v1/partners/slow/members/M1/balance").status == .ok)
            #expect(try await read("/v1/partners/slow/members/M1/balance").status.code == 429)
            #expect(try await post(3) == 201)
            // A partner without a rate is not limited.
            for _ in 0..<5 { #expect(try await read("/v1/partners/fuel/members/M1/balance", "token-fuel").status == .ok) }
        }
    }

    @Test func balanceReadsNeedThePartnersCredentials() async throws {
        let s = try Server()
        try await s.test { client in
            _ = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "m", body: earn), body: ByteBuffer(string: earn))
            func get(_ path: String, _ token: String?) async throws -> TestResponse {
                var h = HTTPFields()
                if let token { h[.authorization] = "Bearer \(token)" }
                return try await client.execute(uri: path, method: .get, headers: h)
            }
            let ok = try await get("/v1/partners/fuel/members/M1/balance", "token-fuel")
            #expect(ok.status == .ok && String(buffer: ok.body) == #"{"member":"M1","balance":100}"#)
            let never = try await get("/v1/partners/fuel/members/NEVER/balance", "token-fuel")
            #expect(String(buffer: never.body) == #"{"member":"NEVER","balance":0}"#)
            #expect(try await get("/v1/partners/fuel/members/M1/balance", "token-cinema").status.code == 403)
            #expect(try await get("/v1/partners/fuel/members/M1/balance", "token-wrong").status.code == 401)
            let none = try await get("/v1/partners/fuel/members/M1/balance", nil)
            #expect(none.status.code == 401 && problemType(none) == "urn:clearhouse:problem:unauthorized")
            #expect(try await get("/v1/partners/fuel/members/M%201/balance", "token-fuel").status.code == 400)
            // Percent-encoded segments are the ids they encode (RFC 3986 §6.2.2.2), partner too.
            let encoded = try await get("/v1/partners/f%75el/members/%4D1/balance", "token-fuel")
            #expect(String(buffer: encoded.body) == #"{"member":"M1","balance":100}"#)
            let dots = try await get("/v1/partners/fuel/members/%2E%2E/balance", "token-fuel")
            #expect(String(buffer: dots.body) == #"{"member":"..","balance":0}"#, "`..` is a member id; encoded, no client normalises it away")
            for refused in ["M%2F1", "M%001", "%ff"] {
                #expect(try await get("/v1/partners/fuel/members/\(refused)/balance", "token-fuel").status.code == 400, "\(refused)")
            }
            #expect(try await get("/v1/partners/nobody/members/M1/balance", "token-fuel").status.code == 404)
        }
    }

    /// A partner that requires its client certificate (these in-process requests present none):
    /// no credential at all, or a wrong one, is 401 with a challenge (CONTRACT §4); its own
    /// token without the certificate is 403 `wrong-partner` (§3: a required client certificate
    /// missing); another partner's token 403.
    @Test func aCertifiedPartnersReadWithoutItsCertificate() async throws {
        let s = try Server()
        try await s.test { client in
            func get(_ path: String, _ token: String?) async throws -> TestResponse {
                var h = HTTPFields()
                if let token { h[.authorization] = "Bearer \(token)" }
                return try await client.execute(uri: path, method: .get, headers: h)
            }
            for path in ["/v1/partners/secure/members/M1/balance", "/v1/partners/secure/statements"] {
                for token in [nil, "token-wrong"] {
                    let r = try await get(path, token)
                    #expect(r.status.code == 401 && problemType(r) == "urn:clearhouse:problem:unauthorized", "\(path) \(token ?? "none")")
                    #expect(r.headers[.wwwAuthenticate]?.hasPrefix("Bearer") == true)
                }
                let own = try await get(path, "token-secure")
                #expect(own.status.code == 403 && problemType(own) == "urn:clearhouse:problem:wrong-partner", "\(path)")
                #expect(String(buffer: own.body).contains("must use mutual TLS"))
                let other = try await get(path, "token-fuel")
                #expect(other.status.code == 403 && problemType(other) == "urn:clearhouse:problem:wrong-partner", "\(path)")
            }
        }
    }

    @Test func headersOverTheLimitAreRefused() async throws {
        let s = try Server()
        try await s.test { client in
            var h = s.headers(id: "hl", body: earn)
            h[HTTPField.Name("x-padding")!] = String(repeating: "p", count: Limits.requestHeaderBytesMax)
            let r = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: h, body: ByteBuffer(string: earn))
            #expect(r.status.code == 400 && problemType(r) == "urn:clearhouse:problem:malformed")
        }
        #expect(try s.store.ledgerEntries(fuel).isEmpty)
    }

    @Test func metricsInPrometheusTextFormat() async throws {
        let s = try Server()
        try await s.test { client in
            _ = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "m1", body: earn), body: ByteBuffer(string: earn))
            _ = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "m1", body: earn), body: ByteBuffer(string: earn))
            let m = try await client.execute(uri: "/metrics", method: .get)
            #expect(m.status == .ok && m.headers[.contentType]?.hasPrefix("text/plain") == true)
            let text = String(buffer: m.body)
            #expect(text.contains(#"clearhouse_postings_total{outcome="created"} 1"#), "\(text)")
            #expect(text.contains(#"clearhouse_postings_total{outcome="replayed"} 1"#))
            #expect(text.contains(#"clearhouse_http_requests_total{route="/v1/partners/{partner}/events",status="201"} 1"#) || text.contains("status=\"201\""), "\(text)")
            #expect(text.contains("clearhouse_http_request_duration_seconds_bucket"))
            #expect(text.contains("clearhouse_writer_queue_depth"))
            #expect(!text.contains("whsec_") && !text.contains("v1,"), "no secret or signature in metrics")
        }
    }

    @Test func operationalRoutesAndUnknownPaths() async throws {
        let s = try Server()
        try await s.test { client in
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
            let missing = try await client.execute(uri: "/v1/nothing", method: .get)
            #expect(missing.status.code == 404 && missing.headers[.contentType] == "application/problem+json")
            // A refusal repeats at most 128 bytes of the path (whole characters), however long it is.
            let long = "/v1/" + String(repeating: "é", count: 5_000)
            let far = try await client.execute(uri: long, method: .get)
            let detail = try #require((try JSONSerialization.jsonObject(with: Data(buffer: far.body)) as? [String: Any])?["detail"] as? String)
            #expect(far.status.code == 404 && detail.hasSuffix("é…") && detail.utf8.count <= "no such resource: ".utf8.count + 128 + 3, "\(detail)")
            // A served path with another method: 405, and `allow` names the methods served there.
            let put = try await client.execute(uri: "/v1/partners/fuel/events", method: .put)
            #expect(put.status.code == 405 && problemType(put) == "urn:clearhouse:problem:method-not-allowed", "\(String(buffer: put.body))")
            #expect(put.headers[.allow] == "POST")
            // Empty segments count for nothing, as in the router, which routes `POST …/events/`.
            for path in ["/v1/partners/fuel/events/", "//v1/partners//fuel/events"] {
                let get = try await client.execute(uri: path, method: .get)
                #expect(get.status.code == 405 && get.headers[.allow] == "POST", "\(path)")
            }
            let post = try await client.execute(uri: "/v1/partners/fuel/statements/R000001.csv", method: .post)
            #expect(post.status.code == 405 && post.headers[.allow] == "GET, HEAD")
            // HEAD on every GET route: the GET's status and headers, no body (RFC 9110 §9.3.2).
            let head = try await client.execute(uri: "/healthz", method: .head)
            #expect(head.status == .ok && head.body.readableBytes == 0 && head.headers[.contentType] == "application/json")
            var auth = HTTPFields()
            auth[.authorization] = "Bearer token-fuel"
            let balance = try await client.execute(uri: "/v1/partners/fuel/members/M1/balance", method: .head, headers: auth)
            #expect(balance.status == .ok && balance.body.readableBytes == 0)
            #expect(try await client.execute(uri: "/v1/partners/fuel/members/M1/balance", method: .head).status == .unauthorized)
            s.writer.shutdown()
            #expect(try await client.execute(uri: "/readyz", method: .get).status.code == 503)
            let late = try await client.execute(uri: "/v1/partners/fuel/events", method: .post, headers: s.headers(id: "late", body: earn), body: ByteBuffer(string: earn))
            #expect(late.status.code == 503 && late.headers[.retryAfter] != nil)
        }
    }
}

@Suite struct IntakeEdgeTests {
    func post(_ client: any TestClientProtocol, _ partner: String = "fuel", body: String = earn, headers: HTTPFields) async throws -> TestResponse {
        try await client.execute(uri: "/v1/partners/\(partner)/events", method: .post, headers: headers, body: ByteBuffer(string: body))
    }

    /// CONTRACT §3, 403: credentials of another partner. An event needs no bearer token, but
    /// one sent with another partner's token is refused; its own token, or one nobody owns,
    /// changes nothing (the signature authenticates).
    @Test func anotherPartnersBearerTokenOnAPostIsRefused() async throws {
        let s = try Server()
        try await s.test { client in
            var h = s.headers(id: "tok1", body: earn)
            h[.authorization] = "Bearer token-cinema"
            let refused = try await post(client, headers: h)
            #expect(refused.status.code == 403 && problemType(refused) == "urn:clearhouse:problem:wrong-partner", "\(String(buffer: refused.body))")
            h[.authorization] = "Bearer token-fuel"
            #expect(try await post(client, headers: h).status == .created)
            let other = earn.replacingOccurrences(of: "R-1", with: "R-2")
            var unknown = s.headers(id: "tok2", body: other)
            unknown[.authorization] = "Bearer nobody's"
            #expect(try await post(client, body: other, headers: unknown).status == .created)
        }
        #expect(try s.store.ledgerEntries(fuel).count == 2)
    }

    /// An authentic message whose timestamp is far off (milliseconds by mistake, negative, the
    /// extremes of Int64 and past them) is `stale-timestamp`; only what is not an integer (or
    /// an integer of more than `Limits.webhookTimestampDigitsMax` digits) is `bad-signature`.
    @Test func authenticMessagesWithFarOffTimestampsAreStale() async throws {
        let s = try Server()
        try await s.test { client in
            func signed(_ timestamp: String) -> HTTPFields {
                var h = s.headers(id: "ts", body: earn)
                h[HTTPField.Name("webhook-timestamp")!] = timestamp
                let mac = HMAC<SHA256>.authenticationCode(for: Array("ts.\(timestamp).\(earn)".utf8), using: SymmetricKey(data: secretA.bytes))
                h[HTTPField.Name("webhook-signature")!] = "v1," + Data(mac).base64EncodedString()
                return h
            }
            let far = ["99999999999999999999", "9223372036854775808", "-9223372036854775809", String(repeating: "9", count: Limits.webhookTimestampDigitsMax)]
            for stale in [String(s.nowSeconds * 1000), "-5", String(Int64.max), String(Int64.min), "0"] + far {
                let r = try await post(client, headers: signed(stale))
                #expect(r.status.code == 401 && problemType(r) == "urn:clearhouse:problem:stale-timestamp", "\(stale): \(String(buffer: r.body))")
            }
            for bad in ["1.5", "+5", "-", "1e9", " 5", String(repeating: "9", count: Limits.webhookTimestampDigitsMax + 1)] {
                let r = try await post(client, headers: signed(bad))
                #expect(r.status.code == 401 && problemType(r) == "urn:clearhouse:problem:bad-signature", "\(bad): \(String(buffer: r.body))")
            }
        }
        #expect(try s.store.ledgerEntries(fuel).isEmpty)
    }

    /// A header a request carries once, sent twice (a proxy or SDK repeating it), is named as
    /// such, not mistaken for a bad signature over the joined value; nothing is written.
    @Test func repeatedWebhookHeadersAndAuthorizationAreNamed() async throws {
        let s = try Server()
        try await s.test { client in
            for name in ["webhook-id", "webhook-timestamp"] {
                var h = s.headers(id: "twice", body: earn)
                let field = HTTPField.Name(name)!
                h.append(HTTPField(name: field, value: h[field]!))
                let r = try await post(client, headers: h)
                #expect(r.status.code == 400 && problemType(r) == "urn:clearhouse:problem:malformed", "\(String(buffer: r.body))")
                #expect(String(buffer: r.body).contains("\(name): sent 2 times"), "\(String(buffer: r.body))")
            }
            // A second authorization line cannot slip another partner's token past a post…
            var h = s.headers(id: "tok", body: earn)
            h.append(HTTPField(name: .authorization, value: "Bearer token-fuel"))
            h.append(HTTPField(name: .authorization, value: "Bearer token-cinema"))
            let refused = try await post(client, headers: h)
            #expect(refused.status.code == 403 && problemType(refused) == "urn:clearhouse:problem:wrong-partner", "\(String(buffer: refused.body))")
            // …and a read with two is told so.
            var auth = HTTPFields()
            auth.append(HTTPField(name: .authorization, value: "Bearer token-fuel"))
            auth.append(HTTPField(name: .authorization, value: "Bearer token-fuel"))
            let read = try await client.execute(uri: "/v1/partners/fuel/members/M1/balance", method: .get, headers: auth)
            #expect(read.status.code == 401 && String(buffer: read.body).contains("authorization: sent 2 times"), "\(String(buffer: read.body))")
        }
        #expect(try s.store.ledgerEntries(fuel).isEmpty)
    }

    /// JSON is UTF-8: a charset parameter may say so (any case, quoted or not), and any other
    /// charset is refused as the wrong media type.
    @Test func aCharsetOtherThanUTF8IsRefused() async throws {
        let s = try Server()
        try await s.test { client in
            for (i, type) in ["application/json; charset=latin-1", "application/json;charset=\"ISO-8859-1\""].enumerated() {
                let r = try await post(client, headers: s.headers(id: "cs\(i)", body: earn, contentType: type))
                #expect(r.status.code == 415 && problemType(r) == "urn:clearhouse:problem:unsupported-media-type", "\(type)")
            }
            for (i, type) in ["application/json; charset=UTF-8", "Application/JSON ; Charset=\"utf-8\""].enumerated() {
                let body = earn.replacingOccurrences(of: "R-1", with: "R-ok\(i)")
                let r = try await post(client, body: body, headers: s.headers(id: "ok\(i)", body: body, contentType: type))
                #expect(r.status == .created, "\(type): \(String(buffer: r.body))")
            }
        }
        #expect(try s.store.ledgerEntries(fuel).count == 2)
    }

    /// A body refused before it is read (over the limit by its length) closes the connection,
    /// and the answer says `connection: close`, so no client reuses it; a refusal after a body
    /// of a known, acceptable length was read keeps the connection.
    @Test func aBodyRefusedUnreadSaysTheConnectionCloses() async throws {
        let s = try Server()
        try await s.test { client in
            let over = String(repeating: " ", count: Limits.eventBodyBytesMax + 1)
            let tooLarge = try await post(client, body: over, headers: s.headers(id: "big", body: over))
            #expect(tooLarge.status.code == 413 && tooLarge.headers[.connection] == "close")
            #expect(problemType(tooLarge) == "urn:clearhouse:problem:too-large")
            let plain = try await post(client, headers: s.headers(id: "ct", body: earn, contentType: "text/plain"))
            #expect(plain.status.code == 415 && plain.headers[.connection] == nil)
        }
    }
}

@Suite struct OpenAPITests {
    /// The document describes exactly the routes the server registers.
    @Test func documentAndRoutesAgree() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/openapi.yaml")
        let lines = try String(contentsOf: url, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
        var documented: Set<String> = []
        var inPaths = false
        var path: String?
        for line in lines {
            if line == "paths:" { inPaths = true; continue }
            if inPaths, !line.isEmpty, !line.hasPrefix(" ") { break }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), line.hasSuffix(":"), !line.hasPrefix("   ") {
                path = String(line.dropFirst(2).dropLast())
            } else if let p = path, line.hasPrefix("    "), !line.hasPrefix("     "),
                let m = ["get", "post", "put", "delete", "patch"].first(where: { line == "    \($0):" })
            {
                documented.insert("\(m.uppercased()) \(p)")
            }
        }
        // `:name` segments are `{name}` in OpenAPI; `{run}.csv` is written the same in both.
        let served = Set(Intake.routes.map { route in
            "\(route.method) " + route.path.split(separator: "/", omittingEmptySubsequences: false)
                .map { $0.hasPrefix(":") ? "{\($0.dropFirst())}" : String($0) }.joined(separator: "/")
        })
        #expect(documented == served, "documented only: \(documented.subtracting(served)); served only: \(served.subtracting(documented))")
        #expect(served.count == 9)
    }
}
