import ClearhouseTestSupport
import ClearingDomain
import ClearingSimulation
import ClearingStore
import Foundation
import Testing

func figures(_ run: SettlementRun, _ p: PartnerID) -> PartnerFigures? { run.partners.first { $0.partner == p } }

@Suite struct SettlementTests {
    /// Points live one day; at 2026-11-22T10:00Z grocer issues M1 a lot of 100, and 30 of it
    /// are redeemed at the cinema (the lot expires 2026-11-23T10:00Z).
    func dailyLotPartlyRedeemed() throws -> Harness {
        let h = try Harness(expireAfterDays: 1)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 30, "C-1"))
        return h
    }

    /// The worked example of docs/SETTLEMENT.md ("Example 1").
    @Test func handComputedRunWithFlows() throws {
        let h = try Harness()
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))  // grocer: 1000 per 1000 issued
        _ = h.post(F, "f1", Fixtures.earn("M1", 500, "F-1"))  // fuel: 1100 per 1000 issued
        _ = h.post(C, "c1", Fixtures.redeem("M1", 1200, "C-1"))  // cinema: credited 1100 per 1000
        h.clock.set(Instant(rfc3339: "2026-11-22T23:59:59Z")!)
        let run = try h.store.settle()
        #expect(run.id == "R000001" && run.entryCount == 3)
        #expect(figures(run, G) == PartnerFigures(partner: G, issuedPoints: Points(1000), redeemedPoints: .zero, expiredPoints: .zero,
                                                  payableMinor: MoneyMinor(1000), receivableMinor: .zero, netMinor: MoneyMinor(-1000)))
        #expect(figures(run, F)?.payableMinor == MoneyMinor(550) && figures(run, F)?.netMinor == MoneyMinor(-550))
        #expect(figures(run, C)?.receivableMinor == MoneyMinor(1320) && figures(run, C)?.netMinor == MoneyMinor(1320))
        #expect(run.totals.operatorMarginMinor == MoneyMinor(230))
        #expect(run.totals.grossMinor == MoneyMinor(2870) && run.totals.netTransfersMinor == MoneyMinor(2870))
        #expect(run.totals.nettingEfficiencyText == "0.000000")
        #expect(run.flows == [Flow(issuer: F, redeemer: C, points: Points(200)), Flow(issuer: G, redeemer: C, points: Points(1000))])
        #expect(try h.verify().ok)
    }

    /// Netting: a partner that both issues and redeems settles one net amount ("Example 2").
    @Test func nettingWithinAPartner() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 2000, "G-1"))
        _ = h.post(F, "f1", Fixtures.earn("M2", 1000, "F-1"))
        _ = h.post(G, "g2", Fixtures.redeem("M2", 1000, "G-2"))  // fuel's points redeemed at the grocer
        _ = h.post(F, "f2", Fixtures.redeem("M1", 500, "F-2"))  // grocer's points redeemed at fuel
        let run = try h.store.settle()
        // grocer: payable 2000, receivable 1000 × 900/1000 = 900, net −1100
        #expect(figures(run, G)?.netMinor == MoneyMinor(-1100))
        // fuel: payable 1000 × 1100/1000 = 1100, receivable 500 × 1000/1000 = 500, net −600
        #expect(figures(run, F)?.netMinor == MoneyMinor(-600))
        #expect(run.totals.operatorMarginMinor == MoneyMinor(1700))
        #expect(run.totals.grossMinor == MoneyMinor(2000 + 900 + 1100 + 500))
        #expect(run.totals.netTransfersMinor == MoneyMinor(1700))
        #expect(run.totals.nettingEfficiencyText == "0.622222")  // 1 − 1700/4500
        #expect(try h.verify().ok)
    }

    @Test func roundingTiesToEvenAndNegativeIssued() throws {
        let h = try Harness()
        let terms = PartnerTerms(
            id: G, name: "g", issuePricePer1000: MoneyMinor(500), redeemCreditPer1000: MoneyMinor(1500),
            webhookSecrets: [SecretBytes(Array(repeating: 1, count: 32))], apiTokenSHA256: Array(repeating: 0, count: 32),
            noticeURL: "https://x", noticeSecret: SecretBytes(Array(repeating: 2, count: 32)))
        #expect(try PartnerFigures(partner: G, issued: Points(1), redeemed: Points(1), expired: .zero, terms: terms).payableMinor == .zero)  // 0.5 -> 0
        #expect(try PartnerFigures(partner: G, issued: Points(3), redeemed: Points(1), expired: .zero, terms: terms).payableMinor == MoneyMinor(2))  // 1.5 -> 2
        #expect(try PartnerFigures(partner: G, issued: Points(5), redeemed: Points(1), expired: .zero, terms: terms).payableMinor == MoneyMinor(2))  // 2.5 -> 2
        #expect(try PartnerFigures(partner: G, issued: Points(1), redeemed: Points(1), expired: .zero, terms: terms).receivableMinor == MoneyMinor(2))  // 1.5 -> 2
        #expect(try PartnerFigures(partner: G, issued: Points(-3), redeemed: .zero, expired: .zero, terms: terms).payableMinor == MoneyMinor(-2))  // −1.5 -> −2

        // Reversals that outweigh earns in a run: issued is negative, the coalition pays back.
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        h.clock.set(Instant(rfc3339: "2026-11-22T12:00:00Z")!)
        _ = try h.store.settle()
        h.clock.set(Instant(rfc3339: "2026-11-23T10:00:00Z")!)
        _ = h.post(G, "g2", Fixtures.reverseEarn("M1", 60, "G-2", of: "G-1"))
        let second = try h.store.settle()
        #expect(figures(second, G)?.issuedPoints == Points(-60) && figures(second, G)?.netMinor == MoneyMinor(60))
        #expect(try h.verify().ok)
    }

    /// A partner that left once its points were spent: a redemption reversed later at another
    /// partner gives points back to its lot, which then expires. The run reports that breakage
    /// for it (unpriced, at its last run's prices) instead of refusing to close, which held up
    /// every partner's money until its file came back. A departed partner with entries in
    /// the run still stops the run, naming it.
    @Test func aDepartedPartnersBreakageDoesNotBlockSettlement() throws {
        let h = try Harness(expireAfterDays: 1)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 100, "C-1"))
        _ = try h.store.settle()
        // Grocer leaves: its points are all spent.
        var without = h.configuration
        without.partners[G] = nil
        try h.store.close()
        h.store = try Store(dataDirectory: h.dir.url, configuration: without, clock: h.clock)
        h.clock.set(Instant(rfc3339: "2026-11-22T11:00:00Z")!)
        _ = h.post(C, "c2", Fixtures.reverseRedemption("M1", 100, "C-2", of: "C-1"))
        #expect(try h.balance("M1") == 100, "the points are back in grocer's lot")
        h.clock.set(Instant(rfc3339: "2026-11-24T00:00:00Z")!)
        let run = try h.store.settle()
        #expect(figures(run, G) == PartnerFigures(
            partner: G, issuedPoints: .zero, redeemedPoints: .zero, expiredPoints: Points(100),
            payableMinor: .zero, receivableMinor: .zero, netMinor: .zero))
        #expect(figures(run, C)?.redeemedPoints == Points(-100))
        #expect(run.issuePrices[G] == h.configuration.partners[G]!.issuePricePer1000, "its last run's prices")
        #expect(try h.store.notice("\(run.id):grocer") != nil, "its notice waits for a notice_url, as any missing partner's")
        #expect(try h.verify().ok)
        // Entries of a partner no longer configured (accepted before it left) stop the run.
        try h.store.close()
        h.store = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        _ = h.post(G, "g2", Fixtures.earn("M2", 10, "G-2"))
        try h.store.close()
        h.store = try Store(dataDirectory: h.dir.url, configuration: without, clock: h.clock)
        h.clock.advance(milliseconds: 1_000)
        #expect { try h.store.settle() } throws: { "\($0)".contains("partner grocer has entries in this run but no terms in the configuration (grocer.toml)") }
        // Read from a directory, the file is named in it.
        var read = without
        read.directory = "/srv/coalition/partners"
        try h.store.close()
        h.store = try Store(dataDirectory: h.dir.url, configuration: read, clock: h.clock)
        #expect { try h.store.settle() } throws: { "\($0)".contains("no terms in the configuration (/srv/coalition/partners/grocer.toml)") }
    }

    /// A lot whose expiry is at or before the cutoff is expired by the run ("Example 3").
    @Test func expiryAtExactlyTheCutoff() throws {
        let h = try dailyLotPartlyRedeemed()
        h.clock.set(Instant(rfc3339: "2026-11-24T00:00:00Z")!)
        let before = try h.store.settle(through: Instant(rfc3339: "2026-11-23T09:59:59.999Z")!)
        #expect(figures(before, G)?.expiredPoints == Points(0))
        let at = try h.store.settle(through: Instant(rfc3339: "2026-11-23T10:00:00Z")!)
        #expect(at.entryCount == 0)
        #expect(figures(at, G)?.expiredPoints == Points(70), "breakage counted for the issuer")
        #expect(try h.balance("M1") == 0)
        // Points returned later to the expired lot are expired by the next run.
        _ = h.post(C, "c2", Fixtures.reverseRedemption("M1", 30, "C-2", of: "C-1"))
        #expect(try h.balance("M1") == 0)
        let after = try h.store.settle()
        #expect(figures(after, G)?.expiredPoints == Points(30))
        #expect(try h.verify().ok)
    }

    /// The JSON statement of a partner's run, as `clearhouse statement` and the route write it.
    func jsonStatement(_ h: Harness, _ p: PartnerID, _ run: String) async throws -> [String: Any] {
        let header = try #require(try h.store.statement(for: p, run: run))
        var text = ""
        try await h.store.writeStatement(header, .json) { text += $0 }
        return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    }

    /// An issuer's `expired_points` are reproducible lot by lot (CONTRACT §8): its JSON
    /// statement lists each lot the run expired (the earn's sequence, time and reference, the
    /// member, the points), and `verify` checks the list against the figures and the lots.
    @Test func theLotsARunExpiredAreListedInTheIssuersStatement() async throws {
        let h = try dailyLotPartlyRedeemed()
        _ = h.post(G, "g2", Fixtures.earn("M2", 40, "G-2"))
        h.clock.set(Instant(rfc3339: "2026-11-24T00:00:00Z")!)
        _ = try h.store.settle(through: Instant(rfc3339: "2026-11-23T09:59:59.999Z")!)
        let at = try h.store.settle(through: Instant(rfc3339: "2026-11-23T10:00:00Z")!)
        let grocer = try await jsonStatement(h, G, at.id)
        let expired = try #require(grocer["expired"] as? [[String: Any]])
        #expect(expired.count == 2)
        #expect(expired.first?["sequence"] as? Int == 1 && expired.first?["reference"] as? String == "G-1")
        #expect(expired.first?["member"] as? String == "M1" && expired.first?["points"] as? Int == 70)
        #expect(expired.first?["accepted_at"] as? String == "2026-11-22T10:00:00.000Z")
        #expect(expired.last?["reference"] as? String == "G-2" && expired.last?["points"] as? Int == 40)
        #expect(grocer["expired_points"] as? Int == 110)
        #expect((try await jsonStatement(h, C, at.id)["expired"] as? [Any])?.isEmpty == true, "the cinema's lots expired nothing")
        // Points given back to the lot later expire in the next run, listed there.
        _ = h.post(C, "c2", Fixtures.reverseRedemption("M1", 30, "C-2", of: "C-1"))
        let after = try h.store.settle()
        #expect((try await jsonStatement(h, G, after.id)["expired"] as? [[String: Any]])?.map { $0["points"] as? Int } == [30])
        try h.store.close()
        #expect(try h.verify().ok)
        let file = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(file, "DROP TRIGGER run_expiry_immutable_u; UPDATE run_expiry SET points = 69 WHERE run_number = 2 AND lot_id = 1").status == 0)
        #expect(try h.verify().breaches.contains { $0.contains("grocer's expired lots sum to 109 points, its expired_points are 110") })
        // Points moved between two lots (the sum kept): the replay's lots disagree.
        #expect(try SQLiteTool.run(file, "UPDATE run_expiry SET points = 60 WHERE run_number = 2 AND lot_id = 1; UPDATE run_expiry SET points = 50 WHERE run_number = 2 AND lot_id = 3").status == 0)
        let moved = try h.verify()
        #expect(moved.breaches.contains { $0.contains("the lots it expired differ from the replay's (lot 1: recorded 60, replayed 70; lot 3: recorded 50, replayed 40)") }, "\(moved.breaches)")
        #expect(!moved.breaches.contains { $0.contains("sum to") })
        // A lot listed under another member than its own.
        #expect(try SQLiteTool.run(file, "UPDATE run_expiry SET points = 70 WHERE lot_id = 1 AND run_number = 2; UPDATE run_expiry SET points = 40 WHERE lot_id = 3; UPDATE run_expiry SET member = 'M9' WHERE lot_id = 3").status == 0)
        #expect(try h.verify().breaches == ["run number 2: expired lot 3 of grocer is not a lot of that issuer and member in a run with its figures"])
        // A run closed before the lots were recorded: its statement says so (null), not [].
        #expect(try SQLiteTool.run(file, "DROP TRIGGER run_expiry_recorded_immutable_u; UPDATE run_expiry_recorded SET from_run = 3").status == 0)
        try h.reopen()
        #expect(try await jsonStatement(h, G, at.id)["expired"] is NSNull)
        // Its row gone: a breach, and no statement claims a list.
        try h.store.close()
        #expect(try SQLiteTool.run(file, "DROP TRIGGER run_expiry_recorded_immutable_d; DELETE FROM run_expiry_recorded").status == 0)
        #expect(try h.verify().breaches.contains { $0.contains("run_expiry_recorded: its row is gone") })
        try h.reopen()
        #expect(try await jsonStatement(h, G, after.id)["expired"] is NSNull)
    }

    /// A run's figures come from running totals; before anything is recorded they are
    /// confirmed against the run's own journal rows and lot moves. A journal edited since
    /// (points, kind, a row gone) or a lot move changed stops the run: nothing recorded, no
    /// notice queued. An untouched journal settles as before.
    @Test func aRunIsConfirmedAgainstItsEntriesBeforeItIsRecorded() throws {
        let file = { (h: Harness) in h.dir.url.appendingPathComponent("coalition.sqlite") }
        func edited(_ sql: String) throws -> (Harness, any Error) {
            let h = try Harness()
            _ = h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
            _ = h.post(F, "f1", Fixtures.earn("M1", 500, "F-1"))
            _ = h.post(F, "f2", Fixtures.earn("M2", 100, "F-2"))  // F-1 is not fuel's last entry (checked at every open)
            _ = h.post(C, "c1", Fixtures.redeem("M1", 1200, "C-1"))
            try h.store.close()
            #expect(try SQLiteTool.run(file(h), sql).status == 0)
            try h.reopen()
            let error = try #require(throws: SettlementError.self) { try h.store.settle() }
            #expect(try h.store.runs().isEmpty)
            #expect(try SQLiteTool.run(file(h), "SELECT COUNT(*) FROM notice").stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
            return (h, error)
        }
        let points = try edited("DROP TRIGGER journal_no_update; UPDATE journal SET points = 900 WHERE reference = 'G-1'")
        #expect("\(points.1)".contains("grocer's entries in this run add up to 900 issued and 0 redeemed points, the running totals to 1000 and 0; nothing was settled"), "\(points.1)")
        let kind = try edited("DROP TRIGGER journal_no_update; UPDATE journal SET kind = 3, original_reference = 'F-0' WHERE reference = 'F-1'")
        #expect("\(kind.1)".contains("fuel's entries in this run add up to -400 issued and 0 redeemed points, the running totals to 600 and 0"), "\(kind.1)")
        let gone = try edited("DROP TRIGGER journal_no_delete; DELETE FROM journal WHERE reference = 'F-1'")
        #expect("\(gone.1)".contains("the journal holds 1 entries of fuel in this run, the running totals 2"), "\(gone.1)")
        let move = try edited("DROP TRIGGER lot_move_no_update; UPDATE lot_move SET points = points - 1 WHERE issuer = 'fuel'")
        #expect("\(move.1)".contains("the lot moves fuel -> cinema of this run add up to 199 points, the running flows to 200"), "\(move.1)")
        // The same day untouched settles.
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 600, "C-1"))
        #expect(try h.store.settle().entryCount == 2)
    }

    /// `points_expire_after_days = 0`: points never expire, however long they wait; runs
    /// expire nothing and `verify` agrees (it used to read "never" as an overflow).
    @Test func pointsThatNeverExpire() throws {
        let h = try Harness(expireAfterDays: 0)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(F, "f1", Fixtures.earn("M1", 50, "F-1"))
        let first = try h.store.settle()
        #expect(figures(first, G)?.expiredPoints == .zero)
        h.clock.set(Instant(rfc3339: "2076-11-22T10:00:00Z")!)  // fifty years on
        #expect(try h.balance("M1") == 150)
        let redeemed = h.post(C, "c1", Fixtures.redeem("M1", 120, "C-1"))
        guard case .created(let e) = redeemed else { Issue.record("\(redeemed)"); return }
        #expect(e.memberBalance == Points(30))
        let second = try h.store.settle()
        #expect(second.partners.allSatisfy { $0.expiredPoints == .zero })
        #expect(second.flows == [Flow(issuer: F, redeemer: C, points: Points(20)), Flow(issuer: G, redeemer: C, points: Points(100))])
        try requireVerified(h, #function)
    }

    /// Every entry is accepted after the last run's cutoff, even when the clock has stepped back
    /// behind it: the period it closed never takes another entry.
    @Test func anEntryIsAcceptedAfterTheLastCutoffWhenTheClockStepsBack() throws {
        let h = try Harness()
        h.clock.set(Instant(rfc3339: "2026-11-23T12:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = try h.store.settle(through: Instant(rfc3339: "2026-11-23T11:00:00Z")!)
        _ = try h.store.settle(through: Instant(rfc3339: "2026-11-23T12:00:00Z")!)
        h.clock.set(Instant(rfc3339: "2026-11-23T11:30:00Z")!)  // behind the last cutoff, ahead of the first
        guard case .created(let e) = h.post(G, "g2", Fixtures.earn("M1", 5, "G-2")) else { Issue.record("not created"); return }
        #expect(e.acceptedAt == Instant(rfc3339: "2026-11-23T12:00:00.001Z")!)
        h.clock.set(Instant(rfc3339: "2026-11-23T13:00:00Z")!)
        #expect(try h.store.settle().entryCount == 1, "the next run takes it")
        try requireVerified(h, #function)
    }

    /// At exactly a lot's expiry instant it has expired ("at or before"): points a reversed
    /// redemption gives back to it then are not spendable, and the next run expires them.
    @Test func pointsGivenBackAtTheExpiryInstantAreNotSpendable() throws {
        let h = try dailyLotPartlyRedeemed()
        h.clock.set(Instant(rfc3339: "2026-11-23T10:00:00Z")!)  // the lot's expiry, to the millisecond
        let back = h.post(C, "c2", Fixtures.reverseRedemption("M1", 30, "C-2", of: "C-1"))
        guard case .created(let e) = back else { Issue.record("\(back)"); return }
        #expect(e.memberBalance == .zero, "the lot expired at this very instant")
        #expect(try h.balance("M1") == 0)
        let refused = h.post(C, "c3", Fixtures.redeem("M1", 1, "C-3"))
        guard case .rejected(let p) = refused else { Issue.record("\(refused)"); return }
        #expect(p.kind == .insufficientPoints)
        let run = try h.store.settle()
        #expect(figures(run, G)?.expiredPoints == Points(100))
        try requireVerified(h, #function)
    }

    /// First in, first out by acceptance, not by expiry: after the coalition shortens the
    /// life of points, a newer lot can expire before an older one; a redemption still takes
    /// the older lot first (CONTRACT §5).
    @Test func redemptionsTakeTheOldestLotEvenWhenANewerOneExpiresSooner() throws {
        let h = try Harness(expireAfterDays: 1095)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(F, "f1", Fixtures.earn("M1", 100, "F-1"))  // expires in 2029
        try h.store.close()
        h.store = try Store(dataDirectory: h.dir.url, configuration: Fixtures.configuration(expireAfterDays: 1), clock: h.clock)
        h.clock.set(Instant(rfc3339: "2026-11-22T11:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))  // expires tomorrow
        let redeemed = h.post(C, "c1", Fixtures.redeem("M1", 40, "C-1"))
        guard case .created = redeemed else { Issue.record("\(redeemed)"); return }
        let run = try h.store.settle()
        #expect(run.flows == [Flow(issuer: F, redeemer: C, points: Points(40))], "the oldest lot first: \(run.flows)")
        // A day later grocer's lot expires whole; fuel's keeps its 60.
        h.clock.set(Instant(rfc3339: "2026-11-23T12:00:00Z")!)
        let next = try h.store.settle()
        #expect(figures(next, G)?.expiredPoints == Points(100))
        #expect(try h.balance("M1") == 60)
        try requireVerified(h, #function)
    }

    /// A run expires what a lot held at its cutoff: points a reversal accepted after the
    /// cutoff gives back to an expired lot belong to the next run (the nightly
    /// `settle --through <midnight>` run after midnight), which expires them.
    @Test func pointsReturnedAfterTheCutoffAreExpiredByTheNextRun() throws {
        let h = try dailyLotPartlyRedeemed()
        _ = h.post(G, "g2", Fixtures.earn("M2", 50, "G-2"))
        _ = h.post(C, "c2", Fixtures.redeem("M2", 50, "C-2"))  // M2's lot is empty at the cutoff
        h.clock.set(Instant(rfc3339: "2026-11-23T11:00:00Z")!)  // both lots expired at 10:00
        _ = h.post(C, "c3", Fixtures.reverseRedemption("M1", 30, "C-3", of: "C-1"))
        _ = h.post(C, "c4", Fixtures.reverseRedemption("M2", 20, "C-4", of: "C-2"))
        let first = try h.store.settle(through: Instant(rfc3339: "2026-11-23T10:30:00Z")!)
        #expect(first.entryCount == 4)
        #expect(figures(first, G)?.expiredPoints == Points(70), "what the lot held at the cutoff, not the 30 given back after it")
        let afterFirst = try h.verify()
        #expect(afterFirst.ok, "\(afterFirst.breaches.prefix(3))")
        #expect(try h.balance("M1") == 0 && h.balance("M2") == 0, "points given back to an expired lot are never spendable")
        let second = try h.store.settle()
        #expect(second.entryCount == 2)
        #expect(figures(second, G)?.expiredPoints == Points(50), "the 30 and the 20 given back after the first cutoff")
        #expect(figures(second, C)?.redeemedPoints == Points(-50))
        try requireVerified(h, #function)
    }

    @Test func eachEntryFallsInExactlyOneRunAndRunsNeverChange() throws {
        let h = try Harness()
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 10, "G-1"))
        h.clock.set(Instant(rfc3339: "2026-11-22T11:00:00Z")!)
        let r1 = try h.store.settle()
        _ = h.post(G, "g2", Fixtures.earn("M1", 20, "G-2"))  // at the cutoff instant: belongs after it
        #expect(r1.entryCount == 1)
        // A second run through the same instant (a night job run twice) records nothing.
        #expect { try h.store.settle(through: Instant(rfc3339: "2026-11-22T11:00:00Z")!) } throws: { error in
            "\(error)".contains("run R000001 already closed the period through 2026-11-22T11:00:00.000Z; nothing recorded")
        }
        #expect(try h.store.runs().map(\.id) == ["R000001"])
        h.clock.set(Instant(rfc3339: "2026-11-22T12:00:00Z")!)
        let r3 = try h.store.settle()
        #expect(r3.entryCount == 1 && figures(r3, G)?.issuedPoints == Points(20))
        #expect(try h.store.runs().map(\.id) == ["R000001", "R000002"])
        #expect(throws: SettlementError.self) { try h.store.settle(through: Instant(rfc3339: "2026-11-22T11:30:00Z")!) }
        #expect(throws: SettlementError.self) { try h.store.settle(through: Instant(rfc3339: "2027-01-01T00:00:00Z")!) }
        try h.store.close()
        let coalition = h.dir.url.appendingPathComponent("coalition.sqlite")
        #expect(try SQLiteTool.run(coalition, "UPDATE run_partner SET net_minor = 0").status != 0, "a closed run never changes")
        #expect(try h.verify().ok)
        // Someone who drops the trigger and edits a run anyway is caught by verify.
        let edit = try SQLiteTool.run(
            coalition,
            "DROP TRIGGER run_partner_immutable_u; UPDATE run_partner SET issued_points = 11, payable_minor = 11, net_minor = -11 WHERE run_number = 1")
        #expect(edit.status == 0)
        let r = try h.verify()
        #expect(r.breaches.contains { $0.contains("run R000001") }, "\(r.breaches)")
    }

    /// Random streams and random cutoffs: sums over all runs equal the all-time totals of the
    /// independent model, flows into each redeemer sum to its redeemed points, Σ net + margin
    /// = 0, and verify (which recomputes every run from the raw entries) passes.
    @Test func randomStreamsAndCutoffs() throws {
        for seed in UInt64(1)...60 {
            var gen = StreamGenerator(seed: seed)
            var rng = SeededGenerator(seed: seed &* 31)
            let h = try Harness(expireAfterDays: 1)
            var model = ReferenceModel(expireAfterDays: 1, partners: [G, F, C])
            var issued: [PartnerID: Int64] = [:], redeemed: [PartnerID: Int64] = [:]
            var previousCutoff = Instant(millisecondsSinceEpoch: Int64.min)
            for _ in 0..<Int.random(in: 3...8, using: &rng) {
                postAndCompare(h, &model, (0..<Int.random(in: 1...12, using: &rng)).map { _ in gen.next() })
                h.clock.advance(milliseconds: Int64.random(in: 1...(9 * 3_600_000), using: &rng))
                // Cutoffs at or just before now, or hours back (the nightly run after
                // midnight), so that some entries fall after the cutoff, into the next run.
                let back = Bool.random(using: &rng) ? Int64.random(in: 0...1000, using: &rng) : Int64.random(in: 0...(6 * 3_600_000), using: &rng)
                let through = max(previousCutoff.millisecondsSinceEpoch + 1, h.clock.now().millisecondsSinceEpoch - back)
                let run = try h.store.settle(through: Instant(millisecondsSinceEpoch: through))
                var sumNet: Int64 = 0
                var into: [PartnerID: Int64] = [:]
                for f in run.flows { into[f.redeemer, default: 0] += f.points.value }
                for f in run.partners {
                    issued[f.partner, default: 0] += f.issuedPoints.value
                    redeemed[f.partner, default: 0] += f.redeemedPoints.value
                    sumNet += f.netMinor.value
                    #expect((into[f.partner] ?? 0) == f.redeemedPoints.value, "seed \(seed)")
                }
                #expect(sumNet + run.totals.operatorMarginMinor.value == 0)
                // An independent, straightforward recomputation from the partners' ledgers:
                // the entries accepted in (previous cutoff, cutoff], summed by kind.
                for p in [G, F, C] {
                    let rows = try h.store.ledgerEntries(p).filter { $0.acceptedAt > previousCutoff && $0.acceptedAt <= run.cutoff }
                    let iss = rows.reduce(Int64(0)) { $0 + ($1.event.kind == .earned ? $1.event.points.value : $1.event.kind == .earnReversed ? -$1.event.points.value : 0) }
                    let red = rows.reduce(Int64(0)) { $0 + ($1.event.kind == .redeemed ? $1.event.points.value : $1.event.kind == .redemptionReversed ? -$1.event.points.value : 0) }
                    #expect((figures(run, p)?.issuedPoints.value ?? 0) == iss, "seed \(seed) run \(run.id) \(p) issued")
                    #expect((figures(run, p)?.redeemedPoints.value ?? 0) == red, "seed \(seed) run \(run.id) \(p) redeemed")
                }
                let report = try h.verify()
                #expect(report.ok, "seed \(seed) run \(run.id): \(report.breaches.prefix(3))")
                previousCutoff = run.cutoff
                h.clock.advance(milliseconds: Int64.random(in: 1...3_600_000, using: &rng))
            }
            // The last run takes whatever fell after the last random cutoff.
            for f in try h.store.settle().partners {
                issued[f.partner, default: 0] += f.issuedPoints.value
                redeemed[f.partner, default: 0] += f.redeemedPoints.value
            }
            #expect(issued.values.reduce(0, +) == model.issued, "seed \(seed)")
            #expect(redeemed.values.reduce(0, +) == model.redeemed, "seed \(seed)")
            let r = try h.verify()
            #expect(r.ok, "seed \(seed): \(r.breaches.prefix(3))")
        }
    }
}
