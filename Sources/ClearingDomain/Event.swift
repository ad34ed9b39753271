import Foundation

/// The four transactions a partner submits (CONTRACT §3).
public enum EventKind: Int, Sendable, CaseIterable {
    case earned = 1
    case redeemed = 2
    case earnReversed = 3
    case redemptionReversed = 4

    public var typeName: String {
        switch self {
        case .earned: "points.earned"
        case .redeemed: "points.redeemed"
        case .earnReversed: "points.earn_reversed"
        case .redemptionReversed: "points.redemption_reversed"
        }
    }

    public init?(typeName: String) {
        guard let k = EventKind.allCases.first(where: { $0.typeName == typeName }) else { return nil }
        self = k
    }

    public var isReversal: Bool { self == .earnReversed || self == .redemptionReversed }

    /// The kind a reversal's original must have.
    public var originalKind: EventKind? {
        switch self {
        case .earnReversed: .earned
        case .redemptionReversed: .redeemed
        case .earned, .redeemed: nil
        }
    }
}

/// One validated event body. Equality is the contract's "same content".
public struct Event: Equatable, Sendable {
    public var kind: EventKind
    public var member: MemberID
    public var points: Points
    public var reference: Reference
    public var originalReference: Reference?
    public var occurredAt: Instant?
    public var amountMinor: MoneyMinor?

    public init(
        kind: EventKind, member: MemberID, points: Points, reference: Reference,
        originalReference: Reference? = nil, occurredAt: Instant? = nil, amountMinor: MoneyMinor? = nil
    ) {
        precondition(kind.isReversal == (originalReference != nil), "a reversal, and only a reversal, names its original")
        precondition(points.value >= Limits.pointsPerEventMin && points.value <= Limits.pointsPerEventMax)
        self.kind = kind
        self.member = member
        self.points = points
        self.reference = reference
        self.originalReference = originalReference
        self.occurredAt = occurredAt
        self.amountMinor = amountMinor
    }

    /// The event as a JSON body, in the contract's wire format.
    public var jsonBody: String {
        var data = JSONWriter()
        data.string("member", member.rawValue)
        data.int("points", points.value)
        data.string("reference", reference.rawValue)
        if let o = originalReference { data.string("original_reference", o.rawValue) }
        if let t = occurredAt { data.string("occurred_at", t.rfc3339) }
        if let a = amountMinor { data.int("amount_minor", a.value) }
        var top = JSONWriter()
        top.string("type", kind.typeName)
        top.raw("data", data.finish())
        return top.finish()
    }
}

// MARK: - Strict parsing

/// Parses an event body strictly: a JSON object with exactly `type` and `data`; `data` with
/// exactly the keys its type allows; every id, number and instant validated. Every failure is
/// a `malformed` problem whose detail names the field and the reason.
public enum EventParser {
    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    private struct Body: Decodable {
        let event: Event

        init(from decoder: any Decoder) throws {
            let top = try decoder.container(keyedBy: Key.self)
            try EventParser.onlyKeys(top, ["type", "data"], at: "")
            let kind = try Fields.kind(try EventParser.string(top, "type", at: ""))
            guard top.contains(Key("data")) else { throw Problem(.malformed, "data: missing") }
            let data: KeyedDecodingContainer<Key>
            do { data = try top.nestedContainer(keyedBy: Key.self, forKey: Key("data")) } catch {
                throw Problem(.malformed, "data: expected an object")
            }
            try EventParser.onlyKeys(data, Fields.dataKeys(kind), at: "data.")

            let member = try Fields.member(try EventParser.string(data, "member", at: "data."))
            let points = try Fields.points(try EventParser.int(data, "points", at: "data.", range: Fields.pointsRange))
            let reference = try Fields.reference(try EventParser.string(data, "reference", at: "data."), "reference")
            var original: Reference?
            if kind.isReversal {
                original = try Fields.reference(try EventParser.string(data, "original_reference", at: "data."), "original_reference")
            }
            var occurredAt: Instant?
            if data.contains(Key("occurred_at")) {
                occurredAt = try Fields.occurredAt(try EventParser.string(data, "occurred_at", at: "data."))
            }
            var amount: MoneyMinor?
            if data.contains(Key("amount_minor")) {
                amount = try Fields.amount(try EventParser.int(data, "amount_minor", at: "data.", range: Fields.amountRange))
            }
            event = Event(
                kind: kind, member: member, points: points, reference: reference,
                originalReference: original, occurredAt: occurredAt, amountMinor: amount)
        }
    }

    /// Refuses a key not in `allowed`: of several, the first in sorted order, so that a body
    /// always gets the same answer (the decoder's `allKeys` come in a dictionary's order,
    /// which differs from one dictionary to the next).
    private static func onlyKeys(_ c: KeyedDecodingContainer<Key>, _ allowed: Set<String>, at path: String) throws {
        if let unknown = c.allKeys.map(\.stringValue).filter({ !allowed.contains($0) }).min() {
            throw Problem(.malformed, "\(path)\(unknown): unknown key")
        }
    }

    private static func string(_ c: KeyedDecodingContainer<Key>, _ key: String, at path: String) throws -> String {
        guard c.contains(Key(key)) else { throw Problem(.malformed, "\(path)\(key): missing") }
        do { return try c.decode(String.self, forKey: Key(key)) } catch DecodingError.typeMismatch {
            throw Problem(.malformed, "\(path)\(key): expected a string")
        } catch DecodingError.valueNotFound {
            throw Problem(.malformed, "\(path)\(key): expected a string, not null")
        } catch {
            // A string, but one that is not text: an escape such as a lone surrogate (\ud800).
            throw Problem(.malformed, "\(path)\(key): not a valid string (an escape that is no Unicode character, such as a lone surrogate)")
        }
    }

    private static func int(
        _ c: KeyedDecodingContainer<Key>, _ key: String, at path: String, range: ClosedRange<Int64>
    ) throws -> Int64 {
        guard c.contains(Key(key)) else { throw Problem(.malformed, "\(path)\(key): missing") }
        let v: Int64
        do { v = try c.decode(Int64.self, forKey: Key(key)) } catch DecodingError.valueNotFound {
            throw Problem(.malformed, "\(path)\(key): expected an integer between \(range.lowerBound) and \(range.upperBound), not null")
        } catch {
            throw Problem(.malformed, "\(path)\(key): expected an integer between \(range.lowerBound) and \(range.upperBound)")
        }
        return v  // its range is the field's rule (`Fields`), checked by the caller
    }

    /// Each field's rules, shared by the strict path and `FastEventParser` (which asks only
    /// whether a value passes), so that the two cannot come to differ on what is valid.
    enum Fields {
        static let pointsRange = Limits.pointsPerEventMin...Limits.pointsPerEventMax
        static let amountRange = 0...Limits.amountMinorMax

        static func kind(_ typeName: String) throws(Problem) -> EventKind {
            guard let kind = EventKind(typeName: typeName) else {
                throw Problem(.malformed, "type: unknown event type \(JSONWriter.quote(typeName))")
            }
            return kind
        }

        /// The keys `data` may hold for an event of this kind.
        static func dataKeys(_ kind: EventKind) -> Set<String> {
            kind.isReversal ? keysOfReversals : keysOfOthers
        }
        private static let keysOfOthers: Set<String> = ["member", "points", "reference", "occurred_at", "amount_minor"]
        private static let keysOfReversals = keysOfOthers.union(["original_reference"])

        static func member(_ text: String) throws(Problem) -> MemberID {
            guard let member = MemberID(text) else { throw Problem(.malformed, "data.member: must match ^[A-Za-z0-9._-]{1,64}$") }
            return member
        }

        static func inRange(_ v: Int64, _ field: String, _ range: ClosedRange<Int64>) throws(Problem) -> Int64 {
            guard range.contains(v) else {
                throw Problem(.malformed, "\(field): \(v) is outside \(range.lowerBound)...\(range.upperBound)")
            }
            return v
        }

        static func points(_ v: Int64) throws(Problem) -> Points { Points(try inRange(v, "data.points", pointsRange)) }

        static func amount(_ v: Int64) throws(Problem) -> MoneyMinor { MoneyMinor(try inRange(v, "data.amount_minor", amountRange)) }

        /// `reference` or `original_reference`.
        static func reference(_ text: String, _ key: String) throws(Problem) -> Reference {
            guard let r = Reference(text) else { throw Problem(.malformed, "data.\(key): must be 1-128 characters of [A-Za-z0-9._:/-]") }
            return r
        }

        static func occurredAt(_ text: String) throws(Problem) -> Instant {
            guard let i = Instant(rfc3339: text) else { throw Problem(.malformed, "data.occurred_at: must be an RFC 3339 date-time") }
            return i
        }
    }

    /// Parses a raw body. Throws `Problem` (`malformed` or `too-large`) and nothing else.
    public static func parse(_ body: some Collection<UInt8>) throws(Problem) -> Event {
        guard body.count <= Limits.eventBodyBytesMax else {
            // A caller may hand over only the first bytes past the limit (`post` reads no more).
            throw Problem(.tooLarge, "the body is more than \(Limits.eventBodyBytesMax) bytes, the most accepted")
        }
        // The plainest well-formed bodies, which are nearly all of them, without the decoder.
        if let event = FastEventParser.parse(body) { return event }
        return try parseStrictly(body)
    }

    /// Every body within the limit: the strict shape check, then Foundation's decoder, each
    /// field checked and every failure named. (`FastEventParser` answers the plainest bodies
    /// the same way, and leaves everything else here.)
    static func parseStrictly(_ body: some Collection<UInt8>) throws(Problem) -> Event {
        try JSONShape.check(body)
        do {
            return try JSONDecoder().decode(Body.self, from: Data(body)).event
        } catch let p as Problem {
            throw p
        } catch DecodingError.dataCorrupted {
            throw Problem(.malformed, "body: not valid JSON")
        } catch {
            throw Problem(.malformed, "body: expected a JSON object with \"type\" and \"data\"")
        }
    }
}
