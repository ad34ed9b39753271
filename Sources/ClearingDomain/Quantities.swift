/// Points and money: `Int64` in named types. Arithmetic is checked; overflow is an error,
/// never a wrap (CONTRACT §1, §6).

public struct ArithmeticOverflow: Error, Equatable, Sendable, CustomStringConvertible {
    public let operation: String
    public init(_ operation: String) { self.operation = operation }
    public var description: String { "arithmetic overflow in \(operation)" }
}

public struct Points: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let value: Int64
    public init(_ value: Int64) { self.value = value }
    public static let zero = Points(0)

    public static func < (a: Points, b: Points) -> Bool { a.value < b.value }
    public var description: String { String(value) }

    public func adding(_ other: Points) throws(ArithmeticOverflow) -> Points {
        let (r, o) = value.addingReportingOverflow(other.value)
        if o { throw ArithmeticOverflow("points \(value) + \(other.value)") }
        return Points(r)
    }

    public func subtracting(_ other: Points) throws(ArithmeticOverflow) -> Points {
        let (r, o) = value.subtractingReportingOverflow(other.value)
        if o { throw ArithmeticOverflow("points \(value) - \(other.value)") }
        return Points(r)
    }
}

/// An amount of money in minor units (cents) of the coalition's currency.
public struct MoneyMinor: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let value: Int64
    public init(_ value: Int64) { self.value = value }
    public static let zero = MoneyMinor(0)

    public static func < (a: MoneyMinor, b: MoneyMinor) -> Bool { a.value < b.value }
    public var description: String { String(value) }

    public func adding(_ other: MoneyMinor) throws(ArithmeticOverflow) -> MoneyMinor {
        let (r, o) = value.addingReportingOverflow(other.value)
        if o { throw ArithmeticOverflow("money \(value) + \(other.value)") }
        return MoneyMinor(r)
    }

    public func subtracting(_ other: MoneyMinor) throws(ArithmeticOverflow) -> MoneyMinor {
        let (r, o) = value.subtractingReportingOverflow(other.value)
        if o { throw ArithmeticOverflow("money \(value) - \(other.value)") }
        return MoneyMinor(r)
    }

    public func negated() throws(ArithmeticOverflow) -> MoneyMinor {
        if value == .min { throw ArithmeticOverflow("money -(\(value))") }
        return MoneyMinor(-value)
    }

    public func magnitude() throws(ArithmeticOverflow) -> MoneyMinor {
        value < 0 ? try negated() : self
    }
}

public enum Rounding {
    /// `round(points × pricePer1000 / 1000)`, to the nearest integer with ties to even,
    /// computed exactly in integers (CONTRACT §6). Points may be negative (reversals that
    /// outweigh earns in a run); the price is non-negative.
    /// The product is formed in 128 bits (it cannot overflow there), so only a result that does
    /// not fit in Int64 is an overflow, never an intermediate one.
    public static func priceOf(_ points: Points, per1000 price: MoneyMinor) throws(ArithmeticOverflow) -> MoneyMinor {
        let exact = divideRoundingHalfEven(Int128(points.value) * Int128(price.value), by: 1000)
        guard let minor = Int64(exactly: exact) else { throw ArithmeticOverflow("\(points.value) points × \(price.value) per 1000") }
        return MoneyMinor(minor)
    }

    /// Integer division of `n` by a positive `d`, rounded to nearest, ties to even.
    public static func divideRoundingHalfEven<T: FixedWidthInteger & SignedInteger>(_ n: T, by d: T) -> T {
        precondition(d > 0, "divisor must be positive")
        var q = n / d  // truncates toward zero
        var r = n % d  // same sign as n
        if r < 0 { q -= 1; r += d }  // now floor division: n = q·d + r, 0 <= r < d
        let twice = r.multipliedReportingOverflow(by: 2)
        // r < d, so 2r overflows only when d is near Int64.max; compare without doubling then.
        let cmp: Int
        if twice.overflow { cmp = r > d - r ? 1 : (r == d - r ? 0 : -1) } else { cmp = twice.partialValue > d ? 1 : (twice.partialValue == d ? 0 : -1) }
        if cmp > 0 || (cmp == 0 && q % 2 != 0) { q += 1 }
        return q
    }
}
