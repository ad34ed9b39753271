/// An instant in UTC, in whole milliseconds since the Unix epoch. RFC 3339 in and out,
/// done by hand so that parsing is strict and formatting is fixed: `2026-11-22T10:00:01.123Z`.
public struct Instant: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let millisecondsSinceEpoch: Int64

    public init(millisecondsSinceEpoch: Int64) { self.millisecondsSinceEpoch = millisecondsSinceEpoch }

    public static func < (a: Instant, b: Instant) -> Bool { a.millisecondsSinceEpoch < b.millisecondsSinceEpoch }

    public var description: String { rfc3339 }

    public func adding(days: Int64) throws(ArithmeticOverflow) -> Instant {
        let (ms, o1) = days.multipliedReportingOverflow(by: 86_400_000)
        let (sum, o2) = millisecondsSinceEpoch.addingReportingOverflow(ms)
        if o1 || o2 { throw ArithmeticOverflow("instant + \(days) days") }
        return Instant(millisecondsSinceEpoch: sum)
    }

    // MARK: Formatting

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`, always with milliseconds and `Z`.
    public var rfc3339: String {
        let t = civilTime
        return "\(pad(t.year, 4))-\(pad(t.month, 2))-\(pad(t.day, 2))T\(pad(t.hour, 2)):\(pad(t.minute, 2)):\(pad(t.second, 2)).\(pad(t.millisecond, 3))Z"
    }

    /// The IMF-fixdate of HTTP's `date` header (RFC 9110 §5.6.7), to the second:
    /// `Sun, 06 Nov 1994 08:49:37 GMT`.
    public var httpDate: String {
        let t = civilTime
        let weekdays = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]  // 1970-01-01 was a Thursday
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        let weekday = weekdays[Int(((t.daysSinceEpoch % 7) + 7) % 7)]
        return "\(weekday), \(pad(t.day, 2)) \(months[Int(t.month) - 1]) \(pad(t.year, 4)) \(pad(t.hour, 2)):\(pad(t.minute, 2)):\(pad(t.second, 2)) GMT"
    }

    /// This instant's UTC calendar day and time of day (days before 1970 included).
    private var civilTime: (daysSinceEpoch: Int64, year: Int64, month: Int64, day: Int64, hour: Int64, minute: Int64, second: Int64, millisecond: Int64) {
        var days = millisecondsSinceEpoch / 86_400_000
        var rem = millisecondsSinceEpoch % 86_400_000
        if rem < 0 { rem += 86_400_000; days -= 1 }
        let (y, m, d) = Instant.civil(fromDays: days)
        return (days, y, m, d, rem / 3_600_000, (rem / 60_000) % 60, (rem / 1000) % 60, rem % 1000)
    }

    // MARK: Parsing

    /// Parses an RFC 3339 date-time: `YYYY-MM-DD(T|t| )HH:MM:SS(.fraction)?(Z|z|±HH:MM)`.
    /// Fractions beyond milliseconds are truncated (a fraction may have any number of digits,
    /// as RFC 3339 allows; the text is bounded by its source, a body or an argument). A leap
    /// second (second `60`, where leap seconds fall: the last minute of a UTC day, whatever the
    /// offset it is written in) is read as the last millisecond of that minute (`23:59:59.999Z`):
    /// Clearhouse counts milliseconds without leap seconds, and the instant stays in the UTC
    /// day it ends.
    /// Returns nil for anything else.
    public init?(rfc3339 text: String) {
        let b = Array(text.utf8)
        guard b.count >= 20 else { return nil }
        func num(_ from: Int, _ len: Int) -> Int64? {
            var v: Int64 = 0
            for i in from..<(from + len) {
                let c = b[i]
                guard c >= 0x30, c <= 0x39 else { return nil }
                v = v * 10 + Int64(c - 0x30)
            }
            return v
        }
        guard let year = num(0, 4), b[4] == 0x2D, let month = num(5, 2), b[7] == 0x2D, let day = num(8, 2),
            b[10] == 0x54 || b[10] == 0x74 || b[10] == 0x20,
            let hour = num(11, 2), b[13] == 0x3A, let minute = num(14, 2), b[16] == 0x3A, let second = num(17, 2)
        else { return nil }
        guard (1...12).contains(month), day >= 1, day <= Instant.daysIn(month: month, year: year),
            hour <= 23, minute <= 59, second <= 60
        else { return nil }
        let leapSecond = second == 60
        var i = 19
        var milli: Int64 = 0
        if b[i] == 0x2E {
            i += 1
            let start = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 {
                if i - start < 3 { milli = milli * 10 + Int64(b[i] - 0x30) }
                i += 1
            }
            let digits = i - start
            guard digits >= 1 else { return nil }
            if digits < 3 { for _ in digits..<3 { milli *= 10 } }
        }
        guard i < b.count else { return nil }
        var offsetMinutes: Int64 = 0
        if b[i] == 0x5A || b[i] == 0x7A {
            i += 1
        } else if b[i] == 0x2B || b[i] == 0x2D {
            guard i + 6 == b.count, let oh = num(i + 1, 2), b[i + 3] == 0x3A, let om = num(i + 4, 2), oh <= 23, om <= 59
            else { return nil }
            offsetMinutes = (oh * 60 + om) * (b[i] == 0x2D ? -1 : 1)
            i += 6
        } else {
            return nil
        }
        guard i == b.count else { return nil }
        // A leap second ends a UTC day: 23:59 in UTC, once the offset is taken off.
        if leapSecond, ((hour * 60 + minute - offsetMinutes) % 1440 + 1440) % 1440 != 1439 { return nil }
        let days = Instant.days(fromCivil: year, month, day)
        let secs = days * 86_400 + hour * 3600 + minute * 60 + (leapSecond ? 59 : second) - offsetMinutes * 60
        let ms = secs * 1000 + (leapSecond ? 999 : milli)
        // In UTC too, within the years 0000 to 9999: an offset could carry the instant out of
        // them, and `rfc3339` (statements, notices) would then write no RFC 3339 date.
        guard ms >= Instant.formattableMilliseconds.lowerBound, ms <= Instant.formattableMilliseconds.upperBound else { return nil }
        millisecondsSinceEpoch = ms
    }

    /// The instants `rfc3339` writes as RFC 3339: 0000-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z.
    public static let formattableMilliseconds: ClosedRange<Int64> =
        days(fromCivil: 0, 1, 1) * 86_400_000...(days(fromCivil: 10_000, 1, 1) * 86_400_000 - 1)

    // MARK: Civil calendar (Howard Hinnant's algorithms)

    static func days(fromCivil y0: Int64, _ m: Int64, _ d: Int64) -> Int64 {
        let y = m <= 2 ? y0 - 1 : y0
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    static func civil(fromDays z0: Int64) -> (Int64, Int64, Int64) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }

    static func daysIn(month: Int64, year: Int64) -> Int64 {
        switch month {
        case 2: return (year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)) ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }
}

private func pad(_ v: Int64, _ width: Int) -> String {
    let s = String(v)
    return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
}

/// The source of "now". Live code reads the system clock; tests inject a fixed or stepping one.
public protocol WallClock: Sendable {
    func now() -> Instant
    /// The time leases between processes of this host run on (`LeaseTime`).
    func leaseTime() -> LeaseTime
}

/// A time for leases between the processes of one host that no step of the wall clock moves
/// (an NTP step, an operator's `date -s`): milliseconds since the machine booted, tagged with
/// that boot, so that a lease taken before a reboot (its process gone) is never taken for a
/// live one. Processes sharing a SQLite database in WAL mode share a host, hence this clock.
public struct LeaseTime: Sendable, Equatable {
    /// The boot the milliseconds count from (Linux: `/proc/sys/kernel/random/boot_id`).
    public var boot: String
    public var milliseconds: Int64

    public init(boot: String, milliseconds: Int64) {
        self.boot = boot
        self.milliseconds = milliseconds
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The system's real-time clock, read in whole milliseconds.
public struct SystemClock: WallClock {
    public init() {}
    public func now() -> Instant {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Instant(millisecondsSinceEpoch: Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000)
    }

    /// CLOCK_BOOTTIME (monotonic, counting suspended time too) and this boot's id. Without a
    /// boot id (not Linux), the wall clock, as every process of the host then reads it.
    public func leaseTime() -> LeaseTime {
        #if os(Linux)
        if let boot = SystemClock.bootID {
            var ts = timespec()
            clock_gettime(CLOCK_BOOTTIME, &ts)
            return LeaseTime(boot: boot, milliseconds: Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000)
        }
        #endif
        return LeaseTime(boot: "wall-clock", milliseconds: now().millisecondsSinceEpoch)
    }

    /// Read once per process: it changes only with a reboot.
    static let bootID: String? = {
        guard let f = fopen("/proc/sys/kernel/random/boot_id", "r") else { return nil }
        defer { fclose(f) }
        var buffer = [CChar](repeating: 0, count: 64)
        guard fgets(&buffer, Int32(buffer.count), f) != nil else { return nil }
        let id = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            .filter { $0.isHexDigit || $0 == "-" }
        return id.count >= 32 ? id : nil
    }()
}
