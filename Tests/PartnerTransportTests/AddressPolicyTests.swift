import ClearingDomain
import PartnerTransport
import Testing

private func v4(_ s: String) -> IPAddress { IPAddress(bytes: s.split(separator: ".").map { UInt8($0)! })! }

private func v6(_ groups: [UInt16]) -> IPAddress {
    IPAddress(bytes: groups.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xff)] })!
}

@Suite struct AddressPolicyTests {
    @Test(arguments: [
        ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
        ("172.31.255.255", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("169.254.1.1", "link-local"),
        ("169.254.169.254", "metadata"), ("100.100.100.200", "metadata"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("198.18.0.1", "reserved"), ("192.0.2.7", "reserved"),
    ])
    func nonPublicIPv4(_ address: String, _ expected: String) {
        #expect(AddressPolicy.classify(v4(address))?.rawValue == expected)
    }

    @Test(arguments: ["8.8.8.8", "1.1.1.1", "172.32.0.1", "172.15.255.255", "100.128.0.1", "93.184.216.34", "192.169.0.1"])
    func publicIPv4(_ address: String) {
        #expect(AddressPolicy.classify(v4(address)) == nil)
        #expect(AddressPolicy.refusal(v4(address), allowPrivateNetworks: false) == nil)
    }

    @Test func ipv6() {
        #expect(AddressPolicy.classify(v6([0, 0, 0, 0, 0, 0, 0, 1])) == .loopback)
        #expect(AddressPolicy.classify(v6([0, 0, 0, 0, 0, 0, 0, 0])) == .unspecified)
        #expect(AddressPolicy.classify(v6([0xfd12, 0x3456, 0, 0, 0, 0, 0, 1])) == .private)
        #expect(AddressPolicy.classify(v6([0xfe80, 0, 0, 0, 0, 0, 0, 1])) == .linkLocal)
        #expect(AddressPolicy.classify(v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254])) == .metadata)
        #expect(AddressPolicy.classify(v6([0xff02, 0, 0, 0, 0, 0, 0, 1])) == .multicast)
        #expect(AddressPolicy.classify(v6([0x2001, 0x0db8, 0, 0, 0, 0, 0, 1])) == .reserved)
        #expect(AddressPolicy.classify(v6([0x2a00, 0x1450, 0x4001, 0x0800, 0, 0, 0, 0x200e])) == nil)
        // IPv4 hidden in IPv6 is judged as the IPv4 address it carries.
        #expect(AddressPolicy.classify(v6([0, 0, 0, 0, 0, 0xffff, 0x7f00, 0x0001])) == .loopback)
        #expect(AddressPolicy.classify(v6([0, 0, 0, 0, 0, 0xffff, 0xa9fe, 0xa9fe])) == .metadata)
        #expect(AddressPolicy.classify(v6([0x64, 0xff9b, 0, 0, 0, 0, 0x0a00, 0x0001])) == .private)
        #expect(AddressPolicy.classify(v6([0, 0, 0, 0, 0, 0xffff, 0x0808, 0x0808])) == nil)
        #expect(AddressPolicy.classify(v6([0, 0, 0, 0, 0xffff, 0, 0x7f00, 0x0001])) == .loopback)  // ::ffff:0:127.0.0.1
        #expect(AddressPolicy.classify(v6([0x2002, 0x0a00, 0x0001, 0, 0, 0, 0, 1])) == .private)  // 6to4 of 10.0.0.1
        #expect(AddressPolicy.classify(v6([0x2002, 0x0808, 0x0808, 0, 0, 0, 0, 1])) == nil)  // 6to4 of 8.8.8.8
        // Local NAT64 (64:ff9b:1::/48): where the IPv4 address sits is the local network's choice,
        // so the whole prefix is private, whatever its last bytes read as.
        #expect(AddressPolicy.classify(v6([0x0064, 0xff9b, 0x0001, 0, 0, 0, 0xa9fe, 0xa9fe])) == .private)
        #expect(AddressPolicy.classify(v6([0x0064, 0xff9b, 0x0001, 0, 0, 0, 0x0808, 0x0808])) == .private)
        #expect(AddressPolicy.classify(v6([0x0064, 0xff9b, 0x0001, 0x0a00, 0x0001, 0, 0, 0])) == .private)
        #expect(AddressPolicy.classify(IPAddress(bytes: [192, 88, 99, 1])!) == .reserved)
        #expect(AddressPolicy.classify(IPAddress(bytes: [192, 88, 98, 1])!) == nil)
        #expect(AddressPolicy.classify(v6([0x2001, 0, 0x4136, 0xe378, 0x8000, 0x63bf, 0x3fff, 0xfdd2])) == .reserved)  // Teredo
        #expect(v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]).description == "fe80:0:0:0:0:0:0:1")
    }

    @Test func allowingPrivateNetworksOpensLoopbackAndPrivateOnly() {
        #expect(AddressPolicy.refusal(v4("127.0.0.1"), allowPrivateNetworks: false) == "loopback address")
        #expect(AddressPolicy.refusal(v4("127.0.0.1"), allowPrivateNetworks: true) == nil)
        #expect(AddressPolicy.refusal(v4("10.0.0.1"), allowPrivateNetworks: true) == nil)
        #expect(AddressPolicy.refusal(v6([0, 0, 0, 0, 0, 0, 0, 1]), allowPrivateNetworks: true) == nil)
        // Never, whatever the configuration says: cloud metadata, link-local, multicast...
        #expect(AddressPolicy.refusal(v4("169.254.169.254"), allowPrivateNetworks: true) == "metadata address")
        #expect(AddressPolicy.refusal(v4("169.254.3.4"), allowPrivateNetworks: true) == "link-local address")
        #expect(AddressPolicy.refusal(v4("0.0.0.0"), allowPrivateNetworks: true) == "unspecified address")
        #expect(AddressPolicy.refusal(v4("224.0.0.1"), allowPrivateNetworks: true) == "multicast address")
        // As the notice's attempt says it.
        #expect(AddressPolicy.withArticle("unspecified address") == "an unspecified address")
        #expect(AddressPolicy.withArticle("loopback address") == "a loopback address")
    }
}
