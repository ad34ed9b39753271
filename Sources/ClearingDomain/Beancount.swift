/// The coalition's books as a Beancount ledger (issue 6): deferred-revenue accounting of points.
///
/// - Issuing points: the issuer owes the coalition `payable` and the coalition owes the points'
///   value to whoever will redeem them: `Assets:Partners:<P>` up, `Liabilities:Points:Outstanding` up.
/// - Redeeming: the coalition owes the redeemer `receivable`, and that much of the points
///   liability is settled: `Assets:Partners:<P>` down, the liability down.
/// - Expiry: the expired points' value (at the issuer's price of the day) leaves the liability as
///   `Income:Breakage`.
/// So `Assets:Partners:<P>` is −Σ net (> 0: the partner owes the coalition), the liability plus
/// breakage is Σ margin, and every transaction balances.
public enum BeancountExport {
    /// Decimal places of a currency's minor unit (ISO 4217; two unless listed).
    public static func exponent(_ currency: String) -> Int {
        switch currency {
        case "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF": 0
        case "BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND": 3
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

    /// One closed run, as the export sees it.
    public struct Run: Sendable {
        public var id: String
        public var cutoff: Instant
        public var partners: [PartnerFigures]
        public var issuePrices: [PartnerID: MoneyMinor]
        public var operatorMarginMinor: MoneyMinor
        public var nettingEfficiency: String

        public init(
            id: String, cutoff: Instant, partners: [PartnerFigures], issuePrices: [PartnerID: MoneyMinor], operatorMarginMinor: MoneyMinor,
            nettingEfficiency: String
        ) {
            self.id = id
            self.cutoff = cutoff
            self.partners = partners
            self.issuePrices = issuePrices
            self.operatorMarginMinor = operatorMarginMinor
            self.nettingEfficiency = nettingEfficiency
        }
    }

    /// The whole ledger, with balance assertions after each day of runs (bean-check checks them).
    public static func ledger(runs: [Run], currency: String, partners: [PartnerID], generatedAt: Instant) throws(ArithmeticOverflow) -> String {
        var out = """
            ; The books of the Clearhouse coalition, exported \(generatedAt.rfc3339) by `clearhouse export --format beancount`.
            ; Amounts in \(currency); points are valued at the issuer's price of the day.
            option "title" "Clearhouse coalition"
            option "operating_currency" "\(currency)"

            """
        let opened = runs.first.map { day($0.cutoff) } ?? day(generatedAt)
        var everyone = Set(partners)
        for r in runs { for f in r.partners { everyone.insert(f.partner) } }
        for p in everyone.sorted() { out += "\(opened) open \(partnerAccount(p)) \(currency)\n" }
        out += "\(opened) open \(liability) \(currency)\n\(opened) open \(breakage) \(currency)\n"
        var owed: [PartnerID: MoneyMinor] = [:]
        var outstanding = MoneyMinor.zero, broken = MoneyMinor.zero
        for (i, run) in runs.enumerated() {
            let date = day(run.cutoff)
            out += "\n; Run \(run.id), cutoff \(run.cutoff.rfc3339): operator margin \(amount(run.operatorMarginMinor.value, currency)) \(currency), netting efficiency \(run.nettingEfficiency)\n"
            for f in run.partners {
                let owes = try f.payableMinor.subtracting(f.receivableMinor)
                owed[f.partner] = try (owed[f.partner] ?? .zero).adding(owes)
                outstanding = try outstanding.adding(f.payableMinor).subtracting(f.receivableMinor)
                guard f.payableMinor != .zero || f.receivableMinor != .zero else { continue }
                out += "\(date) * \"Clearhouse\" \"Run \(run.id): \(f.partner) issued \(f.issuedPoints.value), redeemed \(f.redeemedPoints.value) points\"\n"
                out += "  run: \"\(run.id)\"\n  partner: \"\(f.partner)\"\n"
                if owes != .zero { out += "  \(partnerAccount(f.partner))  \(amount(owes.value, currency)) \(currency)\n" }
                if f.payableMinor != .zero { out += "  \(liability)  \(amount(-f.payableMinor.value, currency)) \(currency)\n" }
                if f.receivableMinor != .zero { out += "  \(liability)  \(amount(f.receivableMinor.value, currency)) \(currency)\n" }
            }
            for f in run.partners where f.expiredPoints != .zero {
                let value = try Rounding.priceOf(f.expiredPoints, per1000: run.issuePrices[f.partner] ?? .zero)
                guard value != .zero else { continue }
                broken = try broken.adding(value)
                outstanding = try outstanding.subtracting(value)
                out += "\(date) * \"Clearhouse\" \"Run \(run.id): breakage, \(f.expiredPoints.value) points issued by \(f.partner) expired\"\n"
                out += "  run: \"\(run.id)\"\n  partner: \"\(f.partner)\"\n"
                out += "  \(liability)  \(amount(value.value, currency)) \(currency)\n"
                out += "  \(breakage)  \(amount(-value.value, currency)) \(currency)\n"
            }
            // Balance assertions hold at the start of a day: after the last run of this day.
            if i == runs.count - 1 || day(runs[i + 1].cutoff) != date {
                let next = try nextDay(run.cutoff)
                for p in owed.keys.sorted() { out += "\(next) balance \(partnerAccount(p))  \(amount(owed[p]!.value, currency)) \(currency)\n" }
                out += "\(next) balance \(liability)  \(amount(-outstanding.value, currency)) \(currency)\n"
                out += "\(next) balance \(breakage)  \(amount(-broken.value, currency)) \(currency)\n"
            }
        }
        return out
    }

    static func day(_ t: Instant) -> String { String(t.rfc3339.prefix(10)) }

    static func nextDay(_ t: Instant) throws(ArithmeticOverflow) -> String { day(try t.adding(days: 1)) }
}
