import ClearingDomain
import Foundation
import Synchronization

/// A clock the test sets and advances by hand. Time passing (`advance`, `set`) moves the wall
/// clock and the lease clock alike; a step of the wall clock (`step`) moves the wall clock alone.
public final class ManualClock: WallClock {
    private let current: Mutex<(wall: Instant, lease: Int64)>

    public init(_ start: Instant = Instant(rfc3339: "2026-11-22T09:00:00Z")!) { current = Mutex((start, 1_000_000)) }

    public func now() -> Instant { current.withLock { $0.wall } }

    public func leaseTime() -> LeaseTime { LeaseTime(boot: "manual-clock", milliseconds: current.withLock { $0.lease }) }

    public func set(_ t: Instant) {
        current.withLock { $0 = (t, $0.lease + max(0, t.millisecondsSinceEpoch - $0.wall.millisecondsSinceEpoch)) }
    }

    public func advance(milliseconds: Int64) {
        current.withLock { $0 = (Instant(millisecondsSinceEpoch: $0.wall.millisecondsSinceEpoch + milliseconds), $0.lease + milliseconds) }
    }

    /// The wall clock steps (NTP, `date -s`) while no time passes.
    public func step(milliseconds: Int64) {
        current.withLock { $0.wall = Instant(millisecondsSinceEpoch: $0.wall.millisecondsSinceEpoch + milliseconds) }
    }

    /// The lease (boot) clock alone reads otherwise: as in a process whose boot clock is faked
    /// (libfaketime) or offset (a time namespace).
    public func stepLeaseClock(milliseconds: Int64) {
        current.withLock { $0.lease += milliseconds }
    }
}

/// A fresh temporary directory, removed by `remove()`.
public struct TemporaryDirectory: Sendable {
    public let url: URL

    public init(_ label: String = "clearhouse-test") {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("\(label)-\(UUID().uuidString)")
        try! FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    public func remove() { try? FileManager.default.removeItem(at: url) }
}

public enum Fixtures {
    public static let grocer = PartnerID("grocer")!
    public static let fuel = PartnerID("fuel")!
    public static let cinema = PartnerID("cinema")!

    /// Three partners with simple terms and throwaway secrets.
    public static func configuration(expireAfterDays: Int64 = 1095) -> ClearingConfiguration {
        var partners: [PartnerID: PartnerTerms] = [:]
        for (i, id) in [grocer, fuel, cinema].enumerated() {
            partners[id] = PartnerTerms(
                id: id, name: id.rawValue.capitalized, issuePricePer1000: MoneyMinor(1000 + Int64(i) * 100),
                redeemCreditPer1000: MoneyMinor(900 + Int64(i) * 100),
                webhookSecrets: [SecretBytes(Array(repeating: UInt8(i + 1), count: 32))],
                apiTokenSHA256: Array(repeating: 0, count: 32), noticeURL: "https://127.0.0.1/\(id)",
                noticeSecret: SecretBytes(Array(repeating: UInt8(i + 10), count: 32)))
        }
        return ClearingConfiguration(
            coalition: CoalitionTerms(currency: "EUR", pointsExpireAfterDays: expireAfterDays), partners: partners)
    }

    public static func earn(_ member: String, _ points: Int64, _ ref: String) -> Event {
        Event(kind: .earned, member: MemberID(member)!, points: Points(points), reference: Reference(ref)!)
    }

    public static func redeem(_ member: String, _ points: Int64, _ ref: String) -> Event {
        Event(kind: .redeemed, member: MemberID(member)!, points: Points(points), reference: Reference(ref)!)
    }

    public static func reverseEarn(_ member: String, _ points: Int64, _ ref: String, of original: String) -> Event {
        Event(kind: .earnReversed, member: MemberID(member)!, points: Points(points), reference: Reference(ref)!,
              originalReference: Reference(original)!)
    }

    public static func reverseRedemption(_ member: String, _ points: Int64, _ ref: String, of original: String) -> Event {
        Event(kind: .redemptionReversed, member: MemberID(member)!, points: Points(points), reference: Reference(ref)!,
              originalReference: Reference(original)!)
    }
}

/// Runs the `sqlite3` tool on a database file, as an operator (or an attacker with file
/// access) would, bypassing Clearhouse.
public enum SQLiteTool {
    public struct Result: Sendable {
        public let status: Int32
        public let stderr: String
        /// What the statements printed (small results only: read after the process ends).
        public let stdout: String
    }

    public static func run(_ database: URL, _ sql: String) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/sqlite3")
        // Waits up to 5 s for a lock a store holds (a writer's catch-up, a checkpoint) instead
        // of failing at once with "database is locked": the edit is the test's, not a race.
        p.arguments = ["-cmd", ".timeout 5000", database.path, sql]
        let err = Pipe(), out = Pipe()
        p.standardError = err
        p.standardOutput = out
        try p.run()
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stderr: text, stdout: String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
    }
}
