import ClearingDomain
import Testing

@Suite struct NoticeScheduleTests {
    let t0 = Instant(rfc3339: "2026-11-23T00:00:00Z")!

    func retryDelay(_ d: NoticeDecision) -> Int64? {
        if case .retry(let at) = d { return at.millisecondsSinceEpoch - t0.millisecondsSinceEpoch }
        return nil
    }

    @Test func theStandardWebhooksScheduleWithoutJitter() {
        let expected: [Int64] = [5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 72_000, 86_400]
        for (i, seconds) in expected.enumerated() {
            let d = NoticeSchedule.decide(attempt: i + 1, result: .init(status: 500), finishedAt: t0, jitterPPM: 0)
            #expect(retryDelay(d) == seconds * 1000, "after attempt \(i + 1)")
        }
        #expect(NoticeSchedule.decide(attempt: 10, result: .init(status: 500), finishedAt: t0, jitterPPM: 0)
            == .dead(reason: "no success after 10 attempts"))
        #expect(Limits.noticeAttemptsMax == 10)
    }

    @Test func jitterMovesADelayByAtMostTenPercent() {
        #expect(retryDelay(NoticeSchedule.decide(attempt: 2, result: .init(status: nil), finishedAt: t0, jitterPPM: 100_000)) == 330_000)
        #expect(retryDelay(NoticeSchedule.decide(attempt: 2, result: .init(status: nil), finishedAt: t0, jitterPPM: -100_000)) == 270_000)
        // Out-of-range jitter is clamped.
        #expect(retryDelay(NoticeSchedule.decide(attempt: 2, result: .init(status: nil), finishedAt: t0, jitterPPM: 9_000_000)) == 330_000)
    }

    /// Any 2xx is success; anything else is a failure, retried on the schedule (CONTRACT §7),
    /// `410 Gone` too.
    @Test func anyTwoHundredIsSuccessAndAnythingElseIsRetried() {
        for s in [200, 201, 202, 204, 299] {
            #expect(NoticeSchedule.decide(attempt: 1, result: .init(status: s), finishedAt: t0, jitterPPM: 0) == .delivered)
        }
        for s in [300, 302, 400, 401, 404, 410, 500, 502] {
            #expect(retryDelay(NoticeSchedule.decide(attempt: 1, result: .init(status: s), finishedAt: t0, jitterPPM: 0)) == 5_000)
        }
    }

    @Test func retryAfterIsHonouredOn429And503Only() {
        #expect(retryDelay(NoticeSchedule.decide(attempt: 1, result: .init(status: 429, retryAfterSeconds: 120), finishedAt: t0, jitterPPM: 0)) == 120_000)
        #expect(retryDelay(NoticeSchedule.decide(attempt: 1, result: .init(status: 503, retryAfterSeconds: 60), finishedAt: t0, jitterPPM: 0)) == 60_000)
        // Never sooner than the schedule, never later than the cap.
        #expect(retryDelay(NoticeSchedule.decide(attempt: 3, result: .init(status: 503, retryAfterSeconds: 1), finishedAt: t0, jitterPPM: 0)) == 1_800_000)
        #expect(retryDelay(NoticeSchedule.decide(attempt: 1, result: .init(status: 429, retryAfterSeconds: 10_000_000), finishedAt: t0, jitterPPM: 0)) == 86_400_000)
        #expect(retryDelay(NoticeSchedule.decide(attempt: 1, result: .init(status: 500, retryAfterSeconds: 120), finishedAt: t0, jitterPPM: 0)) == 5_000)
    }

    @Test func theNoticeBodyFollowsTheContract() throws {
        let f = PartnerFigures(
            partner: PartnerID("fuelco")!, issuedPoints: Points(1000), redeemedPoints: Points(200), expiredPoints: .zero,
            payableMinor: MoneyMinor(1100), receivableMinor: MoneyMinor(190), netMinor: MoneyMinor(-910))
        let n = SettlementNotice(
            run: "R000007", cutoff: t0, currency: "EUR", figures: f, issuePricePer1000: MoneyMinor(1100), redeemCreditPer1000: MoneyMinor(950))
        #expect(n.id == "R000007:fuelco")
        #expect(n.body == #"{"type":"settlement.notice","data":{"run":"R000007","cutoff":"2026-11-23T00:00:00.000Z","currency":"EUR","partner":"fuelco","issued_points":1000,"redeemed_points":200,"expired_points":0,"issue_price_per_1000":1100,"redeem_credit_per_1000":950,"payable_minor":1100,"receivable_minor":190,"net_minor":-910,"direction":"partner pays","statement":"/v1/partners/fuelco/statements/R000007.csv"}}"#)
    }
}
