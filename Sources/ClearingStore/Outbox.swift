import ClearingDomain
import Foundation
import GRDB

/// A notice in the outbox, as the operator sees it.
public struct NoticeRecord: Equatable, Sendable {
    public var id: String
    public var run: String
    public var partner: PartnerID
    public var body: [UInt8]
    public var createdAt: Instant
    public var state: NoticeState
    /// Every attempt ever made.
    public var attempts: Int
    /// Attempts since the notice was created or an operator last retried it.
    public var roundAttempts: Int
    /// When the next attempt is due (pending only).
    public var nextAttemptAt: Instant?
    /// When it was delivered or became a dead letter.
    public var finishedAt: Instant?
    public var lastResult: String?
}

/// One delivery attempt.
public struct NoticeAttemptRecord: Equatable, Sendable {
    public enum Outcome: String, Sendable {
        case inFlight = "in-flight", delivered, retry, dead
        /// The process sending it died before the answer was recorded.
        case interrupted
    }

    public var number: Int
    public var startedAt: Instant
    public var latencyMilliseconds: Int64?
    public var httpStatus: Int?
    public var error: String?
    public var outcome: Outcome
    public var nextAttemptAt: Instant?
}

/// A notice taken for one attempt: its lease keeps other senders off it until the attempt
/// is recorded, the lease runs out, or the process holding it dies.
public struct ClaimedNotice: Equatable, Sendable {
    public var id: String
    public var partner: PartnerID
    public var body: [UInt8]
    /// The attempt's number among all attempts.
    public var attempt: Int
    /// The attempt's number in its round (what the back-off schedule counts).
    public var roundAttempt: Int
    /// The process holding the lease.
    public var owner: Int32
}

public struct NoticeError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension Store {
    /// Takes up to `limit` notices that are due at `now` and not leased by a live sender,
    /// records an in-flight attempt for each and leases them to `owner` (a process id) for
    /// `leaseMilliseconds` on the clock's lease time (a step of the wall clock does not end a
    /// lease). An in-flight attempt left by a sender that died is recorded as interrupted; its
    /// notice is due again at once.
    ///
    /// `claimedThisPass` are the notices a delivery pass (`notices send`) has already attempted:
    /// they are left alone, so no notice is sent twice in one pass, whatever the wall clock does.
    /// Notices of
    /// `skippingPartners` (those the caller is sending to right now) are left for later: one
    /// notice at a time per partner, so that a partner that does not answer holds up no other
    /// partner's. So are those of a partner another live sender holds a notice of (a
    /// `notices send` beside `serve`): one at a time per partner across processes too, and at
    /// most one per partner per claim.
    public func claimDueNotices(
        clock: any WallClock, limit: Int, owner: Int32, leaseMilliseconds: Int64, ownerAlive: (Int32) -> Bool, only: String? = nil,
        claimedThisPass: Set<String> = [], skippingPartners: Set<PartnerID> = [], ownLeasesAreStale: Bool = false
    ) throws -> [ClaimedNotice] {
        try coalition.write { db in
            // Read inside the transaction: time spent waiting for the lock does not shorten the lease.
            let now = clock.now()
            let t = now.millisecondsSinceEpoch
            let lease = clock.leaseTime()
            // Notices scheduled by a clock since set back are due now (`scheduledBeyondReach`).
            try db.execute(
                sql: "UPDATE notice INDEXED BY notice_due SET next_attempt_at_ms = ? WHERE state = 'pending' AND next_attempt_at_ms > ?",
                arguments: [t, t + Limits.noticeNextAttemptAheadMillisecondsMax])
            var claimed: [ClaimedNotice] = []
            let (clause, arguments) = try Store.claimableNotices(
                db, at: now, lease: lease, only: only, claimedThisPass: claimedThisPass, skippingPartners: skippingPartners,
                caller: owner, ownLeasesAreStale, ownerAlive)
            // Without the bodies: a partner's notices past its first are read and skipped (a
            // lease that holds keeps its partner out of the query itself).
            let rows = try Row.fetchAll(
                db,
                sql: """
                    SELECT id, partner, attempts, round_attempts, lease_owner FROM notice
                    WHERE \(clause) ORDER BY next_attempt_at_ms, id LIMIT \(limit * Limits.noticeClaimReadFactor + Limits.noticeClaimReadMargin)
                    """,
                arguments: arguments)
            var partnersClaimed = Set<String>()
            for row in rows where claimed.count < limit {
                let id: String = try row.text("id")
                let leaseOwner = try row.optionalInt64("lease_owner")
                guard partnersClaimed.insert(try row.text("partner")).inserted else { continue }
                if leaseOwner != nil {
                    try db.execute(
                        sql: """
                            UPDATE notice_attempt SET outcome = 'interrupted', error = 'the sending process stopped before the answer was recorded'
                            WHERE notice_id = ? AND outcome = 'in-flight'
                            """,
                        arguments: [id])
                }
                let attempt = Int(try row.int64("attempts")) + 1
                let round = Int(try row.int64("round_attempts")) + 1
                try db.execute(
                    sql: """
                        UPDATE notice SET attempts = ?, round_attempts = ?, lease_owner = ?, lease_until_ms = ?,
                          lease_boot = ?, lease_until_boot_ms = ? WHERE id = ?
                        """,
                    arguments: [attempt, round, owner, t + leaseMilliseconds, lease.boot, lease.milliseconds + leaseMilliseconds, id])
                try db.execute(
                    sql: "INSERT INTO notice_attempt (notice_id, number, started_at_ms, outcome) VALUES (?, ?, ?, 'in-flight')",
                    arguments: [id, attempt, t])
                guard let partner = PartnerID(try row.text("partner")) else {
                    throw NoticeError("notice \(id) names an invalid partner")
                }
                guard let body = try Data.fetchOne(db, sql: "SELECT body FROM notice WHERE id = ?", arguments: [id]) else {
                    throw NoticeError("notice \(id) has no body")
                }
                claimed.append(ClaimedNotice(
                    id: id, partner: partner, body: Array(body), attempt: attempt, roundAttempt: round, owner: owner))
            }
            return claimed
        }
    }

    /// The notices a claim may take (due at `now`, pending, and as `claimDueNotices` says), as
    /// a WHERE clause and its arguments. Partners another live sender holds are left out in the
    /// query itself: filtered after its LIMIT, one partner's backlog would hide every other
    /// partner's notices.
    static func claimableNotices(
        _ db: Database, at now: Instant, lease: LeaseTime, only: String?, claimedThisPass: Set<String>, skippingPartners: Set<PartnerID>,
        caller: Int32, _ ownLeasesAreStale: Bool, _ ownerAlive: (Int32) -> Bool
    ) throws -> (String, StatementArguments) {
        let held = try partnersUnderLease(db, at: lease, wall: now.millisecondsSinceEpoch, caller: caller, ownLeasesAreStale, ownerAlive)
        var clause = "state = 'pending' AND next_attempt_at_ms <= ?"
        var arguments: StatementArguments = [now.millisecondsSinceEpoch]
        if let only {
            clause += " AND id = ?"
            arguments += [only]
        }
        if !claimedThisPass.isEmpty {
            // At most `Limits.noticeClaimsPerPassMax` ids, well under SQLite's variable limit.
            clause += " AND id NOT IN (\(Array(repeating: "?", count: claimedThisPass.count).joined(separator: ", ")))"
            arguments += StatementArguments(Array(claimedThisPass))
        }
        let (notIn, partners) = partnersOtherThan(skippingPartners.union(held))
        return (clause + notIn, arguments + partners)
    }

    /// " AND partner NOT IN (?, …)" and its arguments; nothing for no partners.
    static func partnersOtherThan(_ skipping: Set<PartnerID>, column: String = "partner") -> (String, StatementArguments) {
        if skipping.isEmpty { return ("", []) }
        let partners = skipping.map(\.rawValue).sorted()
        return (" AND \(column) NOT IN (\(partners.map { _ in "?" }.joined(separator: ", ")))", StatementArguments(partners))
    }

    /// The columns `leaseHolds` reads.
    static let leaseColumns = "lease_owner, lease_until_ms, lease_boot, lease_until_boot_ms"
    /// A notice's lease released: every lease column cleared together.
    static let leaseReleased = "lease_owner = NULL, lease_until_ms = NULL, lease_boot = NULL, lease_until_boot_ms = NULL"

    /// Whether a notice row's lease (`leaseColumns`) still holds: its process lives, and it has
    /// not run out by either clock: the boot clock of the boot it was taken on (which no step
    /// of the wall clock moves), or the wall clock. Either is enough: a process whose boot
    /// clock is faked or offset (libfaketime, a time namespace) still sees a live sender's
    /// lease by the wall clock, and a forward step of the wall clock does not end it while the
    /// boot clock says it holds. A lease without a boot (an earlier build's) or of another
    /// boot ends by the wall clock. `ownLeasesAreStale`: the caller skips every partner it is
    /// sending to, so a lease in its own name on a notice it may claim was left by an earlier
    /// process that had the same pid (a restarted container's pid 1).
    static func leaseHolds(_ row: Row, at lease: LeaseTime, wall t: Int64, caller: Int32, _ ownLeasesAreStale: Bool, _ ownerAlive: (Int32) -> Bool) throws -> Bool {
        guard let owner = try row.optionalInt64("lease_owner").map({ Int32(truncatingIfNeeded: $0) }) else { return false }
        let byBoot = try row.optionalText("lease_boot") == lease.boot && (try row.optionalInt64("lease_until_boot_ms")).map { $0 > lease.milliseconds } == true
        let byWall = (try row.optionalInt64("lease_until_ms")).map { $0 > t } == true
        guard byBoot || byWall else { return false }
        if owner == caller && ownLeasesAreStale { return false }
        return ownerAlive(owner)
    }

    /// The partners with a notice under a lease that holds at `t` (see `leaseHolds`): no other
    /// notice of theirs may be claimed meanwhile. Pending notices only, through `notice_state`.
    static func partnersUnderLease(
        _ db: Database, at lease: LeaseTime, wall t: Int64, caller: Int32, _ ownLeasesAreStale: Bool, _ ownerAlive: (Int32) -> Bool
    ) throws -> Set<PartnerID> {
        var partners = Set<PartnerID>()
        // At most a few rows: one leased notice per partner and sender.
        for row in try Row.fetchAll(
            db, sql: "SELECT partner, \(leaseColumns) FROM notice WHERE state = 'pending' AND lease_owner IS NOT NULL")
        where try leaseHolds(row, at: lease, wall: t, caller: caller, ownLeasesAreStale, ownerAlive) {
            guard let p = PartnerID(try row.text("partner")) else { throw NoticeError("a notice names an invalid partner") }
            partners.insert(p)
        }
        return partners
    }

    /// Whether a claim with these terms would find anything: a read, so that an idle sender
    /// does not queue behind the posting writer; it leaves out leases as the claim does.
    public func claimableNoticeExists(
        clock: any WallClock, owner: Int32, ownerAlive: (Int32) -> Bool, claimedThisPass: Set<String> = [],
        skippingPartners: Set<PartnerID> = [], ownLeasesAreStale: Bool = false
    ) throws -> Bool {
        let (now, lease) = (clock.now(), clock.leaseTime())
        return try coalition.read { db in
            let (clause, arguments) = try Store.claimableNotices(
                db, at: now, lease: lease, only: nil, claimedThisPass: claimedThisPass, skippingPartners: skippingPartners,
                caller: owner, ownLeasesAreStale, ownerAlive)
            return try Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM notice WHERE \(clause))", arguments: arguments) ?? false
                || Store.scheduledBeyondReach(db, at: now)
        }
    }

    /// An attempt the sender gave up before its answer (it is stopping: the transfer was
    /// cancelled) is recorded as interrupted, as a crash's is, but unlike a crash's it does not
    /// count against the notice's round: the notice is due again at once, for the next sender.
    public func interruptNoticeAttempt(_ notice: ClaimedNotice, reason: String) throws {
        try coalition.write { db in
            try db.execute(
                sql: "UPDATE notice_attempt SET outcome = 'interrupted', error = ? WHERE notice_id = ? AND number = ? AND outcome = 'in-flight'",
                arguments: [String(reason.utf8.prefix(Limits.noticeErrorBytesMax)) ?? "", notice.id, notice.attempt])
            try db.execute(
                sql: """
                    UPDATE notice SET round_attempts = round_attempts - 1, \(Store.leaseReleased)
                    WHERE id = ? AND state = 'pending' AND lease_owner = ? AND attempts = ? AND round_attempts >= 1
                    """,
                arguments: [notice.id, notice.owner, notice.attempt])
        }
    }

    /// Records how an attempt ended and what follows it, and releases the lease.
    public func finishNoticeAttempt(
        _ notice: ClaimedNotice, finishedAt: Instant, latencyMilliseconds: Int64, httpStatus: Int?, error: String?, decision: NoticeDecision
    ) throws {
        let error = error.map { String($0.utf8.prefix(Limits.noticeErrorBytesMax)) ?? "" }
        let summary = httpStatus.map { "HTTP \($0)" } ?? error ?? "no answer"
        try coalition.write { db in
            let outcome: String, next: Int64?, state: NoticeState, finished: Int64?, result: String
            switch decision {
            case .delivered:
                (outcome, next, state, finished, result) = ("delivered", nil, .delivered, finishedAt.millisecondsSinceEpoch, summary)
            case .retry(let at):
                (outcome, next, state, finished, result) = ("retry", at.millisecondsSinceEpoch, .pending, nil, summary)
            case .dead(let reason):
                (outcome, next, state, finished, result) = ("dead", nil, .dead, finishedAt.millisecondsSinceEpoch, "\(summary); \(reason)")
            }
            try db.execute(
                sql: """
                    UPDATE notice_attempt SET latency_ms = ?, http_status = ?, error = ?, outcome = ?, next_attempt_at_ms = ?
                    WHERE notice_id = ? AND number = ?
                    """,
                arguments: [latencyMilliseconds, httpStatus, error, outcome, next, notice.id, notice.attempt])
            try db.execute(
                sql: """
                    UPDATE notice SET state = ?, next_attempt_at_ms = ?, finished_at_ms = ?, last_result = ?,
                      \(Store.leaseReleased)
                    WHERE id = ? AND state = 'pending' AND lease_owner = ? AND attempts = ?
                    """,
                arguments: [state.rawValue, next, finished, result, notice.id, notice.owner, notice.attempt])
            // No row changed: the lease ran out and another sender has claimed the notice since;
            // this attempt is recorded above, the notice's state is the other sender's to decide.
        }
    }

    /// Sends a dead letter again: it becomes pending, due at `now`, with a fresh round of
    /// attempts. Only dead letters can be retried.
    @discardableResult
    public func retryDeadNotice(_ id: String, now: Instant) throws -> NoticeRecord {
        try coalition.write { db in
            guard let row = try Row.fetchOne(db, sql: "\(Store.noticeRows) WHERE notice.id = ?", arguments: [id]) else {
                throw NoticeError("no notice \(id)")
            }
            let record = try Store.noticeRecord(row)
            guard record.state == .dead else {
                throw NoticeError("notice \(id) is \(record.state.rawValue); only a dead letter can be retried")
            }
            try db.execute(
                sql: """
                    UPDATE notice SET state = 'pending', round_attempts = 0, next_attempt_at_ms = ?, finished_at_ms = NULL,
                      last_result = ?, \(Store.leaseReleased)
                    WHERE id = ?
                    """,
                arguments: [now.millisecondsSinceEpoch, "retried by the operator after: \(record.lastResult ?? "no result")", id])
            return try Store.noticeRecord(Row.fetchOne(db, sql: "\(Store.noticeRows) WHERE notice.id = ?", arguments: [id])!)
        }
    }

    /// Notices, oldest run first, optionally of one state; at most `limit`.
    public func notices(state: NoticeState? = nil, limit: Int = Limits.noticeListRowsMax) throws -> [NoticeRecord] {
        try coalition.read { db in
            let rows: [Row]
            if let state {
                rows = try Row.fetchAll(
                    db, sql: "\(Store.noticeRows) WHERE notice.state = ? ORDER BY notice.run_number, notice.partner LIMIT ?", arguments: [state.rawValue, limit])
            } else {
                rows = try Row.fetchAll(db, sql: "\(Store.noticeRows) ORDER BY notice.run_number, notice.partner LIMIT ?", arguments: [limit])
            }
            return try rows.map(Store.noticeRecord)
        }
    }

    /// One notice and its attempts, or nil.
    public func notice(_ id: String) throws -> (NoticeRecord, [NoticeAttemptRecord])? {
        try coalition.read { db in
            guard let row = try Row.fetchOne(db, sql: "\(Store.noticeRows) WHERE notice.id = ?", arguments: [id]) else { return nil }
            let attempts = try Row.fetchAll(db, sql: "SELECT * FROM notice_attempt WHERE notice_id = ? ORDER BY number", arguments: [id]).map { r in
                guard let outcome = NoticeAttemptRecord.Outcome(rawValue: try r.text("outcome")) else {
                    throw NoticeError("notice \(id): an attempt has an unknown outcome")
                }
                return NoticeAttemptRecord(
                    number: Int(try r.int64("number")), startedAt: Instant(millisecondsSinceEpoch: try r.int64("started_at_ms")),
                    latencyMilliseconds: try r.optionalInt64("latency_ms"), httpStatus: try r.optionalInt64("http_status").map { Int($0) },
                    error: try r.optionalText("error"), outcome: outcome,
                    nextAttemptAt: try r.optionalInt64("next_attempt_at_ms").map(Instant.init(millisecondsSinceEpoch:)))
            }
            return (try Store.noticeRecord(row), attempts)
        }
    }

    /// The partners with a pending notice, and those with any notice, sorted.
    public func noticePartners() throws -> (pending: [String], any: [String]) {
        try coalition.read { db in
            (try String.fetchAll(db, sql: "SELECT DISTINCT partner FROM notice WHERE state = 'pending' ORDER BY partner"),
             try String.fetchAll(db, sql: "SELECT DISTINCT partner FROM notice ORDER BY partner"))
        }
    }

    /// How many notices are in each state.
    public func noticeCounts() throws -> [NoticeState: Int64] {
        try coalition.read { db in
            var counts: [NoticeState: Int64] = [.pending: 0, .delivered: 0, .dead: 0]
            for row in try Row.fetchAll(db, sql: "SELECT state, COUNT(*) AS n FROM notice GROUP BY state") {
                if let s = NoticeState(rawValue: try row.text("state")) { counts[s] = try row.int64("n") }
            }
            return counts
        }
    }

    /// Whether a pending notice is due at `now` (leased or not): a read, so that an idle
    /// worker never queues behind the posting writer.
    public func noticeDue(at now: Instant) throws -> Bool {
        try coalition.read { db in
            try Bool.fetchOne(
                db, sql: "SELECT EXISTS (SELECT 1 FROM notice WHERE state = 'pending' AND next_attempt_at_ms <= ?)",
                arguments: [now.millisecondsSinceEpoch]) ?? false || Store.scheduledBeyondReach(db, at: now)
        }
    }

    /// Whether a pending notice is scheduled further ahead than any schedule can put it
    /// (`Limits.noticeNextAttemptAheadMillisecondsMax`): by a wall clock that ran ahead and has
    /// since been set back. Such a notice is due now: `claimDueNotices` reschedules it to now
    /// before it claims, rather than hold it back for as long as the clock was wrong. (A search of
    /// the `notice_due` index, named: without statistics SQLite would read every pending notice
    /// through `notice_state`; one condition with OR beside the due range would scan too.)
    static func scheduledBeyondReach(_ db: Database, at now: Instant) throws -> Bool {
        try Bool.fetchOne(
            db, sql: "SELECT EXISTS (SELECT 1 FROM notice INDEXED BY notice_due WHERE state = 'pending' AND next_attempt_at_ms > ?)",
            arguments: [now.millisecondsSinceEpoch + Limits.noticeNextAttemptAheadMillisecondsMax]) ?? false
    }

    /// When the earliest pending notice (of a partner not in `skippingPartners`) is due, or nil
    /// when none is pending.
    public func nextNoticeDue(skippingPartners: Set<PartnerID> = []) throws -> Instant? {
        let (notIn, partners) = Store.partnersOtherThan(skippingPartners, column: "n.partner")
        return try coalition.read { db in
            // A leased notice, or one of a partner with a leased notice, is not due before that
            // lease runs out (or its holder dies, which the poll interval notices). The leases
            // are grouped by partner once (a subquery per notice grew with the square of a
            // backlog).
            try Int64.fetchOne(
                db,
                sql: """
                    WITH held AS (
                      SELECT partner, MAX(lease_until_ms) AS until FROM notice
                      WHERE state = 'pending' AND lease_until_ms IS NOT NULL GROUP BY partner)
                    SELECT MIN(MAX(n.next_attempt_at_ms, COALESCE(h.until, 0)))
                    FROM notice n LEFT JOIN held h ON h.partner = n.partner
                    WHERE n.state = 'pending'\(notIn)
                    """,
                arguments: partners)
                .map(Instant.init(millisecondsSinceEpoch:))
        }
    }

    /// A notice's row with its run's id (which carries the restore's time for a run closed
    /// after a restore: the number alone does not make it).
    /// A notice whose run row is gone (only by tampering; `verify` says so) is still listed,
    /// under its run's number.
    static let noticeRows = """
        SELECT notice.*, COALESCE(run.id, printf('R%06d', notice.run_number)) AS run_id
        FROM notice LEFT JOIN run ON run.number = notice.run_number
        """

    static func noticeRecord(_ row: Row) throws -> NoticeRecord {
        let id = try row.text("id")
        guard let partner = PartnerID(try row.text("partner")),
            let state = NoticeState(rawValue: try row.text("state"))
        else { throw NoticeError("notice \(id) has an invalid partner or state") }
        return NoticeRecord(
            id: id, run: try row.text("run_id"), partner: partner,
            body: Array(try row.blob("body")),
            createdAt: Instant(millisecondsSinceEpoch: try row.int64("created_at_ms")), state: state,
            attempts: Int(try row.int64("attempts")), roundAttempts: Int(try row.int64("round_attempts")),
            nextAttemptAt: try row.optionalInt64("next_attempt_at_ms").map(Instant.init(millisecondsSinceEpoch:)),
            finishedAt: try row.optionalInt64("finished_at_ms").map(Instant.init(millisecondsSinceEpoch:)),
            lastResult: try row.optionalText("last_result"))
    }
}
