/// Validated identifiers (CONTRACT §1, §3). Each is a byte-checked ASCII string; an instance
/// can only be made through `init?`, so holding one means it is well-formed.

@inline(__always)
private func isAlnum(_ b: UInt8) -> Bool {
    (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A)
}

@inline(__always)
private func isLowerAlnum(_ b: UInt8) -> Bool {
    (b >= 0x30 && b <= 0x39) || (b >= 0x61 && b <= 0x7A)
}

private func allBytes(_ s: String, min: Int, max: Int, _ ok: (UInt8) -> Bool) -> Bool {
    var count = 0
    for b in s.utf8 {
        count += 1
        if count > max || !ok(b) { return false }
    }
    return count >= min
}

/// `^[a-z0-9][a-z0-9-]{1,31}$`, and never `coalition`.
public struct PartnerID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public static let reserved = "coalition"

    public init?(_ raw: String) {
        guard let first = raw.utf8.first, isLowerAlnum(first),
            allBytes(raw, min: Limits.partnerIDBytesMin, max: Limits.partnerIDBytesMax, { isLowerAlnum($0) || $0 == 0x2D }),
            raw != PartnerID.reserved
        else { return nil }
        rawValue = raw
    }

    public var description: String { rawValue }
    public static func < (a: PartnerID, b: PartnerID) -> Bool { a.rawValue < b.rawValue }
}

/// `^[A-Za-z0-9._-]{1,64}$`: the coalition card or account number.
public struct MemberID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: String

    public init?(_ raw: String) {
        guard allBytes(raw, min: 1, max: Limits.memberIDBytesMax, { isAlnum($0) || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D })
        else { return nil }
        rawValue = raw
    }

    public var description: String { rawValue }
    public static func < (a: MemberID, b: MemberID) -> Bool { a.rawValue < b.rawValue }
}

/// A partner's own transaction id: 1–128 chars of `[A-Za-z0-9._:/-]`.
public struct Reference: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String

    public init?(_ raw: String) {
        guard allBytes(raw, min: 1, max: Limits.referenceBytesMax, {
            isAlnum($0) || $0 == 0x2E || $0 == 0x5F || $0 == 0x3A || $0 == 0x2F || $0 == 0x2D
        }) else { return nil }
        rawValue = raw
    }

    public var description: String { rawValue }
}

/// Standard Webhooks message id: 1–128 chars of `[A-Za-z0-9._:-]`.
public struct WebhookID: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String

    public init?(_ raw: String) {
        guard allBytes(raw, min: 1, max: Limits.webhookIDBytesMax, {
            isAlnum($0) || $0 == 0x2E || $0 == 0x5F || $0 == 0x3A || $0 == 0x2D
        }) else { return nil }
        rawValue = raw
    }

    public var description: String { rawValue }
}
