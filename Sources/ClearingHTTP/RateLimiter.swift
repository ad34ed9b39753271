import ClearingDomain
import Synchronization

/// A token bucket per partner (CONTRACT §2 `rate_per_second`): it refills at the partner's
/// rate and holds at most a burst of `Limits.rateBurstSeconds` seconds' worth. Integer
/// arithmetic in thousandths of a token.
public final class RateLimiter: Sendable {
    struct Bucket {
        var milliTokens: Int64
        var lastMillis: Int64
    }

    private let rates: [PartnerID: Int64]
    private let buckets = Mutex<[PartnerID: Bucket]>([:])

    public init(configuration: ClearingConfiguration) {
        var r: [PartnerID: Int64] = [:]
        for (id, p) in configuration.partners { if let rate = p.ratePerSecond { r[id] = rate } }
        rates = r
    }

    /// nil when the request may go on; otherwise the seconds after which it may be retried.
    public func admit(_ partner: PartnerID, now: Instant) -> Int? {
        guard let rate = rates[partner] else { return nil }
        let capacity = rate * Limits.rateBurstSeconds * 1000
        return buckets.withLock { all in
            let t = now.millisecondsSinceEpoch
            var b = all[partner] ?? Bucket(milliTokens: capacity, lastMillis: t)
            let elapsed = max(0, t - b.lastMillis)
            b.milliTokens = min(capacity, b.milliTokens + elapsed * rate)  // rate tokens/s = rate milli-tokens/ms
            b.lastMillis = t
            defer { all[partner] = b }
            if b.milliTokens >= 1000 {
                b.milliTokens -= 1000
                return nil
            }
            let missing = 1000 - b.milliTokens
            return Int((missing + rate * 1000 - 1) / (rate * 1000))  // whole seconds, rounded up
        }
    }
}
