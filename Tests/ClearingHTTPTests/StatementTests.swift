import ClearhouseTestSupport
import ClearingDomain
@testable import ClearingHTTP
import ClearingStore
import CompressNIO
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Testing

private func bearer(_ partner: PartnerID) -> HTTPFields { [.authorization: "Bearer token-\(partner)"] }

/// fuel and cinema trade for a day; the run is R000001.
private func tradedServer() throws -> Server {
    let s = try Server()
    func post(_ p: PartnerID, _ id: String, _ e: Event) { _ = s.store.post([Submission(partner: p, webhookID: WebhookID(id)!, event: e)]) }
    for i in 1...30 { post(fuel, "f\(i)", Fixtures.earn("M\(i % 4)", Int64(100 + i), "F-\(i)")) }
    post(fuel, "fr", Fixtures.reverseEarn("M1", 31, "F-R1", of: "F-1"))
    for i in 1...12 { post(cinema, "c\(i)", Fixtures.redeem("M\(i % 4)", Int64(40 + i), "C-\(i)")) }
    post(cinema, "cr", Fixtures.reverseRedemption("M1", 5, "C-R1", of: "C-1"))
    s.clock.advance(milliseconds: 60_000)
    _ = try s.store.settle()
    return s
}

@Suite struct StatementTests {
    @Test func onlyThePartnerItselfReadsItsStatements() async throws {
        let s = try tradedServer()
        try await s.test { client in
            for path in ["/v1/partners/fuel/statements", "/v1/partners/fuel/statements/R000001.csv", "/v1/partners/fuel/statements/R000001.json"] {
                let none = try await client.execute(uri: path, method: .get)
                #expect(none.status == .unauthorized && problemType(none) == "urn:clearhouse:problem:unauthorized", "\(path)")
                let wrong = try await client.execute(uri: path, method: .get, headers: [.authorization: "Bearer nope"])
                #expect(wrong.status == .unauthorized, "\(path)")
                let other = try await client.execute(uri: path, method: .get, headers: bearer(cinema))
                #expect(other.status == .forbidden && problemType(other) == "urn:clearhouse:problem:wrong-partner", "\(path)")
                let own = try await client.execute(uri: path, method: .get, headers: bearer(fuel))
                #expect(own.status == .ok, "\(path)")
            }
            let unknownRun = try await client.execute(uri: "/v1/partners/fuel/statements/R000009.csv", method: .get, headers: bearer(fuel))
            #expect(unknownRun.status == .notFound && problemType(unknownRun) == "urn:clearhouse:problem:not-found")
            let traversal = try await client.execute(uri: "/v1/partners/fuel/statements/..%2F..%2Fetc.csv", method: .get, headers: bearer(fuel))
            #expect(traversal.status == .notFound)
            let list = try await client.execute(uri: "/v1/partners/fuel/statements", method: .get, headers: bearer(fuel))
            let items = try JSONSerialization.jsonObject(with: Data(buffer: list.body)) as! [[String: Any]]
            #expect(items.count == 1 && items[0]["run"] as? String == "R000001" && items[0]["net_minor"] as? Int == -(3465 - 31))  // Σ 101...130 − 31 points at 1000 per 1000
            // cinema's CSV holds cinema's entries only, fuel's only fuel's.
            let fuelCSV = String(buffer: try await client.execute(uri: "/v1/partners/fuel/statements/R000001.csv", method: .get, headers: bearer(fuel)).body)
            let cinemaCSV = String(buffer: try await client.execute(uri: "/v1/partners/cinema/statements/R000001.csv", method: .get, headers: bearer(cinema)).body)
            #expect(!fuelCSV.contains("C-") && !cinemaCSV.contains("F-"))
            #expect(fuelCSV.split(separator: "\n").count == 1 + 31 && cinemaCSV.split(separator: "\n").count == 1 + 13)
        }
    }

    /// A row changed in the partner's ledger file is never served: the statement is refused
    /// (503, nothing of it sent) and the log says which partner and sequence; another
    /// partner's statement is served.
    @Test func aStatementOfAnAlteredLedgerIsNotServed() async throws {
        let s = try tradedServer()
        let edit = try SQLiteTool.run(
            s.store.ledgerURL(fuel), "DROP TRIGGER entry_append_only_update; UPDATE entry SET points = points + 1 WHERE sequence = 7")
        #expect(edit.status == 0)
        try await s.test { client in
            for format in ["csv", "json"] {
                let r = try await client.execute(uri: "/v1/partners/fuel/statements/R000001.\(format)", method: .get, headers: bearer(fuel))
                #expect(r.status == .serviceUnavailable && problemType(r) == "urn:clearhouse:problem:unavailable", "\(format)")
                #expect(!String(buffer: r.body).contains("F-"), "no row of it is sent")
            }
            let other = try await client.execute(uri: "/v1/partners/cinema/statements/R000001.csv", method: .get, headers: bearer(cinema))
            #expect(other.status == .ok)
        }
    }

    /// A row changed after the statement's digest was remembered is not sent either: the
    /// download that streams from the remembered digest checks the rows and stops before
    /// the batch that holds it.
    @Test func aRowChangedAfterTheFirstDownloadIsNotSent() async throws {
        let s = try tradedServer()
        let ledger = s.store.ledgerURL(fuel)
        try await s.test { client in
            let first = try await client.execute(uri: "/v1/partners/fuel/statements/R000001.csv", method: .get, headers: bearer(fuel))
            #expect(first.status == .ok && String(buffer: first.body).contains(",F-7,"))
            let edit = try SQLiteTool.run(ledger, "DROP TRIGGER entry_append_only_update; UPDATE entry SET points = points + 1 WHERE sequence = 7")
            #expect(edit.status == 0)
            var sent = ""
            do {
                let again = try await client.execute(uri: "/v1/partners/fuel/statements/R000001.csv", method: .get, headers: bearer(fuel))
                sent = String(buffer: again.body)
            } catch {
                sent = ""  // the transfer was cut off: nothing of it reached the client
            }
            #expect(!sent.contains(",F-7,") && !sent.contains(",108,"), "the changed row was sent: \(sent)")
        }
    }

    /// HEAD answers what GET would, without a body: a streamed statement has no length to
    /// give, so no `content-length` (never 0); a list keeps its length; a refusal keeps its
    /// status. Over a real connection (NIO frames the streamed one as chunked with no body),
    /// the GET sent next on the same connection is read whole.
    @Test func headSaysWhatGetWouldWithoutABody() async throws {
        let s = try tradedServer()
        let app = Application(router: s.intake.router())
        try await app.test(.live) { client in
            let csvPath = "/v1/partners/fuel/statements/R000001.csv"
            let head = try await client.execute(uri: csvPath, method: .head, headers: bearer(fuel))
            #expect(head.status == .ok && head.body.readableBytes == 0)
            #expect(head.headers[.contentLength] == nil, "\(head.headers)")
            #expect(head.headers[.transferEncoding] == "chunked", "\(head.headers)")
            #expect(head.headers[.contentType] == "text/csv; charset=utf-8; header=present" && head.headers[.eTag] != nil)
            let get = try await client.execute(uri: csvPath, method: .get, headers: bearer(fuel))
            #expect(get.status == .ok && String(buffer: get.body).split(separator: "\n").count == 1 + 31)
            #expect(get.headers[.eTag] == head.headers[.eTag])
            let listHead = try await client.execute(uri: "/v1/partners/fuel/statements", method: .head, headers: bearer(fuel))
            let list = try await client.execute(uri: "/v1/partners/fuel/statements", method: .get, headers: bearer(fuel))
            #expect(listHead.body.readableBytes == 0 && listHead.headers[.contentLength] == String(list.body.readableBytes))
            let refused = try await client.execute(uri: csvPath, method: .head)
            #expect(refused.status == .unauthorized && refused.body.readableBytes == 0)
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
        }
    }

    @Test func theFiguresAreReproducibleFromTheCSVRows() async throws {
        let s = try tradedServer()
        try await s.test { client in
            for p in [fuel, cinema] {
                let csv = String(buffer: try await client.execute(uri: "/v1/partners/\(p)/statements/R000001.csv", method: .get, headers: bearer(p)).body)
                let json = try JSONSerialization.jsonObject(
                    with: Data(buffer: try await client.execute(uri: "/v1/partners/\(p)/statements/R000001.json", method: .get, headers: bearer(p)).body)
                ) as! [String: Any]
                let lines = csv.split(separator: "\n")
                #expect(lines[0] == "sequence,accepted_at,occurred_at,type,member,points,reference,original_reference,amount_minor")
                var issued: Int64 = 0, redeemed: Int64 = 0
                for line in lines.dropFirst() {
                    let f = line.split(separator: ",", omittingEmptySubsequences: false)
                    #expect(f.count == 9)
                    let points = Int64(f[5])!
                    switch f[3] {
                    case "points.earned": issued += points
                    case "points.earn_reversed": issued -= points
                    case "points.redeemed": redeemed += points
                    case "points.redemption_reversed": redeemed -= points
                    default: Issue.record("unknown type \(f[3])")
                    }
                }
                #expect(json["issued_points"] as? Int64 == issued && json["redeemed_points"] as? Int64 == redeemed)
                let payable = try Rounding.priceOf(Points(issued), per1000: MoneyMinor(json["issue_price_per_1000"] as! Int64)).value
                let receivable = try Rounding.priceOf(Points(redeemed), per1000: MoneyMinor(json["redeem_credit_per_1000"] as! Int64)).value
                #expect(json["payable_minor"] as? Int64 == payable && json["receivable_minor"] as? Int64 == receivable)
                #expect(json["net_minor"] as? Int64 == receivable - payable)
                #expect((json["entries"] as! [[String: Any]]).count == lines.count - 1 && json["entry_count"] as? Int == lines.count - 1)
                let flows = json["flows"] as! [[String: Any]]
                #expect(!flows.isEmpty && flows.allSatisfy { $0["issuer"] as? String == p.rawValue || $0["redeemer"] as? String == p.rawValue })
            }
        }
    }

    @Test func statementsAreSignedWithThePublishedKey() async throws {
        let s = try tradedServer()
        try await s.test { client in
            let keys = try await client.execute(uri: "/v1/keys", method: .get)
            #expect(keys.status == .ok)
            let jwk = (try JSONSerialization.jsonObject(with: Data(buffer: keys.body)) as! [String: Any])["keys"] as! [[String: Any]]
            #expect(jwk.count == 1 && jwk[0]["kty"] as? String == "OKP" && jwk[0]["crv"] as? String == "Ed25519")
            var x = (jwk[0]["x"] as! String).replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
            while x.count % 4 != 0 { x += "=" }
            let key = try Curve25519.Signing.PublicKey(rawRepresentation: Data(base64Encoded: x)!)
            for format in ["csv", "json"] {
                let r = try await client.execute(uri: "/v1/partners/fuel/statements/R000001.\(format)", method: .get, headers: bearer(fuel))
                let body = Data(buffer: r.body)
                let digest = Data(SHA256.hash(data: body))
                #expect(r.headers[HTTPField.Name("Content-Digest")!] == "sha-256=:\(digest.base64EncodedString()):")
                let header = try #require(r.headers[HTTPField.Name("Clearhouse-Signature")!])
                #expect(header.contains("keyid=\"\(jwk[0]["kid"] as! String)\""))
                let signature = Data(base64Encoded: String(header.split(separator: "signature=\"")[1].dropLast()))!
                let manifest = "clearhouse.statement.v1\nfuel\nR000001\n\(format)\n\(digest.base64EncodedString())"
                #expect(key.isValidSignature(signature, for: Data(manifest.utf8)))
                #expect(!key.isValidSignature(signature, for: Data(manifest.replacingOccurrences(of: "fuel", with: "cinema").utf8)))
            }
        }
    }

    @Test func runsNeverChangeSoETagsHoldAndGzipIsOffered() async throws {
        let s = try tradedServer()
        try await s.test { client in
            let path = "/v1/partners/fuel/statements/R000001.csv"
            let plain = try await client.execute(uri: path, method: .get, headers: bearer(fuel))
            let etag = try #require(plain.headers[.eTag])
            #expect(plain.headers[.cacheControl]?.contains("immutable") == true)
            var conditional = bearer(fuel)
            conditional[.ifNoneMatch] = etag
            let notModified = try await client.execute(uri: path, method: .get, headers: conditional)
            #expect(notModified.status == .notModified && notModified.body.readableBytes == 0)
            var gzip = bearer(fuel)
            gzip[.acceptEncoding] = "br;q=1.0, gzip;q=0.8"
            let zipped = try await client.execute(uri: path, method: .get, headers: gzip)
            #expect(zipped.headers[.contentEncoding] == "gzip")
            #expect(zipped.headers[.eTag] != etag, "another representation, another ETag")
            var body = zipped.body
            let unzipped = try body.decompress(with: .gzip)
            #expect(String(buffer: unzipped) == String(buffer: plain.body))
            #expect(zipped.headers[HTTPField.Name("Clearhouse-Signature")!] == plain.headers[HTTPField.Name("Clearhouse-Signature")!])
            #expect(zipped.headers[HTTPField.Name("Content-Digest")!] == nil, "a digest of the plain bytes would be wrong for gzip")
            var conditionalZip = gzip
            conditionalZip[.ifNoneMatch] = "\"other\", W/" + zipped.headers[.eTag]!
            #expect(try await client.execute(uri: path, method: .get, headers: conditionalZip).status == .notModified)
            var star = bearer(fuel)
            star[.acceptEncoding] = "*"
            #expect(try await client.execute(uri: path, method: .get, headers: star).headers[.contentEncoding] == "gzip")
            var refused = bearer(fuel)
            refused[.acceptEncoding] = "gzip;q=0"
            #expect(try await client.execute(uri: path, method: .get, headers: refused).headers[.contentEncoding] == nil)
        }
    }

    /// An explicit gzip entry outranks `*`, whichever comes first (RFC 9110 §12.5.3).
    @Test func gzipsOwnEntryOutranksTheWildcard() {
        #expect(Intake.acceptsGzip("*;q=0, gzip"))
        #expect(!Intake.acceptsGzip("gzip;q=0, *"))
        #expect(!Intake.acceptsGzip("*, gzip;q=0"))
        #expect(Intake.acceptsGzip("br, *;q=0.1"))
        #expect(!Intake.acceptsGzip("br, *;q=0"))
        #expect(!Intake.acceptsGzip("identity") && !Intake.acceptsGzip(nil))
    }

    @Test func eachRunsStatementHoldsExactlyThatRunsEntries() async throws {
        let s = try tradedServer()
        for i in 31...40 { _ = s.store.post([Submission(partner: fuel, webhookID: WebhookID("g\(i)")!, event: Fixtures.earn("M9", 7, "F-\(i)"))]) }
        s.clock.advance(milliseconds: 60_000)
        _ = try s.store.settle()
        try await s.test { client in
            let one = String(buffer: try await client.execute(uri: "/v1/partners/fuel/statements/R000001.csv", method: .get, headers: bearer(fuel)).body)
            let two = String(buffer: try await client.execute(uri: "/v1/partners/fuel/statements/R000002.csv", method: .get, headers: bearer(fuel)).body)
            let rows = (one.split(separator: "\n").dropFirst() + two.split(separator: "\n").dropFirst()).map { String($0.split(separator: ",")[0]) }
            #expect(rows == (1...41).map(String.init), "R000001 has sequences 1...31, R000002 32...41: together the whole ledger, once")
            #expect(two.split(separator: "\n").dropFirst().allSatisfy { $0.contains(",M9,7,") })
        }
    }

    @Test func aPartnerWithNothingInAnExistingRunGetsAnEmptyStatement() async throws {
        let s = try tradedServer()
        try await s.test { client in
            let r = try await client.execute(uri: "/v1/partners/slow/statements/R000001.csv", method: .get, headers: bearer(slow))
            #expect(r.status == .ok && String(buffer: r.body) == StatementFormat.csvHeader)
            let json = try await client.execute(uri: "/v1/partners/slow/statements/R000001.json", method: .get, headers: bearer(slow))
            let doc = try JSONSerialization.jsonObject(with: Data(buffer: json.body)) as! [String: Any]
            #expect(doc["entry_count"] as? Int == 0 && (doc["entries"] as? [Any])?.isEmpty == true && (doc["flows"] as? [Any])?.isEmpty == true)
            #expect(doc["net_minor"] as? Int == 0 && doc["issue_price_per_1000"] as? Int == 0, "nothing that today's terms could change")
            s.clock.advance(milliseconds: 1000)  // slow's reads: 1/s, a burst of 2
            let list = try await client.execute(uri: "/v1/partners/slow/statements", method: .get, headers: bearer(slow))
            #expect(String(buffer: list.body) == "[]")
        }
    }
}

/// Without `statement.key` in the certificate directory, `serve` makes one in the data
/// directory on its first start and keeps it: owner-only, and the same key on every start.
@Suite struct StatementKeyTests {
    @Test func aMissingKeyIsMadeOnceOwnerOnlyAndKept() throws {
        let dir = TemporaryDirectory("clearhouse-key")
        defer { dir.remove() }
        let file = dir.url.appendingPathComponent("statement.key")
        let (made, created) = try StatementSigner.loadOrCreate(file: file)
        #expect(created)
        let mode = try FileManager.default.attributesOfItem(atPath: file.path)[.posixPermissions] as? Int
        #expect(mode == 0o600)
        let (again, createdAgain) = try StatementSigner.loadOrCreate(file: file)
        #expect(!createdAgain && again.publicKey == made.publicKey && again.keyID == made.keyID)
        #expect(try StatementSigner(file: file).publicKey == made.publicKey)
        // A file that is there but not a key is an error, never replaced.
        try "not a key\n".write(to: file, atomically: false, encoding: .utf8)
        #expect(throws: (any Error).self) { try StatementSigner.loadOrCreate(file: file) }
        #expect(try String(contentsOf: file, encoding: .utf8) == "not a key\n")
    }

    /// Rotation: the old key's public half goes into `statement-retired.pub`, as `/v1/keys`
    /// served it (base64url without padding) or in plain base64; `/v1/keys` then lists both.
    @Test func retiredKeysAreReadAsV1KeysShowedThemOrInBase64() throws {
        let dir = TemporaryDirectory("clearhouse-key")
        defer { dir.remove() }
        let old = StatementSigner(key: Curve25519.Signing.PrivateKey()), older = StatementSigner(key: Curve25519.Signing.PrivateKey())
        let served = try #require(try JSONSerialization.jsonObject(with: Data(old.jwks.utf8)) as? [String: Any])
        let x = try #require((served["keys"] as? [[String: Any]])?.first?["x"] as? String)
        let retired = dir.url.appendingPathComponent("statement-retired.pub")
        try "# retired 2026-11\n\(x)\n\(Data(older.publicKey).base64EncodedString())\n".write(to: retired, atomically: true, encoding: .utf8)
        var current = StatementSigner(key: Curve25519.Signing.PrivateKey())
        try current.loadRetired(file: retired)
        #expect(current.retiredPublicKeys == [old.publicKey, older.publicKey])
        #expect(current.jwks.contains(old.keyID) && current.jwks.contains(older.keyID))
        try "not-a-key\n".write(to: retired, atomically: true, encoding: .utf8)
        #expect(throws: (any Error).self) { try current.loadRetired(file: retired) }
    }
}
