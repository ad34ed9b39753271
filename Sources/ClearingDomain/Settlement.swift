/// The settlement math of CONTRACT §6, over integers only.

/// One partner's figures in one run.
public struct PartnerFigures: Equatable, Sendable {
    public var partner: PartnerID
    /// earned − earn_reversed at this partner, in the run (may be negative).
    public var issuedPoints: Points
    /// redeemed − redemption_reversed at this partner, in the run (may be negative).
    public var redeemedPoints: Points
    /// Points of this partner's lots expired by this run.
    public var expiredPoints: Points
    public var payableMinor: MoneyMinor
    public var receivableMinor: MoneyMinor
    /// receivable − payable: > 0, the coalition pays the partner.
    public var netMinor: MoneyMinor

    public init(partner: PartnerID, issued: Points, redeemed: Points, expired: Points, terms: PartnerTerms) throws(ArithmeticOverflow) {
        self.partner = partner
        issuedPoints = issued
        redeemedPoints = redeemed
        expiredPoints = expired
        payableMinor = try Rounding.priceOf(issued, per1000: terms.issuePricePer1000)
        receivableMinor = try Rounding.priceOf(redeemed, per1000: terms.redeemCreditPer1000)
        netMinor = try receivableMinor.subtracting(payableMinor)
    }

    public init(
        partner: PartnerID, issuedPoints: Points, redeemedPoints: Points, expiredPoints: Points,
        payableMinor: MoneyMinor, receivableMinor: MoneyMinor, netMinor: MoneyMinor
    ) {
        self.partner = partner
        self.issuedPoints = issuedPoints
        self.redeemedPoints = redeemedPoints
        self.expiredPoints = expiredPoints
        self.payableMinor = payableMinor
        self.receivableMinor = receivableMinor
        self.netMinor = netMinor
    }

    /// Nothing happened for this partner in the run.
    public var isEmpty: Bool {
        issuedPoints == .zero && redeemedPoints == .zero && expiredPoints == .zero && netMinor == .zero
    }
}

/// Points that moved from an issuer's lots to a redeemer in a run (net of reversals).
public struct Flow: Equatable, Sendable {
    public var issuer: PartnerID
    public var redeemer: PartnerID
    public var points: Points

    public init(issuer: PartnerID, redeemer: PartnerID, points: Points) {
        self.issuer = issuer
        self.redeemer = redeemer
        self.points = points
    }

    /// `{"issuer":...,"redeemer":...,"points":...}` (CONTRACT §6; also in statements).
    public var json: String {
        var w = JSONWriter()
        w.string("issuer", issuer.rawValue)
        w.string("redeemer", redeemer.rawValue)
        w.int("points", points.value)
        return w.finish()
    }
}

/// A run's totals, derived from its partners' figures.
public struct RunTotals: Equatable, Sendable {
    /// −Σ net: what the operator keeps.
    public var operatorMarginMinor: MoneyMinor
    /// Σ |payable| + Σ |receivable|: what would move without netting.
    public var grossMinor: MoneyMinor
    /// Σ |net|: what moves with netting.
    public var netTransfersMinor: MoneyMinor
    /// 1 − net transfers / gross, in millionths, rounded half to even; 0 when gross is 0.
    public var nettingEfficiencyPPM: Int64

    public init(_ partners: [PartnerFigures]) throws(ArithmeticOverflow) {
        var sumNet = MoneyMinor.zero, gross = MoneyMinor.zero, transfers = MoneyMinor.zero
        for p in partners {
            sumNet = try sumNet.adding(p.netMinor)
            gross = try gross.adding(p.payableMinor.magnitude()).adding(p.receivableMinor.magnitude())
            transfers = try transfers.adding(p.netMinor.magnitude())
        }
        operatorMarginMinor = try sumNet.negated()
        grossMinor = gross
        netTransfersMinor = transfers
        if gross.value == 0 {
            nettingEfficiencyPPM = 0
        } else {
            // In 128 bits: transfers × 10^6 cannot overflow there. Σ|net| ≤ Σ|payable| + Σ|receivable|,
            // so the quotient is at most 10^6.
            let ratio = Rounding.divideRoundingHalfEven(Int128(transfers.value) * 1_000_000, by: Int128(gross.value))
            guard let ppm = Int64(exactly: ratio), (0...1_000_000).contains(ppm) else {
                throw ArithmeticOverflow("netting efficiency of \(transfers.value) / \(gross.value)")
            }
            nettingEfficiencyPPM = 1_000_000 - ppm
        }
    }

    /// `netting_efficiency` in `settle --json`: 1 − net_transfers_minor / gross_minor, computed
    /// exactly in integers (no floating point near money) and written with up to 18 decimals,
    /// rounded half to even, trailing zeros dropped (`0.666666666666666667`, `0.4`; `0.0` when
    /// gross is 0). Read back as a binary64 number, it is the nearest one to the exact ratio:
    /// within a unit in the last place of what a reader computes as `1 - n / g`. The stored and
    /// verified figure is the integer `nettingEfficiencyPPM`.
    public var nettingEfficiencyJSON: String {
        guard grossMinor.value > 0 else { return "0.0" }
        // In 128 bits: (gross − transfers) × 10^18 < 9.3·10^36; transfers ≤ gross.
        let scaled = Rounding.divideRoundingHalfEven(
            Int128(grossMinor.value - netTransfersMinor.value) * 1_000_000_000_000_000_000, by: Int128(grossMinor.value))
        return RunTotals.decimal(scaled, places: 18, trimmed: true)
    }

    /// `netting_efficiency` for people (the operator's table, exports), with six decimals,
    /// rounded half to even, e.g. `0.812500`.
    public var nettingEfficiencyText: String { RunTotals.decimal(Int128(nettingEfficiencyPPM), places: 6, trimmed: false) }

    /// A non-negative value given in units of 10^-places, written as a decimal: all `places`
    /// digits, or without its trailing zeros (at least one digit after the point).
    static func decimal(_ scaled: Int128, places: Int, trimmed: Bool) -> String {
        var unit: Int128 = 1
        for _ in 0..<places { unit *= 10 }
        let digits = String(scaled % unit)
        var fraction = String(repeating: "0", count: places - digits.count) + digits
        if trimmed {
            while fraction.count > 1 && fraction.hasSuffix("0") { fraction.removeLast() }
        }
        return "\(scaled / unit).\(fraction)"
    }
}
