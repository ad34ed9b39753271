@testable import ClearingDomain
import Foundation
import Testing

/// `FastEventParser` may only be faster than the strict path, never different: every event it
/// accepts, the strict path accepts equal, and whatever it leaves alone gets the strict path's
/// answer, error and all.
@Suite struct FastEventParserTests {
    /// SplitMix64: seeded, so a failure names a body that fails again.
    struct Seeded {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
        mutating func coin() -> Bool { below(2) == 0 }
    }

    /// A valid body in the plainest form, fields in a random order, random whitespace.
    static func plainBody(_ r: inout Seeded) -> String {
        let kind = EventKind.allCases[r.below(4)]
        let space = ["", "", " ", "\n  ", "\t", "\r\n"]
        func ws(_ r: inout Seeded) -> String { space[r.below(space.count)] }
        var fields = [
            #""member":"M-\#(r.below(100_000))""#,
            #""points":\#(1 + r.below(1_000_000_000))"#,
            #""reference":"ref:\#(r.next() % 1_000_000)/a.b_c""#,
        ]
        if kind.isReversal { fields.append(#""original_reference":"R-\#(r.below(1000))""#) }
        if r.coin() { fields.append(#""occurred_at":"2026-11-\#(10 + r.below(20))T10:00:0\#(r.below(10)).\#(r.below(1000))+01:00""#) }
        if r.coin() { fields.append(#""amount_minor":\#(r.below(3) == 0 ? 0 : r.below(10_000_000))"#) }
        for i in fields.indices.reversed() { fields.swapAt(i, r.below(i + 1)) }
        let data = "{" + fields.map { ws(&r) + $0.replacingOccurrences(of: ":", with: ws(&r) + ":" + ws(&r), options: [], range: $0.range(of: ":")) + ws(&r) }.joined(separator: ",") + "}"
        let top = [#""type":"\#(kind.typeName)""#, #""data":"# + ws(&r) + data]
        let ordered = r.coin() ? top : top.reversed()
        return ws(&r) + "{" + ordered.map { ws(&r) + $0 + ws(&r) }.joined(separator: ",") + "}" + ws(&r)
    }

    static func strict(_ bytes: [UInt8]) -> Result<Event, Problem> {
        do throws(Problem) { return .success(try EventParser.parseStrictly(bytes)) } catch { return .failure(error) }
    }

    static func parsed(_ bytes: [UInt8]) -> Result<Event, Problem> {
        do throws(Problem) { return .success(try EventParser.parse(bytes)) } catch { return .failure(error) }
    }

    @Test func plainBodiesTakeTheFastPathAndTheStrictPathAgrees() throws {
        var r = Seeded(state: 20_261_130)
        for _ in 0..<5_000 {
            let body = Array(Self.plainBody(&r).utf8)
            let fast = try #require(FastEventParser.parse(body), "left to the strict path: \(String(decoding: body, as: UTF8.self))")
            #expect(Self.strict(body) == .success(fast), "\(String(decoding: body, as: UTF8.self))")
            #expect(try EventParser.parseStrictly(Array(fast.jsonBody.utf8)) == fast)
        }
    }

    /// Random edits of valid bodies (bytes removed, replaced, inserted; JSON's own characters
    /// most often): whatever the fast path accepts, the strict path accepts equal, and the
    /// answer `parse` gives is the strict path's.
    @Test func editedBodiesGetTheStrictPathsAnswer() {
        var r = Seeded(state: 7)
        let alphabet = Array(#"{}[]:,"\ .-+eE0123456789nultrfasM"#.utf8) + [0x00, 0x09, 0x0A, 0x0B, 0x0C, 0x7F, 0xC3, 0xFF]
        var fastAccepted = 0, strictOnly = 0
        for _ in 0..<20_000 {
            var body = Array(Self.plainBody(&r).utf8)
            for _ in 0...r.below(3) {
                let at = r.below(body.count)
                switch r.below(3) {
                case 0: body.remove(at: at)
                case 1: body[at] = alphabet[r.below(alphabet.count)]
                default: body.insert(alphabet[r.below(alphabet.count)], at: at)
                }
            }
            let strict = Self.strict(body)
            if let fast = FastEventParser.parse(body) {
                fastAccepted += 1
                #expect(strict == .success(fast), "fast accepted what strict answers differently: \(String(decoding: body, as: UTF8.self))")
            } else if case .success = strict {
                strictOnly += 1
            }
            #expect(Self.parsed(body) == strict, "\(String(decoding: body, as: UTF8.self))")
        }
        // Edits that leave the body plain were accepted by the fast path (whitespace, a digit
        // of a number or an id); the few that leave it valid but not plain, by the strict path.
        #expect(fastAccepted > 1_000 && strictOnly >= 1, "fast \(fastAccepted), strict only \(strictOnly)")
    }

    /// Each of these is valid or refused by the strict path; the fast path leaves every one to it.
    @Test(arguments: [
        #"{"type":"points.earned","data":{"member":"M\u0031","points":5,"reference":"R-1"}}"#,  // an escape
        #"{"type":"points.earned","data":{"member":"M1","points":05,"reference":"R-1"}}"#,  // a leading zero
        #"{"type":"points.earned","data":{"member":"M1","points":-0,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5.0,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5e0,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":1234567890123456789,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"points":5,"reference":"R-1"}}"#,
        #"{"type":"points.earned","type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"},"data":{}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"},"data":{"amount_minor":7}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","amount_minor":7,"amount_minor":7}}"#,
        "{\"type\":\"points.earned\",\u{0B}\"data\":{\"member\":\"M1\",\"points\":5,\"reference\":\"R-1\"}}",  // vertical tab
        "{\"type\":\"points.earned\",\"data\":{\"member\":\"M1\",\u{0C}\"points\":5,\"reference\":\"R-1\"}}",  // form feed
        "{\"type\":\"points.earned\",\"data\":{\"member\":\"M1\",\"points\":5,\"reference\":\"R-1\"}\u{A0}}",  // no-break space
        #"{"type":"points.earned","data":{"member":"M1","points":1000000001,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","amount_minor":10000000000001}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","note":"x"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","original_reference":"R-0"}}"#,
        #"{"type":"points.earn_reversed","data":{"member":"M1","points":5,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","amount_minor":null}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1",}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1"}} x"#,
        #"{"type":"points.earned","data":{"member":"Mé","points":5,"reference":"R-1"}}"#,
        "\u{FEFF}{\"type\":\"points.earned\",\"data\":{\"member\":\"M1\",\"points\":5,\"reference\":\"R-1\"}}",
        #"{"type":"points.earned","data":{"member":"M1","points":0,"reference":"R-1"}}"#,
        #"{"type":"points.gifted","data":{"member":"M1","points":5,"reference":"R-1"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","occurred_at":"yesterday"}}"#,
        #"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R 1"}}"#,
        #"{"data":{"member":"M1","points":5,"reference":"R-1"}}"#,
        "",
    ])
    func leavesEverythingElseToTheStrictPath(body: String) {
        let bytes = Array(body.utf8)
        #expect(FastEventParser.parse(bytes) == nil)
        #expect(Self.parsed(bytes) == Self.strict(bytes))
    }

    /// The largest values the rules take are taken by the fast path too.
    @Test func takesTheBoundsOfEachRange() throws {
        let body = #"{"type":"points.earned","data":{"member":"M1","points":1000000000,"reference":"R-1","amount_minor":10000000000000}}"#
        let fast = try #require(FastEventParser.parse(Array(body.utf8)))
        #expect(fast.points.value == Limits.pointsPerEventMax && fast.amountMinor?.value == Limits.amountMinorMax)
        #expect(Self.strict(Array(body.utf8)) == .success(fast))
        let least = #"{"type":"points.earned","data":{"member":"M1","points":1,"reference":"R-1","amount_minor":0}}"#
        #expect(FastEventParser.parse(Array(least.utf8))?.amountMinor?.value == 0)
    }

    /// Valid bodies not in the plainest form are still accepted, by the strict path.
    @Test func validBodiesNotPlainAreAcceptedByTheStrictPath() throws {
        let escaped = Array(#"{"type":"points.earned","data":{"member":"M\u0031","points":5,"reference":"R-1"}}"#.utf8)
        #expect(FastEventParser.parse(escaped) == nil)
        #expect(try EventParser.parse(escaped).member.rawValue == "M1")
        let zeroAmount = Array(#"{"type":"points.earned","data":{"member":"M1","points":5,"reference":"R-1","amount_minor":-0}}"#.utf8)
        #expect(FastEventParser.parse(zeroAmount) == nil)
        #expect(try EventParser.parse(zeroAmount).amountMinor?.value == 0)
    }

    /// The body as `serve` holds it (a view of its buffer, which has contiguous storage) and as
    /// any other collection: the same answer.
    @Test func readsAnyCollectionOfBytes() {
        let body = #"{"type":"points.redeemed","data":{"member":"M1","points":40,"reference":"R-2"}}"#
        let fromArray = FastEventParser.parse(Array(body.utf8))
        #expect(fromArray?.points.value == 40)
        #expect(FastEventParser.parse(body.utf8) == fromArray)
        #expect(FastEventParser.parse(Array(body.utf8)[...]) == fromArray)
    }
}
