/// Settlement notices (CONTRACT §7): their content and their retry schedule, as pure values.

/// Where a notice stands.
public enum NoticeState: String, Sendable, CaseIterable {
    case pending, delivered, dead
}

/// The notice a partner receives when a run commits. Its body is fixed when the run commits
/// and is the same, byte for byte, on every attempt; only the signature's timestamp changes.
public struct SettlementNotice: Equatable, Sendable {
    public var run: String
    public var cutoff: Instant
    public var currency: String
    public var figures: PartnerFigures
    public var issuePricePer1000: MoneyMinor
    public var redeemCreditPer1000: MoneyMinor

    public init(run: String, cutoff: Instant, currency: String, figures: PartnerFigures, issuePricePer1000: MoneyMinor, redeemCreditPer1000: MoneyMinor) {
        self.run = run
        self.cutoff = cutoff
        self.currency = currency
        self.figures = figures
        self.issuePricePer1000 = issuePricePer1000
        self.redeemCreditPer1000 = redeemCreditPer1000
    }

    /// `<run>:<partner>`: the `webhook-id` of every attempt.
    public var id: String { SettlementNotice.id(run: run, partner: figures.partner) }

    public static func id(run: String, partner: PartnerID) -> String { "\(run):\(partner)" }

    /// Where the partner downloads the statement behind the figures.
    public var statementPath: String { "/v1/partners/\(figures.partner)/statements/\(run).csv" }

    /// The partner's figures as JSON members (shared by the notice and the JSON statement).
    public var figuresJSON: String {
        var w = JSONWriter()
        w.string("run", run)
        w.string("cutoff", cutoff.description)
        w.string("currency", currency)
        w.string("partner", figures.partner.rawValue)
        w.int("issued_points", figures.issuedPoints.value)
        w.int("redeemed_points", figures.redeemedPoints.value)
        w.int("expired_points", figures.expiredPoints.value)
        w.int("issue_price_per_1000", issuePricePer1000.value)
        w.int("redeem_credit_per_1000", redeemCreditPer1000.value)
        w.int("payable_minor", figures.payableMinor.value)
        w.int("receivable_minor", figures.receivableMinor.value)
        w.int("net_minor", figures.netMinor.value)
        w.string("direction", figures.netMinor.value > 0 ? "coalition pays" : figures.netMinor.value < 0 ? "partner pays" : "nothing to pay")
        w.string("statement", statementPath)
        return w.finish()
    }

    /// `{"type":"settlement.notice","data":{...}}`.
    public var body: String {
        var w = JSONWriter()
        w.string("type", "settlement.notice")
        w.raw("data", figuresJSON)
        return w.finish()
    }
}

/// What happened to one delivery attempt, as the schedule sees it.
public struct NoticeAttemptResult: Equatable, Sendable {
    /// The HTTP status, or nil when no answer came (connection, TLS, timeout...).
    public var status: Int?
    public var retryAfterSeconds: Int64?

    public init(status: Int?, retryAfterSeconds: Int64? = nil) {
        self.status = status
        self.retryAfterSeconds = retryAfterSeconds
    }
}

/// What follows an attempt.
public enum NoticeDecision: Equatable, Sendable {
    case delivered
    case retry(at: Instant)
    case dead(reason: String)
}

/// The back-off of CONTRACT §7 / Standard Webhooks.
public enum NoticeSchedule {
    /// Decides after attempt `attempt` (1-based, within its round) finished at `finishedAt`.
    /// `jitterPPM` (clamped to ±`Limits.noticeJitterPPMMax`) spreads retries so that many
    /// notices failing together do not return together.
    public static func decide(
        attempt: Int, result: NoticeAttemptResult, finishedAt: Instant, jitterPPM: Int64
    ) -> NoticeDecision {
        if let s = result.status, (200...299).contains(s) { return .delivered }
        // Anything else is a failure, retried on the schedule (CONTRACT §7), `410 Gone` too:
        // a partner's endpoint gone by mistake gets its notice once it is back; only the
        // last try makes a dead letter.
        guard attempt < Limits.noticeAttemptsMax else {
            return .dead(reason: "no success after \(attempt) attempts")
        }
        let base = Limits.noticeRetryDelaysSeconds[max(0, attempt)] * 1000
        let jitter = min(Limits.noticeJitterPPMMax, max(-Limits.noticeJitterPPMMax, jitterPPM))
        var delay = base + base * jitter / 1_000_000
        if let s = result.status, s == 429 || s == 503, let after = result.retryAfterSeconds, after > 0 {
            delay = max(delay, min(after, Limits.noticeRetryAfterSecondsMax) * 1000)
        }
        return .retry(at: Instant(millisecondsSinceEpoch: finishedAt.millisecondsSinceEpoch + delay))
    }
}
