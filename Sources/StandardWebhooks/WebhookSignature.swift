import ClearingDomain
import Crypto
import Foundation

/// Standard Webhooks, version 1 (CONTRACT §3): HMAC-SHA256 over
/// `{webhook-id}.{webhook-timestamp}.{raw body}`, keyed with the secret's bytes, base64 in
/// `webhook-signature` as space-separated `v1,<base64>` entries.
public enum WebhookSignature {
    /// The longest `webhook-id` and `webhook-signature` looked at: as long as a request's
    /// headers may be together (`Limits.requestHeaderBytesMax`), so that over HTTP every header
    /// that arrives is looked at whole. Every entry of the signature header is looked at
    /// (CONTRACT §3: any listed signature), one HMAC per secret serving them all; an authentic
    /// message whose `webhook-id` is no id is then refused as such (400), not as unsigned.
    public static let headerBytesMax = Limits.requestHeaderBytesMax

    /// The signed content.
    static func content(id: String, timestamp: String, body: some Collection<UInt8>) -> [UInt8] {
        var c: [UInt8] = []
        c.reserveCapacity(id.utf8.count + timestamp.utf8.count + body.count + 2)
        c += id.utf8
        c.append(0x2E)
        c += timestamp.utf8
        c.append(0x2E)
        c += body
        return c
    }

    /// Compares without an early exit, so the time taken says nothing of where they differ.
    public static func constantTimeEquals(_ a: some Collection<UInt8>, _ b: some Collection<UInt8>) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for (x, y) in zip(a, b) { diff |= x ^ y }
        return diff == 0
    }

    /// `v1,<base64>` for one secret.
    public static func sign(id: String, timestamp: Int64, body: some Collection<UInt8>, secret: SecretBytes) -> String {
        let mac = HMAC<SHA256>.authenticationCode(
            for: content(id: id, timestamp: String(timestamp), body: body), using: SymmetricKey(data: secret.bytes))
        return "v1," + Data(mac).base64EncodedString()
    }

    /// Checks the three headers against the body and the partner's secrets. Returns nil when
    /// authentic and fresh, else the problem: `bad-signature` for missing or unmatched
    /// signatures, `stale-timestamp` for an authentic message more than 300 s from `now`.
    /// Every candidate is compared in constant time.
    public static func verify(
        id: String?, timestamp: String?, signatures: String?, body: some Collection<UInt8>,
        secrets: [SecretBytes], now: Instant
    ) -> Problem? {
        guard let id, let timestamp, let signatures, !id.isEmpty, !timestamp.isEmpty, !signatures.isEmpty else {
            return Problem(.badSignature, "webhook-id, webhook-timestamp and webhook-signature are all required")
        }
        guard id.utf8.count <= headerBytesMax else { return Problem(.badSignature, "webhook-id is too long") }
        guard signatures.utf8.count <= headerBytesMax else { return Problem(.badSignature, "webhook-signature is too long") }
        // Any decimal integer: an authentic message with a far-off (or millisecond) timestamp,
        // even one past Int64, is `stale-timestamp`, not `bad-signature`.
        let digits = timestamp.utf8.first == UInt8(ascii: "-") ? timestamp.utf8.dropFirst() : timestamp.utf8[...]
        guard !digits.isEmpty, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
            return Problem(.badSignature, "webhook-timestamp must be Unix seconds")
        }
        guard digits.count <= Limits.webhookTimestampDigitsMax else { return Problem(.badSignature, "webhook-timestamp is too long") }
        let seconds = Int64(timestamp)  // nil: beyond Int64, far from any clock
        var candidates: [Data] = []
        for entry in signatures.split(separator: " ", omittingEmptySubsequences: true) {
            // A header sent on several lines reaches here joined by ", " (RFC 9110 §5.3) when a
            // proxy folded it: the comma is no part of an entry (base64 has none).
            let entry = entry.last == "," ? entry.dropLast() : entry[...]
            guard entry.hasPrefix("v1,"), let mac = Data(base64Encoded: String(entry.dropFirst(3))), mac.count == 32 else { continue }
            candidates.append(mac)
        }
        let signed = content(id: id, timestamp: timestamp, body: body)
        var matched = false
        // One HMAC per secret (not per secret and candidate: a body of 64 KiB with 87 entries
        // would cost 87 times over), each candidate compared with it in constant time.
        for secret in secrets {
            let expected = Array(HMAC<SHA256>.authenticationCode(for: signed, using: SymmetricKey(data: secret.bytes)))
            for mac in candidates where constantTimeEquals(expected, mac) {
                matched = true
            }
        }
        guard matched else { return Problem(.badSignature, "no webhook-signature matches this partner's secrets") }
        guard let seconds else {
            return Problem(.staleTimestamp, "webhook-timestamp is far from the server clock; at most \(Limits.signatureToleranceSecondsMax) s are accepted")
        }
        let (skew, overflow) = (now.millisecondsSinceEpoch / 1000).subtractingReportingOverflow(seconds)
        guard !overflow, skew != .min else {
            return Problem(.staleTimestamp, "webhook-timestamp is far from the server clock; at most \(Limits.signatureToleranceSecondsMax) s are accepted")
        }
        guard abs(skew) <= Limits.signatureToleranceSecondsMax else {
            return Problem(.staleTimestamp, "webhook-timestamp is \(abs(skew)) s \(skew > 0 ? "behind" : "ahead of") the server clock; at most \(Limits.signatureToleranceSecondsMax) s are accepted")
        }
        return nil
    }
}
