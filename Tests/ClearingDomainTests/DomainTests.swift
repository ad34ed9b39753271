import ClearingDomain
import Foundation
import Testing

@Suite struct IdentifierTests {
    @Test func partnerIDs() {
        #expect(PartnerID("fuelco") != nil)
        #expect(PartnerID("a1") != nil)
        #expect(PartnerID("9-lives") != nil)
        #expect(PartnerID("a") == nil, "one character is too short")
        #expect(PartnerID("-fuel") == nil)
        #expect(PartnerID("Fuel") == nil)
        #expect(PartnerID("coalition") == nil, "reserved")
        #expect(PartnerID(String(repeating: "a", count: 32)) != nil)
        #expect(PartnerID(String(repeating: "a", count: 33)) == nil)
        #expect(PartnerID("../etc") == nil)
    }

    @Test func memberReferenceWebhookIDs() {
        #expect(MemberID("M1.a_b-c") != nil)
        #expect(MemberID("") == nil)
        #expect(MemberID(String(repeating: "x", count: 64)) != nil)
        #expect(MemberID(String(repeating: "x", count: 65)) == nil)
        #expect(MemberID("M 1") == nil)
        #expect(MemberID("M/1") == nil)
        #expect(MemberID("Mé") == nil)
        #expect(Reference("R-1:2/3.4_5") != nil)
        #expect(Reference(String(repeating: "r", count: 128)) != nil)
        #expect(Reference(String(repeating: "r", count: 129)) == nil)
        #expect(Reference("R 1") == nil)
        #expect(WebhookID("msg_2a:b.c-d") != nil)
        #expect(WebhookID("msg/1") == nil, "slash is not in the webhook-id alphabet")
        #expect(WebhookID("") == nil)
    }
}

@Suite struct RoundingTests {
    func price(_ points: Int64, _ per1000: Int64) throws -> Int64 {
        try Rounding.priceOf(Points(points), per1000: MoneyMinor(per1000)).value
    }

    @Test func tiesGoToEven() throws {
        #expect(try price(1, 500) == 0)  // 0.5 -> 0
        #expect(try price(3, 500) == 2)  // 1.5 -> 2
        #expect(try price(5, 500) == 2)  // 2.5 -> 2
        #expect(try price(7, 500) == 4)  // 3.5 -> 4
        #expect(try price(-1, 500) == 0)  // -0.5 -> 0
        #expect(try price(-3, 500) == -2)  // -1.5 -> -2
        #expect(try price(-5, 500) == -2)  // -2.5 -> -2
    }

    @Test func nonTiesGoToNearest() throws {
        #expect(try price(1, 499) == 0)  // 0.499
        #expect(try price(1, 501) == 1)  // 0.501
        #expect(try price(-1, 501) == -1)
        #expect(try price(1234, 900) == 1111)  // 1110.6
        #expect(try price(1_000_000_000, 1000) == 1_000_000_000)
        #expect(try price(0, 1000) == 0)
    }

    /// Only a result that does not fit is an overflow: the product is exact in 128 bits
    /// (10 maximum earns at the highest price a partner may have: 10^10 × 10^9 / 1000 = 10^16).
    @Test func largeProductsWhoseResultFitsAreExact() throws {
        #expect(try price(10_000_000_000, 1_000_000_000) == 10_000_000_000_000_000)
        #expect(try price(Int64.max, 1000) == Int64.max)
        #expect(try price(-Int64.max, 1000) == -Int64.max)
        #expect(try price(27_670_116_110_564_326, 333) == 9_214_148_664_817_921)  // …920.558 -> …921 (Python's integers agree)
        #expect(try price(9_223_372_036_854_775, 1001) == 9_232_595_408_891_630)  // …629.775 -> …630
    }

    /// Netting efficiency of a run whose transfers × 10^6 passes Int64 (≈ 9.2·10^12 minor
    /// units) is computed, not refused.
    @Test func nettingEfficiencyOfAVeryLargeRun() throws {
        let terms = PartnerTerms(
            id: PartnerID("big")!, name: "big", issuePricePer1000: MoneyMinor(1_000_000_000), redeemCreditPer1000: MoneyMinor(1_000_000_000),
            webhookSecrets: [SecretBytes([1])], apiTokenSHA256: Array(repeating: 0, count: 32), noticeURL: "https://x", noticeSecret: SecretBytes([2]))
        let issuer = try PartnerFigures(partner: PartnerID("big")!, issued: Points(10_000_000_000), redeemed: Points(0), expired: .zero, terms: terms)
        let redeemer = try PartnerFigures(partner: PartnerID("big")!, issued: Points(0), redeemed: Points(5_000_000_000), expired: .zero, terms: terms)
        let totals = try RunTotals([issuer, redeemer])
        // gross 1.5·10^16, transfers 1.5·10^16: nothing netted.
        #expect(totals.grossMinor == MoneyMinor(15_000_000_000_000_000) && totals.nettingEfficiencyText == "0.000000")
        let both = try PartnerFigures(partner: PartnerID("big")!, issued: Points(10_000_000_000), redeemed: Points(5_000_000_000), expired: .zero, terms: terms)
        #expect(try RunTotals([both]).nettingEfficiencyText == "0.666667")  // 1 − 0.5/1.5
    }

    /// `settle --json` prints the efficiency computed exactly in integers, to 18 decimals
    /// (rounded half to even, trailing zeros dropped): it reads back as the double nearest the
    /// exact ratio; six decimals (0.666667) missed `1 - 1/3` by 3·10^-7.
    @Test(arguments: [
        // (payable, receivable, net) of one partner each; gross and net transfers follow.
        ([(100, 0), (0, 50)], "0.0"),  // nothing netted: gross 150, transfers 150
        ([(100, 25)], "0.4"),  // gross 125, transfers 75: 1 - 75/125
        ([(1, 2)], "0.666666666666666667"),  // gross 3, transfers 1
        ([(0, 3)], "0.0"),  // gross 3, transfers 3: nothing netted
        ([(5, 4)], "0.888888888888888889"),  // gross 9, transfers 1: the last digit rounded up
        ([(2_000_001, 1_999_999)], "0.9999995"),  // 2 cents move of 4,000,000
        ([(7, 7)], "1.0"),  // all netted
        ([(0, 0)], "0.0"),  // gross 0
    ] as [([(Int64, Int64)], String)])
    func nettingEfficiencyInJSONIsExactInIntegers(partners: [(Int64, Int64)], expected: String) throws {
        let figures = partners.enumerated().map { i, p in
            PartnerFigures(
                partner: PartnerID("p\(i)x")!, issuedPoints: .zero, redeemedPoints: .zero, expiredPoints: .zero,
                payableMinor: MoneyMinor(p.0), receivableMinor: MoneyMinor(p.1), netMinor: MoneyMinor(p.1 - p.0))
        }
        #expect(try RunTotals(figures).nettingEfficiencyJSON == expected)
    }

    @Test func overflowIsAnError() {
        #expect(throws: ArithmeticOverflow.self) { try price(Int64.max / 2, 3000) }
        #expect(throws: ArithmeticOverflow.self) { try price(Int64.max, 1001) }
        #expect(throws: ArithmeticOverflow.self) { try price(Int64.min + 1, 1001) }
        #expect(throws: ArithmeticOverflow.self) { try Points(Int64.max).adding(Points(1)) }
        #expect(throws: ArithmeticOverflow.self) { try MoneyMinor(Int64.min).negated() }
    }

    @Test func divisionMatchesExactRationalRounding() {
        // Against a brute-force definition over a range that includes every tie.
        for n in Int64(-5000)...5000 {
            let q = Rounding.divideRoundingHalfEven(n, by: 1000)
            let diff = n - q * 1000  // must be within [-500, 500], and ±500 only when q is even
            #expect(abs(diff) <= 500)
            if abs(diff) == 500 { #expect(q % 2 == 0) }
        }
    }
}

@Suite struct InstantTests {
    @Test func formatsWithMillisecondsAndZ() {
        let t = Instant(rfc3339: "2026-11-22T10:00:01.123Z")!
        #expect(t.rfc3339 == "2026-11-22T10:00:01.123Z")
        #expect(Instant(millisecondsSinceEpoch: 0).rfc3339 == "1970-01-01T00:00:00.000Z")
        #expect(Instant(millisecondsSinceEpoch: -1).rfc3339 == "1969-12-31T23:59:59.999Z")
        // HTTP's IMF-fixdate (RFC 9110 §5.6.7's own example), the epoch, and a day before it.
        #expect(Instant(millisecondsSinceEpoch: 784_111_777_999).httpDate == "Sun, 06 Nov 1994 08:49:37 GMT")
        #expect(Instant(millisecondsSinceEpoch: 0).httpDate == "Thu, 01 Jan 1970 00:00:00 GMT")
        #expect(Instant(millisecondsSinceEpoch: -1).httpDate == "Wed, 31 Dec 1969 23:59:59 GMT")
        #expect(Instant(millisecondsSinceEpoch: 1_796_083_200_000).httpDate == "Tue, 01 Dec 2026 00:00:00 GMT")
    }

    @Test func parsesOffsetsAndFractions() {
        #expect(Instant(rfc3339: "2026-11-22T11:00:00+01:00") == Instant(rfc3339: "2026-11-22T10:00:00Z"))
        #expect(Instant(rfc3339: "2026-11-22T10:00:00.5Z")!.millisecondsSinceEpoch % 1000 == 500)
        #expect(Instant(rfc3339: "2026-11-22T10:00:00.123456789Z")!.millisecondsSinceEpoch % 1000 == 123)
        #expect(Instant(rfc3339: "2024-02-29T00:00:00Z") != nil)
        // A fraction of any length (RFC 3339: "." 1*DIGIT), truncated to milliseconds.
        #expect(Instant(rfc3339: "2026-11-22T10:00:00." + String(repeating: "9", count: 40) + "+01:00")?.rfc3339 == "2026-11-22T09:00:00.999Z")
    }

    /// RFC 3339 allows second 60 (a leap second; its own examples, §5.8): read as the last
    /// millisecond of the UTC day it ends, in whatever offset it is written.
    @Test func readsALeapSecondAsTheLastMillisecondOfItsMinute() {
        #expect(Instant(rfc3339: "2016-12-31T23:59:60Z")?.rfc3339 == "2016-12-31T23:59:59.999Z")
        #expect(Instant(rfc3339: "1990-12-31T15:59:60-08:00")?.rfc3339 == "1990-12-31T23:59:59.999Z")
        #expect(Instant(rfc3339: "1990-12-31T23:59:60.5Z")?.rfc3339 == "1990-12-31T23:59:59.999Z")
        #expect(Instant(rfc3339: "1999-01-01T05:29:60+05:30")?.rfc3339 == "1998-12-31T23:59:59.999Z")  // India's offset
        #expect(Instant(rfc3339: "9999-12-31T23:59:60Z")?.rfc3339 == "9999-12-31T23:59:59.999Z")
        // Only where a leap second falls (23:59 in UTC); never beyond 60.
        for bad in ["2016-12-31T23:58:60Z", "2016-12-31T23:59:61Z", "2016-12-31T23:59:99Z", "2026-11-22T10:59:60Z",
                    "2026-11-22T10:59:60+00:30", "2016-12-31T23:59:60-23:59"] {
            #expect(Instant(rfc3339: bad) == nil, "\(bad)")
        }
    }

    @Test func refusesWhatIsNotRFC3339() {
        for bad in ["2026-11-22", "2026-11-22T10:00:00", "2025-02-29T00:00:00Z", "2026-13-01T00:00:00Z",
                    "2026-11-22T24:00:00Z", "2026-11-22T10:00:00.Z", "2026-11-22T10:00:00+0100", "2026-11-22T10:00:00Zjunk",
                    "yesterday",
                    // Whose offset carries them out of the years 0000-9999 (statements could not write them).
                    "0000-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59"] {
            #expect(Instant(rfc3339: bad) == nil, "\(bad)")
        }
        // The edges themselves, each written back as it was read.
        for edge in ["0000-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"] {
            #expect(Instant(rfc3339: edge)?.rfc3339 == edge)
        }
        #expect(Instant(rfc3339: "0000-01-01T00:59:00+00:59")?.rfc3339 == "0000-01-01T00:00:00.000Z")
    }
}

@Suite struct EventParserTests {
    /// Several unknown keys: always the same one named (the first in sorted order), however the
    /// decoder's dictionaries happen to order them (they differ from one to the next).
    @Test func ofSeveralUnknownKeysTheSameOneIsNamedEveryTime() {
        let body = Array(#"{"type":"points.redeemed","data":{"mermber":"M1","zeta":1,"ccurred_at":"x","points":5,"referentce":"R","alpha":2}}"#.utf8)
        let top = Array(#"{"zz":1,"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"},"aa":2}"#.utf8)
        for _ in 0..<200 {
            #expect(throws: Problem(.malformed, "data.alpha: unknown key")) { try EventParser.parse(body) }
            #expect(throws: Problem(.malformed, "aa: unknown key")) { try EventParser.parse(top) }
        }
    }

    func parse(_ s: String) throws -> Event { try EventParser.parse(Array(s.utf8)) }

    func slugAndDetail(_ s: String) -> (String, String)? {
        do { _ = try parse(s); return nil } catch let p as Problem { return (p.kind.rawValue, p.detail) } catch { return nil }
    }

    @Test func parsesTheFourKinds() throws {
        let e = try parse(#"{"type":"points.earned","data":{"member":"M1","points":100,"reference":"R-1","occurred_at":"2026-11-22T10:00:00Z","amount_minor":2599}}"#)
        #expect(e.kind == .earned && e.points.value == 100 && e.amountMinor?.value == 2599)
        #expect(e.occurredAt == Instant(rfc3339: "2026-11-22T10:00:00Z"))
        #expect(try parse(#"{"type":"points.redeemed","data":{"member":"M1","points":40,"reference":"R-2"}}"#).kind == .redeemed)
        let r = try parse(#"{"type":"points.earn_reversed","data":{"member":"M1","points":30,"reference":"R-3","original_reference":"R-1"}}"#)
        #expect(r.originalReference?.rawValue == "R-1")
        #expect(try parse(#"{"data":{"original_reference":"R-2","member":"M1","points":40,"reference":"R-4"},"type":"points.redemption_reversed"}"#).kind == .redemptionReversed)
    }

    @Test func roundTripsItsOwnBody() throws {
        let e = try parse(#"{"type":"points.earn_reversed","data":{"member":"M1","points":30,"reference":"R-3","original_reference":"R-1","occurred_at":"2026-11-22T10:00:00.250Z"}}"#)
        #expect(try parse(e.jsonBody) == e)
    }

    @Test(arguments: [
        (#"not json"#, "body"),
        (#"[1,2]"#, "body"),
        (#"{"type":"points.earned"}"#, "data"),
        (#"{"type":"points.gifted","data":{}}"#, "type"),
        (#"{"type":"points.earned","data":{"member":"M1","points":100,"reference":"R-1"},"extra":1}"#, "extra"),
        (#"{"type":"points.earned","data":{"member":"M1","points":100,"reference":"R-1","colour":"red"}}"#, "data.colour"),
        (#"{"type":"points.earned","data":{"member":"M1","points":100,"reference":"R-1","original_reference":"R-0"}}"#, "data.original_reference"),
        (#"{"type":"points.earned","data":{"points":100,"reference":"R-1"}}"#, "data.member"),
        (#"{"type":"points.earned","data":{"member":"M 1","points":100,"reference":"R-1"}}"#, "data.member"),
        (#"{"type":"points.earned","data":{"member":"M1","points":"100","reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","data":{"member":"M1","points":true,"reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","data":{"member":"M1","points":100.5,"reference":"R-1"}}"#, "body"),
        (#"{"type":"points.earned","data":{"member":"M1","points":0,"reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","data":{"member":"M1","points":1000000001,"reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","data":{"member":"M1","points":99999999999999999999999,"reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","data":{"member":"M1","points":-5,"reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R 1"}}"#, "data.reference"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","occurred_at":"monday"}}"#, "data.occurred_at"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","amount_minor":-1}}"#, "data.amount_minor"),
        (#"{"type":"points.earn_reversed","data":{"member":"M1","points":5,"reference":"R-2"}}"#, "data.original_reference"),
        (#"{"type":"points.earned","data":[]}"#, "data"),
        (#"{"type":5,"data":{}}"#, "type"),
        (#"{"type":"points.earned","data":{"member":"M1","points":100.0,"reference":"R-1"}}"#, "body"),
        (#"{"type":"points.earned","data":{"member":"M1","points":1e2,"reference":"R-1"}}"#, "body"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"points":500,"reference":"R-1"}}"#, "data.points"),
        (#"{"type":"points.earned","type":"points.redeemed","data":{"member":"M1","points":5,"reference":"R-1"}}"#, "type"),
        (#"{"type":"points.earned","extra":{"a":1,"a":2},"data":{"member":"M1","points":5,"reference":"R-1"}}"#, "extra.a: the key appears twice"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","x":[{"k":1,"k":2}]}}"#, "data.x.[].k: the key appears twice"),
        // A key is read as decoded: an escaped `points` beside a plain one is the same key twice.
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"\u0070oints":500,"reference":"R-1"}}"#, "data.points: the key appears twice"),
        (#"{"\u0074ype":"points.earned","type":"points.redeemed","data":{"member":"M1","points":5,"reference":"R-1"}}"#, "type: the key appears twice"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","\ud800":1}}"#, "body: an object key with an unpaired surrogate"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","\udc00\ud800":1}}"#, "body: an object key with an unpaired surrogate"),
        (String(repeating: "[", count: 30_000) + String(repeating: "]", count: 30_000), "body"),
        // Commas before a closing bracket (Foundation's decoder takes them).
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1",}}"#, "body"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"} ,\n}"#, "body"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","occurred_at":"9999-12-31T23:59:59-23:59"}}"#, "data.occurred_at"),
        ("{\"type\":\"points.earned\",\"data\":{\"member\":\"M1\",\"points\":5,\"reference\":\"R-1\"}}\u{0}", "body"),
        // A string that is not text (a lone surrogate) is said to be so, not "expected a string".
        (#"{"type":"points.earned","data":{"member":"\ud800","points":5,"reference":"R-1"}}"#, "data.member: not a valid string"),
        (#"{"type":"points.earned","data":{"member":5,"points":5,"reference":"R-1"}}"#, "data.member: expected a string"),
        (#"{"type":"points.earned","data":{"member":null,"points":5,"reference":"R-1"}}"#, "data.member: expected a string, not null"),
        (#"{"type":null,"data":{"member":"M1","points":5,"reference":"R-1"}}"#, "type: expected a string, not null"),
        (#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","occurred_at":null}}"#, "data.occurred_at: expected a string, not null"),
    ])
    func refusesMalformedBodiesNamingTheField(body: String, field: String) {
        let r = slugAndDetail(body)
        #expect(r?.0 == "malformed", "\(body)")
        #expect(r?.1.hasPrefix(field) == true, "\(body): \(r?.1 ?? "accepted")")
    }

    /// Escapes in keys are JSON (RFC 8259 §7): a key is the text it decodes to, so an escaped
    /// known key is that key, and an escaped unknown one is unknown.
    @Test func readsEscapedKeysAsTheKeysTheyEncode() throws {
        let plain = try EventParser.parse(Array(#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"}}"#.utf8))
        for body in [
            #"{"\u0074ype":"points.earned","data":{"member":"M1","\u0070oints":5,"reference":"R-1"}}"#,
            #"{"type":"points.earned","d\u0061t\u0061":{"\u006d\u0065\u006D\u0062\u0065\u0072":"M1","points":5,"reference":"R-1"}}"#,
        ] {
            #expect(try EventParser.parse(Array(body.utf8)) == plain, "\(body)")
        }
        let unknown = slugAndDetail(#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","\u00e9t\ud83d\ude00\n":1}}"#)
        #expect(unknown?.0 == "malformed" && unknown?.1.contains("data.ét😀") == true, "\(String(describing: unknown))")
    }

    /// JSON is UTF-8 (RFC 8259 §8.1). Foundation's decoder would also read UTF-16 and UTF-32,
    /// whose bytes the strict pre-check cannot see through (`1e1` would pass as 10).
    @Test func refusesBodiesNotInUTF8() throws {
        let text = #"{"type":"points.earned","data":{"member":"M1","points":1e1,"reference":"R-1"}}"#
        var encodings: [[UInt8]] = [
            Array(text.utf16).flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] },  // UTF-16 LE
            Array(text.utf16).flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] },  // UTF-16 BE
            Array(text.unicodeScalars).flatMap { [UInt8($0.value & 0xFF), 0, 0, 0] },  // UTF-32 LE
        ]
        encodings.append(Array(#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-"#.utf8) + [0xC3, 0x28] + Array(#""}}"#.utf8))
        for bytes in encodings {
            do {
                _ = try EventParser.parse(bytes)
                Issue.record("accepted \(bytes.prefix(8))")
            } catch {
                #expect(error.kind == .malformed && error.detail == "body: JSON must be UTF-8", "\(error.detail)")
            }
        }
        // The same event in UTF-8, the number an integer: accepted.
        #expect(try EventParser.parse(Array(text.replacingOccurrences(of: "1e1", with: "10").utf8)).points.value == 10)
    }

    @Test func refusesBodiesOver64KiB() {
        let big = #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","pad":""# + String(repeating: "x", count: 70_000) + "\"}}"
        do {
            _ = try EventParser.parse(Array(big.utf8))
            Issue.record("accepted an oversize body")
        } catch {
            #expect(error.kind == .tooLarge)
        }
    }
}

@Suite struct FIFOTests {
    let a = PartnerID("aa")!, b = PartnerID("bb")!
    let now = Instant(rfc3339: "2026-11-22T10:00:00Z")!

    @Test func takesOldestUnexpiredFirst() {
        let lots = [
            OpenLot(id: 3, issuer: b, remaining: Points(50), expiresAt: nil),
            OpenLot(id: 1, issuer: a, remaining: Points(30), expiresAt: Instant(rfc3339: "2026-11-22T10:00:00Z")),  // expired at now
            OpenLot(id: 2, issuer: a, remaining: Points(20), expiresAt: Instant(rfc3339: "2026-11-22T10:00:00.001Z")),
        ]
        #expect(FIFO.balance(lots, at: now) == Points(70))
        let t = FIFO.take(Points(60), from: lots, at: now)!
        #expect(t == [LotTake(lotID: 2, issuer: a, points: Points(20)), LotTake(lotID: 3, issuer: b, points: Points(40))])
        #expect(FIFO.take(Points(71), from: lots, at: now) == nil)
    }

    @Test func givesBackLastTakenFirst() {
        var takes = [LotTake(lotID: 1, issuer: a, points: Points(30)), LotTake(lotID: 2, issuer: b, points: Points(10))]
        let r = FIFO.giveBack(Points(15), to: takes)!
        #expect(r.map(\.lotID) == [2, 1] && r.map(\.points) == [Points(10), Points(5)])
        takes[1].returned = Points(10)
        takes[0].returned = Points(5)
        #expect(FIFO.reversible(takes) == Points(25))
        #expect(FIFO.giveBack(Points(26), to: takes) == nil)
        #expect(FIFO.giveBack(Points(25), to: takes)!.map(\.lotID) == [1])
    }
}

@Suite struct ProblemTests {
    @Test func documentHasTheContractShape() throws {
        let p = Problem(.insufficientPoints, "member M1 has 5")
        let obj = try JSONSerialization.jsonObject(with: Data(p.json.utf8)) as! [String: Any]
        #expect(obj["type"] as? String == "urn:clearhouse:problem:insufficient-points")
        #expect(obj["status"] as? Int == 422)
        #expect(obj["title"] as? String == "Insufficient points")
        #expect(obj["detail"] as? String == "member M1 has 5")
    }

    @Test func statusesFollowTheContractTable() {
        let expected: [Problem.Kind: Int] = [
            .malformed: 400, .badSignature: 401, .staleTimestamp: 401, .wrongPartner: 403, .unknownPartner: 404,
            .conflict: 409, .tooLarge: 413, .unsupportedMediaType: 415, .insufficientPoints: 422, .unknownOriginal: 422,
            .reversalExceedsOriginal: 422, .memberMismatch: 422, .rateLimited: 429, .unavailable: 503,
        ]
        for (k, s) in expected { #expect(k.status == s, "\(k)") }
    }

    @Test func jsonStringsAreEscaped() {
        #expect(JSONWriter.quote("a\"b\\c\n\u{01}") == #""a\"b\\c\n\u0001""#)
        #expect(JSONWriter.quote("Zürich € 12") == "\"Zürich € 12\"", "nothing to escape: copied whole")
        #expect(JSONWriter.quote("") == "\"\"")
    }
}

@Suite struct CanonicalEncodingTests {
    /// The bytes every ledger hash is taken over: fixed forever (ledgers already on disk are
    /// chained with them), so they are pinned here byte for byte.
    @Test func canonicalBytesArePinned() {
        let earn = Entry(
            journalID: 7, partner: PartnerID("fuelco")!, sequence: 3, webhookID: WebhookID("msg_1")!,
            acceptedAt: Instant(millisecondsSinceEpoch: 1_795_000_000_123),
            event: Event(
                kind: .earned, member: MemberID("M-1")!, points: Points(100), reference: Reference("R-1")!,
                originalReference: nil, occurredAt: Instant(millisecondsSinceEpoch: 1_794_999_999_000), amountMinor: MoneyMinor(2599)),
            memberBalance: Points(310))
        #expect(String(decoding: earn.canonicalBytes, as: UTF8.self) == """
            clearhouse.entry.v1
            partner=fuelco
            sequence=3
            journal_id=7
            webhook_id=msg_1
            accepted_at_ms=1795000000123
            type=points.earned
            member=M-1
            points=100
            reference=R-1
            original_reference=
            occurred_at_ms=1794999999000
            amount_minor=2599
            member_balance=310

            """)
        let reversal = Entry(
            journalID: 9, partner: PartnerID("fuelco")!, sequence: 4, webhookID: WebhookID("msg_2")!,
            acceptedAt: Instant(millisecondsSinceEpoch: -5),
            event: Event(
                kind: .earnReversed, member: MemberID("M-1")!, points: Points(30), reference: Reference("R-3")!,
                originalReference: Reference("R-1")!, occurredAt: nil, amountMinor: nil),
            memberBalance: Points(0))
        #expect(String(decoding: reversal.canonicalBytes, as: UTF8.self) == """
            clearhouse.entry.v1
            partner=fuelco
            sequence=4
            journal_id=9
            webhook_id=msg_2
            accepted_at_ms=-5
            type=points.earn_reversed
            member=M-1
            points=30
            reference=R-3
            original_reference=R-1
            occurred_at_ms=
            amount_minor=
            member_balance=0

            """)
    }

    /// Integers are written digit by digit in place (no string made): each must read exactly as
    /// Swift's `String(_:)` spells it, at every length and at both ends of Int64.
    @Test func integersAreSpelledAsDecimalStringsAre() {
        var values: [Int64] = [0, 1, -1, 9, 10, -10, 99, 100, Int64.max, Int64.min, Int64.max - 1, Int64.min + 1]
        var p: Int64 = 1
        for _ in 0..<18 { p *= 10; values += [p - 1, p, p + 1, -p, -(p - 1)] }
        for v in values {
            let e = Entry(
                journalID: v, partner: PartnerID("fuelco")!, sequence: v, webhookID: WebhookID("w")!,
                acceptedAt: Instant(millisecondsSinceEpoch: v),
                event: Event(kind: .earned, member: MemberID("m")!, points: Points(1), reference: Reference("r")!,
                             originalReference: nil, occurredAt: Instant(millisecondsSinceEpoch: v), amountMinor: MoneyMinor(v)),
                memberBalance: Points(v))
            let text = String(decoding: e.canonicalBytes, as: UTF8.self)
            for key in ["sequence", "journal_id", "accepted_at_ms", "occurred_at_ms", "amount_minor", "member_balance"] {
                #expect(text.contains("\n\(key)=\(v)\n"), "\(key) of \(v): \(text)")
            }
        }
    }
}
