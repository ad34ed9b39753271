import ClearingDomain
import Foundation
import GRDB
import Synchronization

/// A closed settlement run (CONTRACT §6).
public struct SettlementRun: Equatable, Sendable {
    public var number: Int64
    public var id: String
    public var cutoff: Instant
    /// The journal ids it covers: (`firstJournalID` ... `lastJournalID`), empty when last < first.
    public var firstJournalID: Int64
    public var lastJournalID: Int64
    public var partners: [PartnerFigures]
    public var flows: [Flow]
    public var totals: RunTotals
    /// Each partner's prices of the day (per 1000 points), as recorded with the run.
    public var issuePrices: [PartnerID: MoneyMinor] = [:]
    public var redeemCredits: [PartnerID: MoneyMinor] = [:]

    public var entryCount: Int64 { max(0, lastJournalID - firstJournalID + 1) }

    /// `R` and the number in six digits; after a restore, `R`, the restore's UTC time
    /// (`yyMMddHHmmss`) and the number in five (`run_naming`).
    static func id(number: Int64, restoredAt: String? = nil) -> String {
        let n = String(number)
        let width = restoredAt == nil ? 6 : 5
        return "R" + (restoredAt ?? "") + String(repeating: "0", count: max(0, width - n.count)) + n
    }

    /// Whether `id` is what `id(number:restoredAt:)` makes of `number`, with no restore or after
    /// any (which restore named a run is not kept: only the latest's time is).
    static func isID(_ id: String, of number: Int64) -> Bool {
        if id == self.id(number: number) { return true }
        let u = Array(id.utf8)
        guard u.count > 13, u[0] == UInt8(ascii: "R"), u.dropFirst().allSatisfy({ (0x30...0x39).contains($0) }) else { return false }
        return id == self.id(number: number, restoredAt: String(decoding: u[1..<13], as: UTF8.self))
    }
}

/// The ledger sequences of one partner's entries in a run (gapless, so the count follows).
struct SequenceRange {
    var first: Int64
    var last: Int64
    var count: Int64 { last - first + 1 }
}

/// A partner's running totals at some point: its last sequence and its points by kind, as
/// `partner_head` and `run_snapshot` rows hold them.
struct Snapshot {
    var lastSequence: Int64 = 0
    var totals: [Int64] = [0, 0, 0, 0]

    init() {}

    init(_ row: Row) throws {
        lastSequence = try row.int64("last_sequence")
        totals = [try row.int64("earned"), try row.int64("redeemed"), try row.int64("earn_reversed"), try row.int64("redemption_reversed")]
    }
}

public struct SettlementError: Error, CustomStringConvertible {
    public let description: String
}

/// A run stopped by `Store.interruptSettlement` before its COMMIT: nothing of it was recorded.
public struct SettlementInterrupted: Error, CustomStringConvertible {
    public var description: String { "the run was interrupted before it committed; nothing of it was recorded" }
}

extension Store {
    /// Closes a run over every entry accepted after the previous cutoff and at or before
    /// `through` (default: now), and expires every lot whose expiry is at or before it. One
    /// IMMEDIATE transaction on the journal: the writer waits meanwhile, so an entry is either
    /// in this run or accepted after its cutoff; the run is wholly recorded or not at all.
    /// A run with nothing in it is still recorded (the period is closed, all figures zero).
    ///
    /// `interruptSettlement()` (from any thread) stops a run that has not committed: the statement
    /// running at that moment fails, or the run finds the request before it takes the journal's
    /// lock or before its COMMIT; it then throws (`SettlementInterrupted`, or SQLite's interrupt)
    /// and nothing of it is recorded. A run that committed first is whole; `settle` returns it.
    /// `beforeCommit` runs inside the run's transaction just before the check that precedes
    /// COMMIT (tests: an interrupt that arrives then).
    public func settle(
        through: Instant? = nil, progress: (@Sendable (_ done: Int64, _ total: Int64) -> Void)? = nil,
        beforeCommit: (() -> Void)? = nil
    ) throws -> SettlementRun {
        let interrupted = { if self.settlementInterrupted.load(ordering: .relaxed) { throw SettlementInterrupted() } }
        var run: SettlementRun?
        // The plain refusals first, so that a repeated night job is told at once.
        if let through {
            try coalition.read { db in try Store.refuseCutoff(through, now: clock.now(), previous: Store.lastRun(db)) }
        }
        // The run's rows, re-added before the journal is locked (journal rows and lot moves never
        // change): under the lock, only the rows since are added (or those after the cutoff
        // taken off), so the writer waits no longer than before for the confirmation.
        let early = try RunRows.afterLastRun(coalition)
        try interrupted()
        try coalition.writeWithoutTransaction { db in
            // The run expires lots on the writer's own connection (no data_version change).
            dropLotCache()
            // A run may dirty more pages than memory should hold (its expiring lots, scattered
            // over `lot_open` and `member`): it may spill them to the WAL before its COMMIT.
            // It uses no savepoint, so SQLite 3.40.1's defect after a spill (`ROLLBACK TO`,
            // docs/DURABILITY.md) cannot meet it; posting turns spilling off again.
            try db.execute(sql: "PRAGMA cache_spill = ON")
            defer { try? db.execute(sql: "PRAGMA cache_spill = OFF") }
            try db.inTransaction(.immediate) {
                // Read with the journal locked: nothing can be accepted between this instant
                // and the run's snapshot.
                let now = clock.now()
                run = try closeRun(db, through: through ?? now, now: now, early: early, progress: progress)
                beforeCommit?()
                try interrupted()
                return .commit
            }
        }
        commitCounter.add(1, ordering: .relaxed)
        return run!
    }

    /// Stops a `settle` in progress in this process (safe from any thread, e.g. a signal
    /// handler's queue): see `settle`. Reads running on the store's connections meanwhile fail
    /// too; the store is meant to be closed afterwards.
    public func interruptSettlement() {
        settlementInterrupted.store(true, ordering: .relaxed)
        coalition.interrupt()
    }

    /// Expires every lot with points left whose expiry is at or before `cutoff`, and reports
    /// the points by issuer. The previous run expired every such lot up to its own cutoff;
    /// since then, the only lots expired at or before that cutoff that can hold points again
    /// are the ones a reversed redemption gave points back to, which the writer records in
    /// `lot_reopened`. So the lots to expire are those with an expiry after the previous
    /// cutoff (through the `lot_expiry` index), and those reopened; no scan of all lots.
    ///
    /// A run expires what a lot held **at its cutoff**. Entries accepted after the cutoff (ids
    /// above `lastJournalID`) belong to the next run; of them, only a redemption reversal can
    /// change a lot that expired at or before the cutoff (a redemption or an earn reversal
    /// never touches an expired lot), by giving points back to it. Those points are not
    /// expired here: they stay in `lot_open`, the lot stays in `lot_reopened`, and the next run
    /// expires them, as it would had they come back just after this run.
    private func expireLots(
        _ db: Database, after previousCutoff: Int64?, through cutoff: Instant, lastJournalID: Int64,
        _ report: (PartnerID, Int64) throws -> Void
    ) throws {
        // Created once per connection and emptied for each run (creating or dropping it each
        // time would change the connection's schema and throw away its prepared statements).
        // Each expiring lot with the points it holds now (`held`, its `lot_open` row) and the
        // points this run expires (`points`: what it held at the cutoff).
        try db.execute(
            sql: """
                CREATE TEMP TABLE IF NOT EXISTS expiring_lot (
                  id INTEGER PRIMARY KEY NOT NULL, member TEXT NOT NULL, issuer TEXT NOT NULL,
                  held INTEGER NOT NULL, points INTEGER NOT NULL)
                """)
        try db.execute(sql: "DELETE FROM temp.expiring_lot")
        try db.execute(
            sql: """
                INSERT INTO temp.expiring_lot (id, member, issuer, held, points)
                  SELECT lot.id, lot.member, lot.issuer, o.remaining, o.remaining FROM lot
                  JOIN lot_open o ON o.member = lot.member AND o.lot_id = lot.id
                  WHERE lot.expires_at_ms IS NOT NULL AND lot.expires_at_ms > ? AND lot.expires_at_ms <= ?
                """,
            arguments: [previousCutoff ?? Int64.min, cutoff.millisecondsSinceEpoch])
        try db.execute(
            sql: """
                INSERT OR IGNORE INTO temp.expiring_lot (id, member, issuer, held, points)
                  SELECT lot.id, lot.member, lot.issuer, o.remaining, o.remaining FROM lot_reopened
                  CROSS JOIN lot ON lot.id = lot_reopened.lot_id
                  JOIN lot_open o ON o.member = lot.member AND o.lot_id = lot.id
                  WHERE lot.expires_at_ms IS NOT NULL AND lot.expires_at_ms <= ?
                """,
            arguments: [cutoff.millisecondsSinceEpoch])
        // What entries after the cutoff moved in these lots: lot_move's points are +k for a
        // take, −k for a return, so what a lot held at the cutoff is what it holds now plus
        // their sum. Few rows: the entries after the cutoff, through lot_move's primary key.
        try db.execute(
            sql: """
                UPDATE temp.expiring_lot SET points = expiring_lot.points + later.moved
                FROM (SELECT lot_id, SUM(points) AS moved FROM lot_move WHERE entry_id > ? GROUP BY lot_id) AS later
                WHERE expiring_lot.id = later.lot_id
                """,
            arguments: [lastJournalID])
        if let bad = try Row.fetchOne(db, sql: "SELECT id, held, points FROM temp.expiring_lot WHERE points < 0 OR points > held LIMIT 1") {
            // A take after the cutoff from a lot expired at it, or more given back than it
            // holds: the rules forbid both; stop rather than expire a wrong amount.
            throw StoreError("lot \(bad[0] as Int64): holds \(bad[1] as Int64) but would expire \(bad[2] as Int64) at the cutoff")
        }
        // Every reopened lot is now either expiring here or expires after this cutoff (and so
        // falls in a later run's range), except those given points back after this cutoff:
        // they stay listed, for the next run.
        try db.execute(sql: "DELETE FROM lot_reopened")
        try db.execute(sql: "INSERT INTO lot_reopened (lot_id) SELECT id FROM temp.expiring_lot WHERE points < held")
        try db.execute(sql: "DELETE FROM temp.expiring_lot WHERE points = 0")
        for row in try Row.fetchAll(db, sql: "SELECT issuer, SUM(points) FROM temp.expiring_lot GROUP BY issuer ORDER BY issuer") {
            try report(try partnerID(row[0]), row[1] as Int64)
        }
        try db.execute(
            sql: """
                UPDATE member SET open_points = open_points - gone.points
                FROM (SELECT member, SUM(points) AS points FROM temp.expiring_lot GROUP BY member) AS gone
                WHERE member.member = gone.member
                """)
        // Each statement below starts from the expiring lots and finds each row by its key. (The
        // planner, left to itself with `UPDATE … FROM temp.expiring_lot`, scanned all of `lot`
        // or `lot_open` instead: a run's cost then grew with every lot ever made. Likewise
        // `CROSS JOIN` above makes the short list of reopened lots the outer loop, not every
        // lot whose expiry has passed.)
        try db.execute(
            sql: """
                UPDATE lot SET expired = expired + (SELECT e.points FROM temp.expiring_lot e WHERE e.id = lot.id)
                WHERE id IN (SELECT id FROM temp.expiring_lot)
                """)
        try db.execute(
            sql: """
                DELETE FROM lot_open WHERE (member, lot_id) IN (SELECT member, id FROM temp.expiring_lot WHERE points = held)
                """)
        try db.execute(
            sql: """
                UPDATE lot_open SET remaining = remaining - (SELECT e.points FROM temp.expiring_lot e WHERE e.id = lot_open.lot_id)
                WHERE (member, lot_id) IN (SELECT member, id FROM temp.expiring_lot WHERE points < held)
                """)
    }

    /// The last run's number, cutoff, last journal id and id (columns 0 to 3); nil before the first.
    static func lastRun(_ db: Database) throws -> Row? {
        try Row.fetchOne(db, sql: "SELECT number, cutoff_ms, last_journal_id, id FROM run ORDER BY number DESC LIMIT 1")
    }

    /// A cutoff before the last run's, equal to it, or in the future is refused (nothing is
    /// recorded). `previous`: the last run (`lastRun`).
    static func refuseCutoff(_ cutoff: Instant, now: Instant, previous: Row?) throws {
        let previousCutoff: Int64? = previous?[1]
        if let p = previousCutoff, cutoff.millisecondsSinceEpoch < p {
            let id: String = previous?[3] ?? "the last run"
            // Without --through the cutoff is now: then the clock is the likely cause.
            let why = cutoff == now
                ? "without --through the cutoff is now: is this machine's clock behind?"
                : "a closed period never reopens: entries before it are settled, and corrections fall into a later run"
            throw SettlementError(description: "the cutoff \(cutoff) is before the last run's cutoff \(Instant(millisecondsSinceEpoch: p)), run \(id)'s (\(why))")
        }
        if let p = previousCutoff, cutoff.millisecondsSinceEpoch == p {
            // A second run through the same instant would close an empty period: a night job
            // run twice with the same --through records nothing the second time.
            let id: String = previous?[3] ?? "the last run"
            throw SettlementError(description: "run \(id) already closed the period through \(cutoff); nothing recorded (see `clearhouse runs show \(id)`)")
        }
        guard cutoff <= now else {
            throw SettlementError(description: "--through \(cutoff) is in the future; entries may still be accepted before it")
        }
    }

    private func closeRun(
        _ db: Database, through cutoff: Instant, now: Instant, early: RunRows?, progress: (@Sendable (Int64, Int64) -> Void)?
    ) throws -> SettlementRun {
        let previous = try Store.lastRun(db)
        let number: Int64 = (previous?[0] ?? 0) + 1
        let previousCutoff: Int64? = previous?[1]
        let first: Int64 = (previous?[2] ?? 0) + 1
        try Store.refuseCutoff(cutoff, now: now, previous: previous)
        // Acceptance times rise with journal ids, so walking back from the newest entry finds
        // the last one at or before the cutoff at once (no index on accepted_at needed).
        let last = max(first - 1, try Int64.fetchOne(
            db, sql: "SELECT id FROM journal WHERE accepted_at_ms <= ? ORDER BY id DESC LIMIT 1",
            arguments: [cutoff.millisecondsSinceEpoch]) ?? (first - 1))
        precondition(last >= first - 1, "journal ids after the last run must follow it")

        var issued: [PartnerID: Int64] = [:], redeemed: [PartnerID: Int64] = [:], expired: [PartnerID: Int64] = [:]
        var ranges: [PartnerID: SequenceRange] = [:]
        var moved: [ReplayBook.FlowKey: Int64] = [:]
        // The run's totals are differences of running totals (kept by the writer at every
        // batch): the snapshot at this cutoff minus the one at the previous cutoff. The snapshot
        // at this cutoff is "now" minus whatever was accepted after the cutoff (the entries
        // with ids above `last`: few, usually none).
        var snapshot: [PartnerID: Snapshot] = [:]
        for row in try Row.fetchAll(db, sql: "SELECT * FROM partner_head") {
            snapshot[try partnerID(row.text("partner"))] = try Snapshot(row)
        }
        for row in try Row.fetchAll(
            // NOT INDEXED: by the entries' ids, not a walk of the whole (partner, sequence) index
            // that SQLite otherwise chooses for the GROUP BY (a cost that grew with the journal).
            db, sql: "SELECT partner, kind, SUM(points) AS points, COUNT(*) AS n FROM journal NOT INDEXED WHERE id > ? GROUP BY partner, kind",
            arguments: [last])
        {
            let p = try partnerID(row.text("partner"))
            guard let kind = EventKind(rawValue: Int(try row.int64("kind"))) else { throw StoreError("journal holds an unknown kind") }
            snapshot[p, default: Snapshot()].totals[kind.rawValue - 1] -= try row.int64("points")
            snapshot[p, default: Snapshot()].lastSequence -= try row.int64("n")
        }
        var flowSnapshot: [ReplayBook.FlowKey: Int64] = [:]
        for row in try Row.fetchAll(db, sql: "SELECT issuer, redeemer, points FROM flow") {
            flowSnapshot[try flowKey(row)] = try row.int64("points")
        }
        for row in try Row.fetchAll(
            db, sql: "SELECT issuer, redeemer, SUM(points) AS points FROM lot_move WHERE entry_id > ? GROUP BY issuer, redeemer", arguments: [last])
        {
            flowSnapshot[try flowKey(row), default: 0] -= try row.int64("points")
        }
        var atPrevious: [PartnerID: Snapshot] = [:], previousFlows: [ReplayBook.FlowKey: Int64] = [:]
        if number > 1 {
            for row in try Row.fetchAll(db, sql: "SELECT * FROM run_snapshot WHERE run_number = ?", arguments: [number - 1]) {
                atPrevious[try partnerID(row.text("partner"))] = try Snapshot(row)
            }
            for row in try Row.fetchAll(db, sql: "SELECT issuer, redeemer, points FROM run_flow_snapshot WHERE run_number = ?", arguments: [number - 1]) {
                previousFlows[try flowKey(row)] = try row.int64("points")
            }
        }
        for (p, now) in snapshot {
            let before = atPrevious[p] ?? Snapshot()
            let count = now.lastSequence - before.lastSequence
            guard count >= 0 else { throw StoreError("partner \(p): fewer entries now than at the previous cutoff") }
            if count == 0 { continue }
            ranges[p] = SequenceRange(first: before.lastSequence + 1, last: now.lastSequence)
            issued[p] = (now.totals[0] - before.totals[0]) - (now.totals[2] - before.totals[2])
            redeemed[p] = (now.totals[1] - before.totals[1]) - (now.totals[3] - before.totals[3])
        }
        for (k, v) in flowSnapshot {
            let d = v - (previousFlows[k] ?? 0)
            if d != 0 { moved[k] = d }
        }
        progress?(last - first + 1, last - first + 1)
        // Expiry: every lot whose expiry is at or before the cutoff gives up what is left.
        try expireLots(db, after: previousCutoff, through: cutoff, lastJournalID: last) { issuer, points in
            expired[issuer, default: 0] += points
        }

        var figures: [PartnerFigures] = []
        var sequenceRanges: [PartnerID: SequenceRange] = [:]
        var issuePrices: [PartnerID: MoneyMinor] = [:], redeemCredits: [PartnerID: MoneyMinor] = [:]
        for p in Set(issued.keys).union(redeemed.keys).union(expired.keys).sorted() {
            // Every partner with an entry in the run, or expired points, has figures (and gets
            // a notice), even when its entries cancel out to zero.
            if let r = ranges[p] { sequenceRanges[p] = r }
            if let terms = configuration.partners[p] {
                (issuePrices[p], redeemCredits[p]) = (terms.issuePricePer1000, terms.redeemCreditPer1000)
                figures.append(try PartnerFigures(
                    partner: p, issued: Points(issued[p] ?? 0), redeemed: Points(redeemed[p] ?? 0), expired: Points(expired[p] ?? 0), terms: terms))
            } else if ranges[p] == nil {
                // A partner that has left, with nothing in this run but the breakage of its lots
                // (points a reversal at another partner gave back to them after it left, which
                // then expired): reported, never priced, at the prices of its last run. Its
                // notice waits for a `notice_url` like any partner's missing from the
                // configuration (docs/OPERATIONS.md).
                let last = try Row.fetchOne(
                    db, sql: "SELECT issue_price_per_1000, redeem_credit_per_1000 FROM run_partner WHERE partner = ? ORDER BY run_number DESC LIMIT 1",
                    arguments: [p.rawValue])
                issuePrices[p] = MoneyMinor(last?["issue_price_per_1000"] ?? 0)
                redeemCredits[p] = MoneyMinor(last?["redeem_credit_per_1000"] ?? 0)
                figures.append(PartnerFigures(
                    partner: p, issuedPoints: .zero, redeemedPoints: .zero, expiredPoints: Points(expired[p] ?? 0),
                    payableMinor: .zero, receivableMinor: .zero, netMinor: .zero))
            } else {
                let file = configuration.directory.map { URL(fileURLWithPath: $0).appendingPathComponent("\(p).toml").path } ?? "\(p).toml"
                throw SettlementError(description: "partner \(p) has entries in this run but no terms in the configuration (\(file)): put its file back to settle; a partner leaves only once none of its points are outstanding (docs/OPERATIONS.md)")
            }
        }
        try confirmAgainstEntries(
            RunRows.through(last, from: first, early: early, db), ranges: ranges, issued: issued, redeemed: redeemed, moved: moved)
        let flows = moved.filter { $0.value != 0 }
            .map { Flow(issuer: $0.key.issuer, redeemer: $0.key.redeemer, points: Points($0.value)) }
            .sorted { ($0.issuer, $0.redeemer) < ($1.issuer, $1.redeemer) }
        // Invariant 5 before anything is recorded: the figures come from running totals and
        // flows the writer kept, and a run, once closed, is paid and never changes. Totals that
        // disagree with each other (a damaged or edited database) stop the run here.
        var into: [PartnerID: Int64] = [:]
        for f in flows { into[f.redeemer, default: 0] += f.points.value }
        for f in figures where (into[f.partner] ?? 0) != f.redeemedPoints.value {
            throw SettlementError(description: "the coalition database disagrees with itself: flows into \(f.partner) sum to \(into[f.partner] ?? 0) points, its redeemed points are \(f.redeemedPoints.value); nothing was settled. Run `clearhouse verify`")
        }
        if let stray = into.keys.first(where: { p in !figures.contains { $0.partner == p } }) {
            throw SettlementError(description: "the coalition database disagrees with itself: flows into \(stray) sum to \(into[stray]!) points but it redeemed nothing in this run; nothing was settled. Run `clearhouse verify`")
        }
        let totals = try RunTotals(figures)
        let run = SettlementRun(
            number: number,
            id: SettlementRun.id(number: number, restoredAt: try String.fetchOne(db, sql: "SELECT restored_at FROM run_naming WHERE id = 1")),
            cutoff: cutoff, firstJournalID: first, lastJournalID: last,
            partners: figures, flows: flows, totals: totals,
            issuePrices: issuePrices, redeemCredits: redeemCredits)
        try record(db, run, ranges: sequenceRanges, now: now)
        // The lots this run expired (left in `temp.expiring_lot` by `expireLots`), lot by lot.
        try db.execute(
            sql: "INSERT INTO run_expiry (run_number, issuer, lot_id, member, points) SELECT ?, issuer, id, member, points FROM temp.expiring_lot",
            arguments: [number])
        for (p, snap) in snapshot {
            try db.execute(
                sql: """
                    INSERT INTO run_snapshot (run_number, partner, last_sequence, earned, redeemed, earn_reversed, redemption_reversed)
                    VALUES (?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [number, p.rawValue, snap.lastSequence, snap.totals[0], snap.totals[1], snap.totals[2], snap.totals[3]])
        }
        for (k, v) in flowSnapshot where v != 0 {
            try db.execute(
                sql: "INSERT INTO run_flow_snapshot (run_number, issuer, redeemer, points) VALUES (?, ?, ?, ?)",
                arguments: [number, k.issuer.rawValue, k.redeemer.rawValue, v])
        }
        return run
    }

    /// Before anything is recorded, the run's figures (differences of the running totals the
    /// writer keeps) are confirmed against the entries themselves: the journal rows of the run
    /// (ids `first...last`), re-added per partner and kind and counted, and their lot moves per
    /// issuer and redeemer (`RunRows`). A journal edited or damaged since it was written (a
    /// row's points, kind or partner changed, a row gone, a page unreadable) stops the run: once
    /// its notices go out, a run is paid and never changes. `verify` still checks everything
    /// else (the hash chains, the ledgers, every earlier run).
    private func confirmAgainstEntries(
        _ rows: RunRows, ranges: [PartnerID: SequenceRange], issued: [PartnerID: Int64], redeemed: [PartnerID: Int64],
        moved: [ReplayBook.FlowKey: Int64]
    ) throws {
        func disagree(_ what: String) -> SettlementError {
            SettlementError(description: "the coalition database disagrees with itself: \(what); nothing was settled. Run `clearhouse verify`")
        }
        var byKind: [PartnerID: [Int64]] = [:], count: [PartnerID: Int64] = [:]
        for (text, k) in rows.kinds {
            guard let p = PartnerID(text) else { throw disagree("the journal names an invalid partner id") }
            byKind[p] = Array(k[0..<4])
            count[p] = k[4]
        }
        for p in Set(byKind.keys).union(ranges.keys).sorted() {
            let k = byKind[p] ?? [0, 0, 0, 0]
            let expected = ranges[p]?.count ?? 0
            if count[p] ?? 0 != expected {
                throw disagree("the journal holds \(count[p] ?? 0) entries of \(p) in this run, the running totals \(expected)")
            }
            if k[0] - k[2] != issued[p] ?? 0 || k[1] - k[3] != redeemed[p] ?? 0 {
                throw disagree("\(p)'s entries in this run add up to \(k[0] - k[2]) issued and \(k[1] - k[3]) redeemed points, the running totals to \(issued[p] ?? 0) and \(redeemed[p] ?? 0)")
            }
        }
        var flows: [ReplayBook.FlowKey: Int64] = [:]
        for (pair, points) in rows.flows where points != 0 {
            guard let issuer = PartnerID(pair.issuer), let redeemer = PartnerID(pair.redeemer) else {
                throw disagree("a lot move names an invalid partner id")
            }
            flows[ReplayBook.FlowKey(issuer: issuer, redeemer: redeemer)] = points
        }
        if let key = Set(flows.keys).union(moved.keys).sorted(by: { ($0.issuer, $0.redeemer) < ($1.issuer, $1.redeemer) })
            .first(where: { flows[$0] ?? 0 != moved[$0] ?? 0 })
        {
            throw disagree("the lot moves \(key.issuer) -> \(key.redeemer) of this run add up to \(flows[key] ?? 0) points, the running flows to \(moved[key] ?? 0)")
        }
    }

    private func flowKey(_ row: Row) throws -> ReplayBook.FlowKey {
        ReplayBook.FlowKey(issuer: try partnerID(row.text("issuer")), redeemer: try partnerID(row.text("redeemer")))
    }

    private func partnerID(_ text: String) throws -> PartnerID {
        guard let p = PartnerID(text) else { throw StoreError("invalid partner id \(text) in the coalition database") }
        return p
    }

    private func record(_ db: Database, _ run: SettlementRun, ranges: [PartnerID: SequenceRange], now: Instant) throws {
        // The prices of the day are stored with the figures, so that verify can recompute
        // the money from the points even after the terms change.
        try db.execute(
            sql: """
                INSERT INTO run (number, id, cutoff_ms, first_journal_id, last_journal_id, created_at_ms,
                  operator_margin_minor, gross_minor, net_transfers_minor, netting_efficiency_ppm, currency)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
            arguments: [
                run.number, run.id, run.cutoff.millisecondsSinceEpoch, run.firstJournalID, run.lastJournalID, now.millisecondsSinceEpoch,
                run.totals.operatorMarginMinor.value, run.totals.grossMinor.value, run.totals.netTransfersMinor.value,
                run.totals.nettingEfficiencyPPM, configuration.coalition.currency,
            ])
        for f in run.partners {
            try db.execute(
                sql: """
                    INSERT INTO run_partner (run_number, partner, issued_points, redeemed_points, expired_points,
                      issue_price_per_1000, redeem_credit_per_1000, payable_minor, receivable_minor, net_minor,
                      entry_count, first_sequence, last_sequence)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    run.number, f.partner.rawValue, f.issuedPoints.value, f.redeemedPoints.value, f.expiredPoints.value,
                    run.issuePrices[f.partner]!.value, run.redeemCredits[f.partner]!.value,
                    f.payableMinor.value, f.receivableMinor.value, f.netMinor.value,
                    ranges[f.partner]?.count ?? 0, ranges[f.partner]?.first, ranges[f.partner]?.last,
                ])
        }
        // The notices' outbox, in the same transaction: the run never exists without them.
        for f in run.partners {
            let notice = SettlementNotice(
                run: run.id, cutoff: run.cutoff, currency: configuration.coalition.currency, figures: f,
                issuePricePer1000: run.issuePrices[f.partner]!, redeemCreditPer1000: run.redeemCredits[f.partner]!)
            try db.execute(
                sql: """
                    INSERT INTO notice (id, run_number, partner, body, created_at_ms, state, next_attempt_at_ms)
                    VALUES (?, ?, ?, ?, ?, 'pending', ?)
                    """,
                arguments: [notice.id, run.number, f.partner.rawValue, Data(notice.body.utf8), now.millisecondsSinceEpoch, now.millisecondsSinceEpoch])
        }
        for flow in run.flows {
            try db.execute(
                sql: "INSERT INTO run_flow (run_number, issuer, redeemer, points) VALUES (?, ?, ?, ?)",
                arguments: [run.number, flow.issuer.rawValue, flow.redeemer.rawValue, flow.points.value])
        }
    }

    /// Every closed run, oldest first.
    public func runs() throws -> [SettlementRun] {
        try coalition.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM run ORDER BY number").map { try Store.loadRun(db, $0) }
        }
    }

    /// The closed run with this id (`R000042`), or nil: read through the run's unique id, not
    /// out of every run.
    public func run(id: String) throws -> SettlementRun? {
        try coalition.read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM run WHERE id = ?", arguments: [id]).map { try Store.loadRun(db, $0) }
        }
    }

    /// A closed run as recorded. A value of the wrong type (a file altered or damaged) is an
    /// error naming the run and column, never a trap or a number rounded toward zero.
    static func loadRun(_ db: Database, _ row: Row) throws -> SettlementRun {
        let number = try row.int64("number")
        do {
            var issuePrices: [PartnerID: MoneyMinor] = [:], redeemCredits: [PartnerID: MoneyMinor] = [:]
            let partners = try Row.fetchAll(db, sql: "SELECT * FROM run_partner WHERE run_number = ? ORDER BY partner", arguments: [number]).map { r in
                guard let p = PartnerID(try r.text("partner")) else { throw StoreError("invalid partner") }
                issuePrices[p] = MoneyMinor(try r.int64("issue_price_per_1000"))
                redeemCredits[p] = MoneyMinor(try r.int64("redeem_credit_per_1000"))
                return try PartnerFigures(p, recordedIn: r)
            }
            let flows = try Row.fetchAll(db, sql: "SELECT * FROM run_flow WHERE run_number = ? ORDER BY issuer, redeemer", arguments: [number]).map { r in
                guard let i = PartnerID(try r.text("issuer")), let d = PartnerID(try r.text("redeemer")) else { throw StoreError("invalid flow") }
                return Flow(issuer: i, redeemer: d, points: Points(try r.int64("points")))
            }
            var totals = try RunTotals(partners)
            totals.nettingEfficiencyPPM = try row.int64("netting_efficiency_ppm")
            return SettlementRun(
                number: number, id: try row.text("id"), cutoff: Instant(millisecondsSinceEpoch: try row.int64("cutoff_ms")),
                firstJournalID: try row.int64("first_journal_id"), lastJournalID: try row.int64("last_journal_id"), partners: partners,
                flows: flows, totals: totals, issuePrices: issuePrices, redeemCredits: redeemCredits)
        } catch {
            throw StoreError("run \(number): \(error)")
        }
    }
}

/// The journal rows and lot moves of a range of journal ids, re-added: per partner, the points
/// by kind and the count of entries; per issuer and redeemer, the points moved. Read in one
/// pass in id order through SQLite's C API (a GROUP BY would sort every row first).
struct RunRows {
    /// The first id of the range and the last one added.
    var first: Int64
    var through: Int64
    /// Partner -> [earned, redeemed, earn reversed, redemption reversed, entries].
    var kinds: [String: [Int64]] = [:]
    var flows: [Pair: Int64] = [:]

    struct Pair: Hashable {
        var issuer: String
        var redeemer: String
    }

    /// The rows after the last run, as far as the journal goes now.
    static func afterLastRun(_ db: Database) throws -> RunRows {
        let (first, last) = try bounds(db)
        var rows = RunRows(first: first, through: first - 1)
        try rows.add(db, first, last, sign: 1)
        return rows
    }

    /// The same, read in `Limits.settlePassesMax` slices of the id range at once, each on its
    /// own reader connection (rows up to the journal's end as read first are committed and never
    /// change, so every slice's snapshot holds them).
    static func afterLastRun(_ pool: DatabasePool) throws -> RunRows {
        let (first, last) = try pool.read(bounds)
        let passes = Int64(Limits.settlePassesMax)
        // first >= 1: no overflow; no slice when the journal ends before first.
        let size = last >= first ? (last - first) / passes + 1 : 1
        let slices = last >= first ? stride(from: first, through: last, by: Int(size)).map { ($0, last - $0 < size ? last : $0 + (size - 1)) } : []
        let results = Mutex<[Result<RunRows, any Error>?]>(Array(repeating: nil, count: slices.count))
        DispatchQueue.concurrentPerform(iterations: slices.count) { i in
            let result = Result {
                try pool.read { db in
                    var part = RunRows(first: slices[i].0, through: slices[i].0 - 1)
                    try part.add(db, slices[i].0, slices[i].1, sign: 1)
                    return part
                }
            }
            results.withLock { $0[i] = result }
        }
        var rows = RunRows(first: first, through: first - 1)
        for result in results.withLock({ $0 }) {
            let part = try result!.get()
            for (partner, k) in part.kinds {
                for j in 0..<5 {
                    let before = rows.kinds[partner]?[j] ?? 0
                    rows.kinds[partner, default: [0, 0, 0, 0, 0]][j] = try sum(before, 1, k[j])
                }
            }
            for (pair, points) in part.flows { rows.flows[pair] = try sum(rows.flows[pair] ?? 0, 1, points) }
        }
        rows.through = max(first - 1, last)
        return rows
    }

    /// `total + sign × points` (sign ±1), or an error past Int64 (only an edited journal gets there).
    static func sum(_ total: Int64, _ sign: Int64, _ points: Int64) throws -> Int64 {
        let (r, overflow) = sign < 0 ? total.subtractingReportingOverflow(points) : total.addingReportingOverflow(points)
        guard !overflow else { throw StoreError("the run's rows add up past what a 64-bit integer holds: the journal is damaged") }
        return r
    }

    private static func bounds(_ db: Database) throws -> (Int64, Int64) {
        let first = ((try Store.lastRun(db))?[2] ?? Int64(0)) + 1
        return (first, try Int64.fetchOne(db, sql: "SELECT MAX(id) FROM journal") ?? 0)
    }

    /// The rows `first...last`: `early` (summed before the lock, from the same first id) with
    /// the rows since added, or those past `last` taken off; all of them again otherwise.
    static func through(_ last: Int64, from first: Int64, early: RunRows?, _ db: Database) throws -> RunRows {
        guard var rows = early, rows.first == first else {
            var rows = RunRows(first: first, through: first - 1)
            try rows.add(db, first, last, sign: 1)
            return rows
        }
        if rows.through < last {
            try rows.add(db, rows.through + 1, last, sign: 1)
        } else if rows.through > last {
            try rows.add(db, last + 1, rows.through, sign: -1)
        }
        rows.through = last
        return rows
    }

    private mutating func add(_ db: Database, _ from: Int64, _ to: Int64, sign: Int64) throws {
        guard from <= to else { return }
        let entries = try FastStatement(db, "SELECT partner, kind, points FROM journal WHERE id BETWEEN ? AND ?")
        try entries.bind(1, from); try entries.bind(2, to)
        defer { entries.finish() }
        while try entries.step() {
            let kind = Int(try entries.int64(1))
            guard (1...4).contains(kind) else { throw StoreError("the journal holds an unknown kind \(kind)") }
            let partner = try entries.text(0), points = try entries.int64(2)
            let before = kinds[partner]?[kind - 1] ?? 0
            kinds[partner, default: [0, 0, 0, 0, 0]][kind - 1] = try RunRows.sum(before, sign, points)
            kinds[partner]![4] += sign
        }
        let moves = try FastStatement(db, "SELECT issuer, redeemer, points FROM lot_move WHERE entry_id BETWEEN ? AND ?")
        try moves.bind(1, from); try moves.bind(2, to)
        defer { moves.finish() }
        while try moves.step() {
            let pair = Pair(issuer: try moves.text(0), redeemer: try moves.text(1)), points = try moves.int64(2)
            flows[pair] = try RunRows.sum(flows[pair] ?? 0, sign, points)
        }
        through = max(through, to)
    }
}

extension PartnerFigures {
    /// A partner's figures as a run recorded them (`run_partner`'s columns, by name, in any row
    /// that has them); a value of the wrong type throws.
    init(_ partner: PartnerID, recordedIn r: Row) throws {
        self.init(
            partner: partner, issuedPoints: Points(try r.int64("issued_points")), redeemedPoints: Points(try r.int64("redeemed_points")),
            expiredPoints: Points(try r.int64("expired_points")), payableMinor: MoneyMinor(try r.int64("payable_minor")),
            receivableMinor: MoneyMinor(try r.int64("receivable_minor")), netMinor: MoneyMinor(try r.int64("net_minor")))
    }
}
