/// The failures of CONTRACT §3, as RFC 9457 problem details. Each has a slug
/// (`urn:clearhouse:problem:<slug>`), an HTTP status and a title; `detail` says what exactly.
public struct Problem: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable, CaseIterable {
        case malformed
        case badSignature = "bad-signature"
        case staleTimestamp = "stale-timestamp"
        case wrongPartner = "wrong-partner"
        case unknownPartner = "unknown-partner"
        case conflict
        case tooLarge = "too-large"
        case unsupportedMediaType = "unsupported-media-type"
        case insufficientPoints = "insufficient-points"
        case unknownOriginal = "unknown-original"
        case reversalExceedsOriginal = "reversal-exceeds-original"
        case memberMismatch = "member-mismatch"
        case rateLimited = "rate-limited"
        case unavailable
        /// Not in the contract's table: a route, run or document that does not exist.
        case notFound = "not-found"
        /// Not in the contract's table: no or wrong credentials on a read.
        case unauthorized
        /// Not in the contract's table: a route served, but not with this method (`allow` says which).
        case methodNotAllowed = "method-not-allowed"
        /// Not in the contract's table: a `transfer-encoding` other than `chunked` alone, which
        /// this server cannot decode (RFC 9112 §6.1: 501).
        case notImplemented = "not-implemented"

        public var status: Int {
            switch self {
            case .malformed: 400
            case .badSignature, .staleTimestamp, .unauthorized: 401
            case .wrongPartner: 403
            case .unknownPartner, .notFound: 404
            case .methodNotAllowed: 405
            case .conflict: 409
            case .tooLarge: 413
            case .unsupportedMediaType: 415
            case .insufficientPoints, .unknownOriginal, .reversalExceedsOriginal, .memberMismatch: 422
            case .rateLimited: 429
            case .notImplemented: 501
            case .unavailable: 503
            }
        }

        public var title: String {
            switch self {
            case .malformed: "Malformed request"
            case .badSignature: "Bad signature"
            case .staleTimestamp: "Stale timestamp"
            case .wrongPartner: "Wrong partner"
            case .unknownPartner: "Unknown partner"
            case .conflict: "Conflict"
            case .tooLarge: "Body too large"
            case .unsupportedMediaType: "Unsupported media type"
            case .insufficientPoints: "Insufficient points"
            case .unknownOriginal: "Unknown original"
            case .reversalExceedsOriginal: "Reversal exceeds original"
            case .memberMismatch: "Member mismatch"
            case .rateLimited: "Rate limited"
            case .unavailable: "Unavailable"
            case .notFound: "Not found"
            case .unauthorized: "Unauthorized"
            case .methodNotAllowed: "Method not allowed"
            case .notImplemented: "Not implemented"
            }
        }
    }

    public let kind: Kind
    public let detail: String
    /// Seconds after which a retry may succeed (429 and 503).
    public let retryAfterSeconds: Int?

    public init(_ kind: Kind, _ detail: String, retryAfterSeconds: Int? = nil) {
        self.kind = kind
        self.detail = detail
        self.retryAfterSeconds = retryAfterSeconds
    }

    public var type: String { "urn:clearhouse:problem:\(kind.rawValue)" }
    public var status: Int { kind.status }
    public var description: String { "\(kind.rawValue): \(detail)" }

    /// The problem document, keys in a fixed order.
    public var json: String {
        var w = JSONWriter()
        w.string("type", type)
        w.string("title", kind.title)
        w.int("status", Int64(status))
        w.string("detail", detail)
        return w.finish()
    }
}

/// A tiny writer of flat JSON objects with keys in the order they are written, so that a
/// response body is byte-for-byte reproducible.
public struct JSONWriter {
    private var out = "{"
    private var first = true

    public init() {}

    private mutating func key(_ k: String) {
        if !first { out += "," }
        first = false
        out += JSONWriter.quote(k)
        out += ":"
    }

    public mutating func string(_ k: String, _ v: String) { key(k); out += JSONWriter.quote(v) }
    public mutating func int(_ k: String, _ v: Int64) { key(k); out += String(v) }
    public mutating func bool(_ k: String, _ v: Bool) { key(k); out += v ? "true" : "false" }
    public mutating func null(_ k: String) { key(k); out += "null" }
    /// Inserts already-encoded JSON as the value.
    public mutating func raw(_ k: String, _ json: String) { key(k); out += json }

    public mutating func finish() -> String { out + "}" }

    public static func quote(_ s: String) -> String {
        // Nearly every string (ids, references, timestamps) needs no escape: one pass over
        // its UTF-8 bytes decides, and the string is copied whole (measured: this was a tenth
        // of the intake handler's time when done scalar by scalar).
        if !s.utf8.contains(where: { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }) {
            return "\"" + s + "\""
        }
        var r = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": r += "\\\""
            case "\\": r += "\\\\"
            case "\n": r += "\\n"
            case "\r": r += "\\r"
            case "\t": r += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    r += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    r.unicodeScalars.append(u)
                }
            }
        }
        return r + "\""
    }
}
