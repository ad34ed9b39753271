/// The common case of `EventParser.parse`, without Foundation's decoder: a body in the plainest
/// form of the wire format (an object with `type` and `data`, `data` with the keys its type
/// allows, each once; strings of printable ASCII without escapes; integers without sign,
/// fraction or exponent; JSON whitespace between tokens), whose fields are all valid.
///
/// It answers either the event the strict path would answer, or nil: anything else — any
/// other construct, a key unknown or repeated, a field missing or invalid — is left to the
/// strict path (`JSONShape` then the decoder), which accepts it or names the field and the
/// reason. So an error always comes from one place, and this path can only be faster, never
/// more lenient: a test and the fuzzer (`Fuzz/EventFuzz.swift`) check that every event it
/// accepts, the strict path accepts equal.
enum FastEventParser {
    static func parse(_ body: some Collection<UInt8>) -> Event? {
        // nil from `withContiguousStorageIfAvailable`: no contiguous storage (so a copy is read);
        // `.some(nil)`: read, and left to the strict path.
        if let answer = body.withContiguousStorageIfAvailable(parse(buffer:)) { return answer }
        return Array(body).withUnsafeBufferPointer(parse(buffer:))
    }

    /// The keys of `data` (a bit each, to see a repeated one).
    private enum DataKey: UInt8 {
        case member = 1, points = 2, reference = 4, originalReference = 8, occurredAt = 16, amountMinor = 32
    }

    private static func parse(buffer b: UnsafeBufferPointer<UInt8>) -> Event? {
        var c = Cursor(b: b)
        var typeName: Range<Int>?
        var seenData = false
        var seen: UInt8 = 0
        var member: Range<Int>?, reference: Range<Int>?, original: Range<Int>?, occurredAt: Range<Int>?
        var points: Int64?, amount: Int64?
        guard c.take(0x7B) else { return nil }  // {
        repeat {
            guard let key = c.string(), c.take(0x3A) else { return nil }  // "key":
            if c.equals(key, "type") {
                guard typeName == nil, let t = c.string() else { return nil }
                typeName = t
            } else if c.equals(key, "data") {
                guard !seenData, c.take(0x7B) else { return nil }
                seenData = true
                repeat {
                    guard let k = c.string(), c.take(0x3A) else { return nil }
                    let field: DataKey
                    switch k.count {
                    case 6 where c.equals(k, "member"): field = .member
                    case 6 where c.equals(k, "points"): field = .points
                    case 9 where c.equals(k, "reference"): field = .reference
                    case 18 where c.equals(k, "original_reference"): field = .originalReference
                    case 11 where c.equals(k, "occurred_at"): field = .occurredAt
                    case 12 where c.equals(k, "amount_minor"): field = .amountMinor
                    default: return nil
                    }
                    guard seen & field.rawValue == 0 else { return nil }
                    seen |= field.rawValue
                    // A value of another type (null, a number for a string, ...) is left to the
                    // strict path, which names it. After an integer, the next `take` (a comma or
                    // the closing brace) fails on a fraction, an exponent or a 19th digit.
                    switch field {
                    case .member: guard let v = c.string() else { return nil }; member = v
                    case .reference: guard let v = c.string() else { return nil }; reference = v
                    case .originalReference: guard let v = c.string() else { return nil }; original = v
                    case .occurredAt: guard let v = c.string() else { return nil }; occurredAt = v
                    case .points: guard let v = c.integer() else { return nil }; points = v
                    case .amountMinor: guard let v = c.integer() else { return nil }; amount = v
                    }
                } while c.take(0x2C)  // ,
                guard c.take(0x7D) else { return nil }  // }
            } else {
                return nil
            }
        } while c.take(0x2C)
        guard c.take(0x7D), c.atEnd() else { return nil }

        // The fields, by the strict path's own rules (`EventParser.Fields`); a field missing,
        // one its kind does not take, or one that breaks a rule goes back to the strict path.
        typealias F = EventParser.Fields
        guard let typeName, let kind = try? F.kind(c.text(typeName)), kind.isReversal == (original != nil),
            let member, let memberID = try? F.member(c.text(member)),
            let points, let pointsValue = try? F.points(points),
            let reference, let ref = try? F.reference(c.text(reference), "reference")
        else { return nil }
        do throws(Problem) {
            return Event(
                kind: kind, member: memberID, points: pointsValue, reference: ref,
                originalReference: try original.map { (r) throws(Problem) in try F.reference(c.text(r), "original_reference") },
                occurredAt: try occurredAt.map { (t) throws(Problem) in try F.occurredAt(c.text(t)) },
                amountMinor: try amount.map { (a) throws(Problem) in try F.amount(a) })
        } catch {
            return nil
        }
    }

    private struct Cursor {
        let b: UnsafeBufferPointer<UInt8>
        var i = 0

        /// Whether only whitespace is left.
        mutating func atEnd() -> Bool {
            skipSpace()
            return i == b.count
        }

        /// JSON's whitespace (RFC 8259 §2): space, tab, line feed, carriage return.
        mutating func skipSpace() {
            while i < b.count, b[i] == 0x20 || b[i] == 0x09 || b[i] == 0x0A || b[i] == 0x0D { i += 1 }
        }

        mutating func take(_ byte: UInt8) -> Bool {
            skipSpace()
            guard i < b.count, b[i] == byte else { return false }
            i += 1
            return true
        }

        /// A string of printable ASCII without escapes: the range of its content.
        mutating func string() -> Range<Int>? {
            guard take(0x22) else { return nil }
            let start = i
            while i < b.count {
                let byte = b[i]
                if byte == 0x22 {
                    i += 1
                    return start..<(i - 1)
                }
                guard byte >= 0x20, byte < 0x7F, byte != 0x5C else { return nil }
                i += 1
            }
            return nil
        }

        /// An integer of at most 18 digits, without sign or leading zero; what follows is
        /// checked by the caller's next `take` (a fraction, an exponent or a further digit
        /// after a 0 then fails it).
        mutating func integer() -> Int64? {
            skipSpace()
            let start = i
            var value: Int64 = 0
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39, i - start < 18 {
                value = value * 10 + Int64(b[i] - 0x30)
                i += 1
            }
            guard i > start, b[start] != 0x30 || i - start == 1 else { return nil }
            return value
        }

        func equals(_ r: Range<Int>, _ literal: StaticString) -> Bool {
            guard r.count == literal.utf8CodeUnitCount else { return false }
            let p = literal.utf8Start
            for k in 0..<r.count where b[r.lowerBound + k] != p[k] { return false }
            return true
        }

        func text(_ r: Range<Int>) -> String {
            String(decoding: UnsafeBufferPointer(rebasing: b[r]), as: UTF8.self)
        }
    }
}
