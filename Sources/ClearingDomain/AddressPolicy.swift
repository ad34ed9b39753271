/// Which addresses a notice may be delivered to (CONTRACT §2, §7; issue 5 point 5).
///
/// libcurl resolves the partner's host and, just before it connects, hands the address to
/// our open-socket callback; that address is the one checked here, so a name that resolves
/// to a public address at check time and a private one at connect time cannot slip past.
public struct IPAddress: Equatable, Sendable, CustomStringConvertible {
    /// 4 bytes (IPv4) or 16 bytes (IPv6), network order.
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    public var isV4: Bool { bytes.count == 4 }

    /// The IPv4 address inside an IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96, not
    /// :: or ::1) or NAT64 (64:ff9b::/96) IPv6 address.
    public var embeddedV4: IPAddress? {
        guard bytes.count == 16 else { return nil }
        let head = Array(bytes[0..<12])
        let mapped: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        let translated: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0]  // ::ffff:0:a.b.c.d (SIIT)
        let nat64: [UInt8] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]
        let compatible = [UInt8](repeating: 0, count: 12)
        let tail = Array(bytes[12..<16])
        if head == mapped || head == translated || head == nat64 { return IPAddress(bytes: tail) }
        // 6to4 (2002::/16): the IPv4 address is in bytes 2...5.
        if bytes[0] == 0x20 && bytes[1] == 0x02 { return IPAddress(bytes: Array(bytes[2..<6])) }
        if head == compatible, tail != [0, 0, 0, 0], tail != [0, 0, 0, 1] { return IPAddress(bytes: tail) }
        return nil
    }

    public var description: String {
        if isV4 { return bytes.map(String.init).joined(separator: ".") }
        var groups: [String] = []
        for i in stride(from: 0, to: 16, by: 2) { groups.append(String(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]), radix: 16)) }
        return groups.joined(separator: ":")
    }
}

public enum AddressPolicy {
    public enum Class: String, Sendable {
        case loopback, `private`, linkLocal = "link-local", metadata, unspecified, multicast, reserved
    }

    /// Why an address is not public, or nil when it is.
    public static func classify(_ a: IPAddress) -> Class? {
        let b = a.bytes
        // NAT64 for local use (64:ff9b:1::/48, RFC 8215): the local network chooses where in the
        // address the IPv4 one sits (RFC 6052's /48 to /96 layouts), so none can be read out of
        // it with certainty; the whole prefix is private.
        if !a.isV4 && b[0..<6] == [0, 0x64, 0xff, 0x9b, 0, 0x01][...] { return .private }
        if let v4 = a.embeddedV4 { return classify(v4) }
        if a.isV4 {
            switch (b[0], b[1]) {
            case (169, 254) where b[2] == 169 && b[3] == 254: return .metadata  // cloud instance metadata
            case (100, 100) where b[2] == 100 && b[3] == 200: return .metadata  // Alibaba Cloud metadata
            case (127, _): return .loopback
            case (10, _), (192, 168): return .private
            case (172, 16...31): return .private
            case (100, 64...127): return .private  // carrier-grade NAT
            case (169, 254): return .linkLocal
            case (0, _): return .unspecified
            case (192, 0) where b[2] == 0: return .reserved  // IETF protocol assignments
            case (198, 18...19): return .reserved  // benchmarking
            case (192, 88) where b[2] == 99: return .reserved  // the former 6to4 relay anycast
            case (192, 0) where b[2] == 2, (198, 51) where b[2] == 100, (203, 0) where b[2] == 113: return .reserved  // documentation
            case (224...239, _): return .multicast
            case (240...255, _): return .reserved
            default: return nil
            }
        }
        if b == [UInt8](repeating: 0, count: 15) + [1] { return .loopback }
        if b == [UInt8](repeating: 0, count: 16) { return .unspecified }
        if b[0..<8] == [0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0][...] && b[8..<14].allSatisfy({ $0 == 0 }) && b[14] == 0x02 && b[15] == 0x54 { return .metadata }  // fd00:ec2::254
        if b[0] & 0xfe == 0xfc { return .private }  // unique local fc00::/7
        if b[0] == 0xfe && b[1] & 0xc0 == 0x80 { return .linkLocal }  // fe80::/10
        if b[0] == 0xfe && b[1] & 0xc0 == 0xc0 { return .private }  // deprecated site-local fec0::/10
        if b[0] == 0xff { return .multicast }
        if b[0] == 0x20 && b[1] == 0x01 && b[2] == 0x0d && b[3] == 0xb8 { return .reserved }  // documentation 2001:db8::/32
        if b[0] == 0x20 && b[1] == 0x01 && b[2] == 0 && b[3] == 0 { return .reserved }  // Teredo 2001::/32 (hides its IPv4)
        if b[0] == 0x01 && b[1...7].allSatisfy({ $0 == 0 }) { return .reserved }  // discard-only 100::/64
        return nil
    }

    /// Why a notice may not go to this address, or nil when it may. With
    /// `allowPrivateNetworks` (development and tests only), loopback and private addresses are
    /// allowed; link-local, metadata, unspecified, multicast and reserved addresses never are.
    public static func refusal(_ a: IPAddress, allowPrivateNetworks: Bool) -> String? {
        guard let c = classify(a) else { return nil }
        if allowPrivateNetworks && (c == .loopback || c == .private) { return nil }
        return "\(c.rawValue) address"
    }

    /// "a loopback address", "an unspecified address": the refusal with its article.
    public static func withArticle(_ reason: String) -> String {
        ("aeiou".contains(reason.first ?? "x") ? "an " : "a ") + reason
    }
}
