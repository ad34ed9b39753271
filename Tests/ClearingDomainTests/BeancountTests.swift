import ClearhouseTestSupport
import ClearingDomain
import Foundation
import Testing

@Suite struct BeancountTests {
    @Test func amountsUseTheCurrencysMinorUnit() {
        #expect(BeancountExport.amount(123_456, "EUR") == "1234.56")
        #expect(BeancountExport.amount(-5, "EUR") == "-0.05")
        #expect(BeancountExport.amount(0, "EUR") == "0.00")
        #expect(BeancountExport.amount(-1234, "JPY") == "-1234")
        #expect(BeancountExport.amount(1_234_567, "KWD") == "1234.567")
        #expect(BeancountExport.amount(Int64.min, "EUR") == "-92233720368547758.08")
        #expect(BeancountExport.partnerAccount(PartnerID("fuel-co")!) == "Assets:Partners:Fuel-co")
    }

    @Test func runsBecomeBalancedTransactionsWithMarginBreakageAndAssertions() throws {
        let g = PartnerID("grocer")!, c = PartnerID("cinema")!
        let t1 = Instant(rfc3339: "2026-11-22T23:00:00Z")!, t2 = Instant(rfc3339: "2026-11-23T23:00:00Z")!
        // Day one: grocer issues 1000 points (10.00); 400 of them are redeemed at cinema, which is
        // credited 4.40 for points sold at 4.00.
        let run1 = BeancountExport.Run(
            id: "R000001", cutoff: t1,
            partners: [
                PartnerFigures(partner: g, issuedPoints: Points(1000), redeemedPoints: .zero, expiredPoints: .zero,
                               payableMinor: MoneyMinor(1000), receivableMinor: .zero, netMinor: MoneyMinor(-1000)),
                PartnerFigures(partner: c, issuedPoints: .zero, redeemedPoints: Points(400), expiredPoints: .zero,
                               payableMinor: .zero, receivableMinor: MoneyMinor(440), netMinor: MoneyMinor(440)),
            ],
            issuePrices: [g: MoneyMinor(1000), c: MoneyMinor(1200)], flows: [Flow(issuer: g, redeemer: c, points: Points(400))],
            operatorMarginMinor: MoneyMinor(560), nettingEfficiency: "0.000000")
        // Day two: the other 600 expire.
        let run2 = BeancountExport.Run(
            id: "R000002", cutoff: t2,
            partners: [PartnerFigures(partner: g, issuedPoints: .zero, redeemedPoints: .zero, expiredPoints: Points(600),
                                      payableMinor: .zero, receivableMinor: .zero, netMinor: .zero)],
            issuePrices: [g: MoneyMinor(1000)], flows: [], operatorMarginMinor: .zero, nettingEfficiency: "0.000000")
        let text = try BeancountExport.ledger(runs: [run1, run2], currency: "EUR", prices: [g: MoneyMinor(1000), c: MoneyMinor(1200)], generatedAt: t2)
        #expect(text.contains("2026-11-22 open Assets:Partners:Grocer EUR"))
        #expect(text.contains("  Assets:Partners:Grocer  10.00 EUR\n  Liabilities:Points:Outstanding  -10.00 EUR\n"))
        #expect(text.contains("  Liabilities:Points:Outstanding  4.00 EUR\n  Assets:Partners:Cinema  -4.40 EUR\n  Income:Margin  0.40 EUR\n"))
        #expect(text.contains("operator margin 5.60 EUR"))
        #expect(text.contains("2026-11-23 balance Assets:Partners:Grocer  10.00 EUR"))
        #expect(text.contains("2026-11-23 balance Liabilities:Points:Outstanding  -6.00 EUR"), "600 points outstanding at 1.00 per 100")
        #expect(text.contains("  Liabilities:Points:Outstanding  6.00 EUR\n  Income:Breakage  -6.00 EUR\n"))
        #expect(text.contains("2026-11-24 balance Liabilities:Points:Outstanding  0.00 EUR"), "nothing outstanding")
        #expect(text.contains("2026-11-24 balance Income:Breakage  -6.00 EUR"))
        #expect(text.contains("2026-11-24 balance Income:Margin  0.40 EUR"))
        // And Beancount itself agrees: every transaction balances, every assertion holds.
        #expect(try beanCheck(text) == 0)
    }

    /// Points leave the liability at what their issuer was charged for them (average cost per
    /// issuer), not at a price set since: the liability stays the booked value of the points
    /// outstanding, and the last point out takes the last cent with it.
    @Test func pointsLeaveTheLiabilityAtTheirBookedCost() throws {
        let g = PartnerID("grocer")!, c = PartnerID("cinema")!
        func figures(_ p: PartnerID, issued: Int64 = 0, redeemed: Int64 = 0, expired: Int64 = 0, payable: Int64 = 0, receivable: Int64 = 0) -> PartnerFigures {
            PartnerFigures(partner: p, issuedPoints: Points(issued), redeemedPoints: Points(redeemed), expiredPoints: Points(expired),
                           payableMinor: MoneyMinor(payable), receivableMinor: MoneyMinor(receivable), netMinor: MoneyMinor(receivable - payable))
        }
        let day = { (d: Int) in Instant(rfc3339: "2026-11-2\(d)T23:00:00Z")! }
        // Run 1: grocer issues 1000 points at 10.00 per 1000. Its price then doubles; run 2:
        // it issues 1 more (0.02), and cinema redeems 1000 (credited 9.50). Run 3: the last point expires.
        let runs = [
            BeancountExport.Run(id: "R000001", cutoff: day(1), partners: [figures(g, issued: 1000, payable: 1000)],
                                issuePrices: [g: MoneyMinor(1000)], flows: [], operatorMarginMinor: MoneyMinor(1000), nettingEfficiency: "0.000000"),
            BeancountExport.Run(id: "R000002", cutoff: day(2), partners: [figures(g, issued: 1, payable: 2), figures(c, redeemed: 1000, receivable: 950)],
                                issuePrices: [g: MoneyMinor(2000), c: MoneyMinor(1000)], flows: [Flow(issuer: g, redeemer: c, points: Points(1000))],
                                operatorMarginMinor: MoneyMinor(-948), nettingEfficiency: "0.000000"),
            BeancountExport.Run(id: "R000003", cutoff: day(3), partners: [figures(g, expired: 1)],
                                issuePrices: [g: MoneyMinor(2000)], flows: [], operatorMarginMinor: .zero, nettingEfficiency: "0.000000"),
        ]
        let text = try BeancountExport.ledger(runs: runs, currency: "EUR", prices: [g: MoneyMinor(1000), c: MoneyMinor(1000)], generatedAt: day(3))
        // 1001 points carried at 10.02: the 1000 redeemed leave at 10.01 (not at today's 20.00).
        #expect(text.contains("  Liabilities:Points:Outstanding  10.01 EUR\n  Assets:Partners:Cinema  -9.50 EUR\n  Income:Margin  -0.51 EUR\n"), "\(text)")
        #expect(text.contains("2026-11-23 balance Liabilities:Points:Outstanding  -0.01 EUR"))
        #expect(text.contains("2026-11-23 balance Income:Margin  -0.51 EUR"), "liability + margin = -(10.00 - 9.48) of operator margin")
        // The last point out takes the last cent: nothing outstanding, nothing left in the liability.
        #expect(text.contains("  Liabilities:Points:Outstanding  0.01 EUR\n  Income:Breakage  -0.01 EUR\n"))
        #expect(text.contains("2026-11-24 balance Liabilities:Points:Outstanding  0.00 EUR"))
        #expect(try beanCheck(text) == 0)
    }

    /// An earn reversed in a later run, after the price changed: the points leave the liability
    /// at their booked cost, the partner gets the run's price back, and the difference is
    /// margin; nothing outstanding, nothing left in the liability. (Also with rounding only.)
    @Test func earnsReversedInALaterRunLeaveAtTheirBookedCost() throws {
        let f = PartnerID("fuel")!
        func run(_ n: Int, issued: Int64, payable: Int64, price: Int64) -> BeancountExport.Run {
            BeancountExport.Run(
                id: "R00000\(n)", cutoff: Instant(rfc3339: "2026-11-2\(n)T23:00:00Z")!,
                partners: [PartnerFigures(partner: f, issuedPoints: Points(issued), redeemedPoints: .zero, expiredPoints: .zero,
                                          payableMinor: MoneyMinor(payable), receivableMinor: .zero, netMinor: MoneyMinor(-payable))],
                issuePrices: [f: MoneyMinor(price)], flows: [], operatorMarginMinor: MoneyMinor(payable), nettingEfficiency: "0.000000")
        }
        // 1000 points at 10.00, reversed after the price doubled (the partner gets 20.00 back).
        let priced = try BeancountExport.ledger(
            runs: [run(1, issued: 1000, payable: 1000, price: 1000), run(2, issued: -1000, payable: -2000, price: 2000)],
            currency: "EUR", prices: [f: MoneyMinor(1000)], generatedAt: Instant(rfc3339: "2026-11-23T00:00:00Z")!)
        #expect(priced.contains("  Assets:Partners:Fuel  -20.00 EUR\n  Liabilities:Points:Outstanding  10.00 EUR\n  Income:Margin  10.00 EUR\n"), "\(priced)")
        #expect(priced.contains("2026-11-23 balance Liabilities:Points:Outstanding  0.00 EUR"))
        #expect(try beanCheck(priced) == 0)
        // Price 0.50 per 1000: 3 points booked at 0.00 (rounded), then reversed 1 and 2.
        let rounded = try BeancountExport.ledger(
            runs: [run(1, issued: 3, payable: 2, price: 500), run(2, issued: -1, payable: 0, price: 500), run(3, issued: -2, payable: -1, price: 500)],
            currency: "EUR", prices: [f: MoneyMinor(500)], generatedAt: Instant(rfc3339: "2026-11-24T00:00:00Z")!)
        #expect(rounded.contains("2026-11-24 balance Liabilities:Points:Outstanding  0.00 EUR"), "\(rounded)")
        #expect(try beanCheck(rounded) == 0)
    }

    /// `bean-check`'s exit status on `text`.
    func beanCheck(_ text: String) throws -> Int32 {
        let dir = TemporaryDirectory("clearhouse-beancount")
        defer { dir.remove() }
        let file = dir.url.appendingPathComponent("books.beancount")
        try text.write(to: file, atomically: true, encoding: .utf8)
        let check = Process()
        check.executableURL = URL(fileURLWithPath: NoticeReceiver.python).deletingLastPathComponent().appendingPathComponent("bean-check")
        check.arguments = [file.path]
        try check.run()
        check.waitUntilExit()
        return check.terminationStatus
    }
}
