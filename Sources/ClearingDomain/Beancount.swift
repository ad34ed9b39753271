/// The coalition's books as a Beancount ledger (issue 6): deferred-revenue accounting of points.
///
/// - Issuing points: the issuer owes the coalition `payable`, and the coalition owes the points'
///   value (their issue price) until they are redeemed or expire:
///   `Assets:Partners:<issuer>` +payable, `Liabilities:Points:Outstanding` −payable.
/// - Redeeming: the redeemed points leave the liability at the value they were issued at (the
///   run's flows say whose points they were), the coalition owes the redeemer `receivable`, and
///   the difference is the coalition's margin:
///   `Liabilities:Points:Outstanding` +value, `Assets:Partners:<redeemer>` −receivable,
///   `Income:Margin` −(value − receivable).
/// - Expiry: the expired points' value leaves the liability as `Income:Breakage`.
/// So `Assets:Partners:<P>` is −Σ net (> 0: the partner owes the coalition), the liability is the
/// value of the points still outstanding, and margin + breakage + the liability's change is the
/// operator's margin of each run. Points are valued at their issuer's price of the run that
/// settles them (the last recorded one when the issuer has no figures in that run).
public enum BeancountExport {
    /// Decimal places of a currency's minor unit (ISO 4217; two unless listed).
    public static func exponent(_ currency: String) -> Int {
        switch currency {
        case "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF": 0
        case "BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND": 3
        case "CLF", "UYW": 4
        default: 2
        }
    }

    /// Minor units as a decimal amount: 123456 → "1234.56" (EUR).
    public static func amount(_ minor: Int64, _ currency: String) -> String {
        let e = exponent(currency)
        let sign = minor < 0 ? "-" : ""
        let magnitude = minor.magnitude
        guard e > 0 else { return sign + String(magnitude) }
        var unit: UInt64 = 1
        for _ in 0..<e { unit *= 10 }
        let fraction = String(magnitude % unit)
        return sign + String(magnitude / unit) + "." + String(repeating: "0", count: e - fraction.count) + fraction
    }

    /// `freshmart` → `Assets:Partners:Freshmart` (components start with a capital or a digit).
    public static func partnerAccount(_ p: PartnerID) -> String {
        let id = p.rawValue
        return "Assets:Partners:" + id.prefix(1).uppercased() + id.dropFirst()
    }

    public static let liability = "Liabilities:Points:Outstanding"
    public static let breakage = "Income:Breakage"
    public static let margin = "Income:Margin"

    /// One closed run, as the export sees it.
    public struct Run: Sendable {
        public var id: String
        public var cutoff: Instant
        public var partners: [PartnerFigures]
        public var issuePrices: [PartnerID: MoneyMinor]
        public var flows: [Flow]
        public var operatorMarginMinor: MoneyMinor
        public var nettingEfficiency: String

        public init(
            id: String, cutoff: Instant, partners: [PartnerFigures], issuePrices: [PartnerID: MoneyMinor], flows: [Flow],
            operatorMarginMinor: MoneyMinor, nettingEfficiency: String
        ) {
            self.id = id
            self.cutoff = cutoff
            self.partners = partners
            self.issuePrices = issuePrices
            self.flows = flows
            self.operatorMarginMinor = operatorMarginMinor
            self.nettingEfficiency = nettingEfficiency
        }
    }

    /// The whole ledger, with balance assertions after each day of runs (bean-check checks them).
    /// `prices`: each partner's issue price to fall back on before its first run with figures.
    public static func ledger(
        runs: [Run], currency: String, prices: [PartnerID: MoneyMinor], generatedAt: Instant
    ) throws(ArithmeticOverflow) -> String {
        var out = """
            ; The books of the Clearhouse coalition, exported \(generatedAt.rfc3339) by `clearhouse export --format beancount`.
            ; Amounts in \(currency); points are carried at what their issuer was charged for them (average cost per issuer).
            option "title" "Clearhouse coalition"
            option "operating_currency" "\(currency)"

            """
        let opened = runs.first.map { day($0.cutoff) } ?? day(generatedAt)
        var everyone = Set(prices.keys)
        for r in runs { for f in r.partners { everyone.insert(f.partner) } }
        for p in everyone.sorted() { out += "\(opened) open \(partnerAccount(p)) \(currency)\n" }
        out += "\(opened) open \(liability) \(currency)\n\(opened) open \(margin) \(currency)\n\(opened) open \(breakage) \(currency)\n"
        var price = prices
        // Each issuer's points outstanding and what they were booked at (their carrying value):
        // points leave the liability (redeemed, expired) at their average booked cost, not at
        // today's price, so a price change moves no value between the liability and income, and
        // the last point out takes the last cent with it.
        var held: [PartnerID: Int64] = [:], carried: [PartnerID: MoneyMinor] = [:]
        func release(_ k: Points, of issuer: PartnerID) throws(ArithmeticOverflow) -> MoneyMinor {
            let h = held[issuer] ?? 0, c = carried[issuer] ?? .zero
            let value: MoneyMinor
            if k.value == h {
                value = c
            } else if h > 0 {
                guard let v = Int64(exactly: Rounding.divideRoundingHalfEven(Int128(c.value) * Int128(k.value), by: Int128(h))) else {
                    throw ArithmeticOverflow("\(k.value) of \(h) points carried at \(c.value)")
                }
                value = MoneyMinor(v)
            } else {
                value = try Rounding.priceOf(k, per1000: price[issuer] ?? .zero)  // nothing booked to take from
            }
            let (left, overflow) = h.subtractingReportingOverflow(k.value)
            if overflow { throw ArithmeticOverflow("\(h) - \(k.value) points") }
            held[issuer] = left
            carried[issuer] = try c.subtracting(value)
            return value
        }
        var balances: [String: MoneyMinor] = [:]
        func post(_ account: String, _ v: MoneyMinor) throws(ArithmeticOverflow) -> String {
            balances[account] = try (balances[account] ?? .zero).adding(v)
            return v == .zero ? "" : "  \(account)  \(amount(v.value, currency)) \(currency)\n"
        }
        func transaction(_ date: String, _ run: String, _ partner: PartnerID, _ text: String, _ lines: String) -> String {
            lines.isEmpty ? "" : "\(date) * \"Clearhouse\" \"Run \(run): \(text)\"\n  run: \"\(run)\"\n  partner: \"\(partner)\"\n" + lines
        }
        for (i, run) in runs.enumerated() {
            let date = day(run.cutoff)
            for (p, v) in run.issuePrices { price[p] = v }
            out += "\n; Run \(run.id), cutoff \(run.cutoff.rfc3339): operator margin \(amount(run.operatorMarginMinor.value, currency)) \(currency), netting efficiency \(run.nettingEfficiency)\n"
            for f in run.partners where f.issuedPoints != .zero || f.payableMinor != .zero {
                let lines: String
                if f.issuedPoints.value >= 0 {
                    let (points, overflow) = (held[f.partner] ?? 0).addingReportingOverflow(f.issuedPoints.value)
                    if overflow { throw ArithmeticOverflow("points outstanding of \(f.partner)") }
                    held[f.partner] = points
                    carried[f.partner] = try (carried[f.partner] ?? .zero).adding(f.payableMinor)
                    lines = try post(partnerAccount(f.partner), f.payableMinor) + post(liability, MoneyMinor(0).subtracting(f.payableMinor))
                } else {
                    // More earns reversed than made in the run: the points leave the liability
                    // at their booked cost, the partner is credited at the run's price (its
                    // negative payable), and the difference is the coalition's margin.
                    let (reversed, overflow) = Int64(0).subtractingReportingOverflow(f.issuedPoints.value)
                    if overflow { throw ArithmeticOverflow("points reversed by \(f.partner)") }
                    let value = try release(Points(reversed), of: f.partner)
                    lines = try post(partnerAccount(f.partner), f.payableMinor) + post(liability, value)
                        + post(margin, MoneyMinor(0).subtracting(f.payableMinor).subtracting(value))
                }
                out += transaction(date, run.id, f.partner, "\(f.partner) issued \(f.issuedPoints.value) points", lines)
            }
            // Each redeemer's flows, in the run's order (grouped once: not every flow for every partner).
            let flowsInto = Dictionary(grouping: run.flows, by: \.redeemer)
            for f in run.partners where f.redeemedPoints != .zero || f.receivableMinor != .zero {
                // The redeemed points, valued at what their issuers were charged for them.
                var value = MoneyMinor.zero
                for flow in flowsInto[f.partner] ?? [] {
                    value = try value.adding(release(flow.points, of: flow.issuer))
                }
                let lines = try post(liability, value) + post(partnerAccount(f.partner), MoneyMinor(0).subtracting(f.receivableMinor))
                    + post(margin, f.receivableMinor.subtracting(value))
                out += transaction(date, run.id, f.partner, "\(f.redeemedPoints.value) points redeemed at \(f.partner)", lines)
            }
            for f in run.partners where f.expiredPoints != .zero {
                let value = try release(f.expiredPoints, of: f.partner)
                let lines = try post(liability, value) + post(breakage, MoneyMinor(0).subtracting(value))
                out += transaction(date, run.id, f.partner, "breakage, \(f.expiredPoints.value) points issued by \(f.partner) expired", lines)
            }
            // Balance assertions hold at the start of a day: after the last run of this day.
            if i == runs.count - 1 || day(runs[i + 1].cutoff) != date {
                let next = try nextDay(run.cutoff)
                for account in balances.keys.sorted() {
                    out += "\(next) balance \(account)  \(amount(balances[account]!.value, currency)) \(currency)\n"
                }
            }
        }
        return out
    }

    static func day(_ t: Instant) -> String { String(t.rfc3339.prefix(10)) }

    static func nextDay(_ t: Instant) throws(ArithmeticOverflow) -> String { day(try t.adding(days: 1)) }
}
