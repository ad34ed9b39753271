/// A strict, iterative pre-check of an event body, before Foundation's decoder sees it:
/// nesting at most `Limits.jsonDepthMax` deep (the decoder is recursive), no key twice in one
/// object (the decoder would silently keep one), no escapes in keys (so `"\u0070oints"` cannot
/// pose as a second `points`), and every number an integer literal (the decoder would turn
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
                    guard !escaped else { throw Problem(.malformed, "body: object keys may not contain escapes") }
                    let key = Array(b[start..<min(j, b.count)])
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
}
