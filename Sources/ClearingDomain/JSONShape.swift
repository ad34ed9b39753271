/// A strict, iterative pre-check of an event body, before Foundation's decoder sees it:
/// nesting at most `Limits.jsonDepthMax` deep (the decoder is recursive), no key twice in one
/// object (the decoder would silently keep one), keys compared as decoded (so `"\u0070oints"`
/// is `points`, and cannot pose as a second one; a key with an unpaired surrogate, which has
/// no UTF-8, is refused), and every number an integer literal (the decoder would turn
/// `100.0` or `1e2` into 100), UTF-8 only (the decoder would also take UTF-16 and UTF-32,
/// whose bytes this scan cannot read), and no comma before a closing bracket (the decoder
/// tolerates one). Other grammar errors are left to the decoder.
enum JSONShape {
    private enum Frame {
        case object(keys: Set<[UInt8]>, expectingKey: Bool)
        case array
    }

    static func check(_ body: some Collection<UInt8>) throws(Problem) {
        let b = Array(body)
        // RFC 8259 §8.1: UTF-8. A NUL byte is in no JSON text (in a string it must be escaped),
        // and in every UTF-16 or UTF-32 text of ASCII.
        guard !b.contains(0), String(validating: b, as: UTF8.self) != nil else {
            throw Problem(.malformed, "body: JSON must be UTF-8")
        }
        var stack: [Frame] = []
        // The keys leading to the innermost open object or array (`[]` for an array's element),
        // to name a repeated key as the parser names fields (`data.points`).
        var path: [String] = []
        var lastKey = ""
        func enter() {
            guard let parent = stack.last else { return }
            if case .array = parent { path.append("[]") } else { path.append(lastKey) }
        }
        var i = 0
        var previous: UInt8 = 0  // the last byte outside strings and whitespace
        while i < b.count {
            let c = b[i]
            defer { if c != 0x20 && c != 0x09 && c != 0x0A && c != 0x0D { previous = c } }
            switch c {
            case 0x7B:  // {
                guard stack.count < Limits.jsonDepthMax else { throw Problem(.malformed, "body: nested deeper than \(Limits.jsonDepthMax)") }
                enter()
                stack.append(.object(keys: [], expectingKey: true))
                i += 1
            case 0x5B:  // [
                guard stack.count < Limits.jsonDepthMax else { throw Problem(.malformed, "body: nested deeper than \(Limits.jsonDepthMax)") }
                enter()
                stack.append(.array)
                i += 1
            case 0x7D, 0x5D:  // } ]
                guard previous != 0x2C else { throw Problem(.malformed, "body: a comma before a closing bracket") }
                if !stack.isEmpty { stack.removeLast() }
                if !path.isEmpty && stack.count == path.count { path.removeLast() }
                i += 1
            case 0x2C:  // ,
                if case .object(let keys, _) = stack.last { stack[stack.count - 1] = .object(keys: keys, expectingKey: true) }
                i += 1
            case 0x22:  // "
                let start = i + 1
                var j = start
                var escaped = false
                while j < b.count, b[j] != 0x22 {
                    if b[j] == 0x5C { escaped = true; j += 1 }
                    j += 1
                }
                if case .object(var keys, true) = stack.last {
                    // A key is compared as the decoder reads it: `"\u0070oints"` is `points`.
                    let raw = b[start..<min(j, b.count)]
                    let key = escaped ? try unescaped(raw) : Array(raw)
                    lastKey = String(decoding: key, as: UTF8.self)
                    guard keys.insert(key).inserted else {
                        // Named as the parser names fields: `data.points` inside `data`.
                        throw Problem(.malformed, "\((path + [lastKey]).joined(separator: ".")): the key appears twice")
                    }
                    stack[stack.count - 1] = .object(keys: keys, expectingKey: false)
                }
                i = j + 1
            case 0x2D, 0x30...0x39:  // a number
                var j = i
                while j < b.count, (b[j] >= 0x30 && b[j] <= 0x39) || b[j] == 0x2D || b[j] == 0x2B || b[j] == 0x2E || b[j] == 0x65 || b[j] == 0x45 {
                    if b[j] == 0x2E || b[j] == 0x65 || b[j] == 0x45 {
                        throw Problem(.malformed, "body: numbers must be integers without a fraction or exponent")
                    }
                    j += 1
                }
                i = j
            default:
                i += 1
            }
        }
    }

    /// A key's bytes with its escapes (RFC 8259 §7) decoded to UTF-8. An escape that is no
    /// escape is left as it is, for the decoder to refuse with the rest of the grammar; an
    /// unpaired surrogate is refused here (it has no UTF-8, and decoders differ on it).
    static func unescaped(_ raw: ArraySlice<UInt8>) throws(Problem) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(raw.count)
        let r = Array(raw)
        func hex4(_ at: Int) -> UInt32? {
            guard at + 4 <= r.count else { return nil }
            var v: UInt32 = 0
            for k in at..<(at + 4) {
                let h = r[k]
                let d: UInt32
                switch h {
                case 0x30...0x39: d = UInt32(h - 0x30)
                case 0x41...0x46: d = UInt32(h - 0x41 + 10)
                case 0x61...0x66: d = UInt32(h - 0x61 + 10)
                default: return nil
                }
                v = v << 4 | d
            }
            return v
        }
        var i = 0
        while i < r.count {
            guard r[i] == 0x5C, i + 1 < r.count else { out.append(r[i]); i += 1; continue }
            let e = r[i + 1]
            switch e {
            case 0x22, 0x5C, 0x2F: out.append(e); i += 2
            case 0x62: out.append(0x08); i += 2
            case 0x66: out.append(0x0C); i += 2
            case 0x6E: out.append(0x0A); i += 2
            case 0x72: out.append(0x0D); i += 2
            case 0x74: out.append(0x09); i += 2
            case 0x75:
                guard let unit = hex4(i + 2) else { out.append(r[i]); i += 1; continue }
                var scalar = unit
                var length = 6
                if (0xD800...0xDBFF).contains(unit) {
                    guard i + 7 < r.count, r[i + 6] == 0x5C, r[i + 7] == 0x75, let low = hex4(i + 8), (0xDC00...0xDFFF).contains(low) else {
                        throw Problem(.malformed, "body: an object key with an unpaired surrogate")
                    }
                    scalar = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    length = 12
                } else if (0xDC00...0xDFFF).contains(unit) {
                    throw Problem(.malformed, "body: an object key with an unpaired surrogate")
                }
                UTF8.encode(Unicode.Scalar(scalar)!) { out.append($0) }  // a scalar: not a surrogate
                i += length
            default: out.append(r[i]); i += 1
            }
        }
        return out
    }
}
