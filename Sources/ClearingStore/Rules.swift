import ClearingDomain
import Foundation
import GRDB

/// What deciding one posting came to: refused, or its balance and the writes that apply it.
enum Effects {
    case refused(Problem)
    /// `write(statements, journalID, &state)` runs after the journal row is inserted and writes the
    /// posting's lots, takes and moves (the member's `open_points` is the decider's:
    /// `Rules.changeMember`); it adds the posting's changes to the flows to `state.flows`, which
    /// the batch writes once (`BatchState.save`), and, with the lot cache, its changes to open
    /// lots to `state.openLotChanges` (`OpenLotChanges`). `lots` is what it does to the member's
    /// open lots.
    case apply(balanceAfter: Points, lots: LotChange, write: (WriterStatements, Int64, inout BatchState) throws -> Void)
}

/// The business rules of CONTRACT §5, over the coalition database. Each function reads what
/// it needs, checks everything, and only returns writes when the posting is accepted.
enum Rules {
    static func earn(
        _ w: WriterStatements, _ s: Submission, journalID: Int64, now: Instant, terms: CoalitionTerms, _ state: inout BatchState
    ) throws -> Effects {
        let n = s.event.points
        let expires = try terms.lotExpiry(acceptedAt: now)
        let before = FIFO.balance(try state.openLots(w, s.event.member), at: now)
        let after = try before.adding(n)
        let lot = OpenLot(id: journalID, issuer: s.partner, remaining: n, expiresAt: expires)
        return .apply(balanceAfter: after, lots: .earned(lot)) { w, id, state in
            let lot = try w(.insertLot)
            try lot.bind(1, id); try lot.bind(2, s.event.member.rawValue); try lot.bind(3, s.partner.rawValue)
            try lot.bind(4, n.value); try lot.bind(5, expires?.millisecondsSinceEpoch)
            try lot.done()
            try changeOpenLot(w, &state, s.event.member, id, by: n.value, holding: 0)
        }
    }

    static func redeem(_ w: WriterStatements, _ s: Submission, now: Instant, _ state: inout BatchState) throws -> Effects {
        let n = s.event.points
        let lots = try state.openLots(w, s.event.member)
        let before = FIFO.balance(lots, at: now)
        guard let takes = FIFO.take(n, from: lots, at: now) else {
            return .refused(Problem(.insufficientPoints,
                "member \(s.event.member) has \(before) spendable points; \(n) were asked for"))
        }
        return .apply(balanceAfter: try before.subtracting(n), lots: .took(takes)) { w, id, state in
            for (i, t) in takes.enumerated() {
                // The lot's points before this take, as the take was decided from them.
                guard let held = lots.index(ofLot: t.lotID).map({ lots[$0].remaining.value }) else {
                    throw CachedLotsDisagreement("take from lot \(t.lotID), which is not among the member's open lots")
                }
                try changeOpenLot(w, &state, s.event.member, t.lotID, by: -t.points.value, holding: held)
                let take = try w(.insertTake)
                try take.bind(1, id); try take.bind(2, Int64(i)); try take.bind(3, t.lotID); try take.bind(4, t.issuer.rawValue); try take.bind(5, t.points.value)
                try take.done()
                try move(w, entry: id, position: i, lot: t.lotID, issuer: t.issuer, redeemer: s.partner, points: t.points.value, &state.flows)
            }
        }
    }

    static func reverseEarn(_ w: WriterStatements, _ s: Submission, now: Instant, _ state: inout BatchState) throws -> Effects {
        let n = s.event.points
        let original: Lookup.Original
        switch try Lookup.original(w, s) {
        case .failure(let p): return .refused(p)
        case .success(let e): original = e
        }
        // The earn's member is this reversal's (`Lookup.original` refused any other). Its open
        // lots are read from SQLite below and changed there at once: the batch's changes to
        // them are written first.
        try state.writeOpenLots(w, of: s.event.member)
        let select = try w(.selectLotLeft)
        try select.bind(1, original.journalID)
        guard let (remaining, expires) = try select.oneRow({ (try $0.int64(0), try $0.optionalInt64(1)) }) else {
            throw StoreError("earn \(s.partner) #\(original.sequence) has no lot")
        }
        let left = (expires.map { $0 > now.millisecondsSinceEpoch } ?? true) ? remaining : 0
        guard n.value <= left else {
            return .refused(Problem(.reversalExceedsOriginal,
                "only \(left) points of \(original.reference)'s lot are left to reverse; \(n) were asked for"))
        }
        let before = FIFO.balance(try state.openLots(w, s.event.member), at: now)
        return .apply(balanceAfter: try before.subtracting(n), lots: .reread) { w, _, _ in
            let reversed = try w(.addToLotReversed)
            try reversed.bind(1, n.value); try reversed.bind(2, original.journalID)
            try reversed.done()
            guard w.db.changesCount == 1 else { throw StoreError("earn \(s.partner) #\(original.sequence) has no lot") }
            try writeOpenLot(w, s.event.member, original.journalID, from: remaining, to: remaining - n.value)
        }
    }

    static func reverseRedemption(_ w: WriterStatements, _ s: Submission, now: Instant, _ state: inout BatchState) throws -> Effects {
        let n = s.event.points
        let original: Lookup.Original
        switch try Lookup.original(w, s) {
        case .failure(let p): return .refused(p)
        case .success(let e): original = e
        }
        // The points go back into the member's open lots in SQLite at once (below): the batch's
        // changes to them are written first.
        try state.writeOpenLots(w, of: s.event.member)
        let takes = try Lookup.takes(w, redemption: original.journalID)
        guard let returns = FIFO.giveBack(n, to: takes) else {
            return .refused(Problem(.reversalExceedsOriginal,
                "only \(FIFO.reversible(takes)) points of \(original.reference) are left to reverse; \(n) were asked for"))
        }
        let before = FIFO.balance(try state.openLots(w, s.event.member), at: now)
        var gain = Points.zero
        // Lots whose expiry has passed: the points given back to them are not spendable, and
        // the next run expires them (`lot_reopened`; the run finds the other expiring lots by
        // their expiry, after the previous run's cutoff, which these may be before).
        var reopened: [Int64] = []
        for r in returns {
            let select = try w(.selectLotExpiry)
            try select.bind(1, r.lotID)
            guard let expires = try select.oneRow({ try $0.optionalInt64(0) }) else {
                throw StoreError("take of redemption \(original.reference) names lot \(r.lotID), which does not exist")
            }
            if expires.map({ $0 > now.millisecondsSinceEpoch }) ?? true {
                gain = try gain.adding(r.points)
            } else {
                reopened.append(r.lotID)
            }
        }
        return .apply(balanceAfter: try before.adding(gain), lots: .reread) { w, id, state in
            for (j, r) in returns.enumerated() {
                let returned = try w(.addToTakeReturned)
                try returned.bind(1, r.points.value); try returned.bind(2, original.journalID); try returned.bind(3, Int64(r.takeIndex))
                try returned.done()
                guard w.db.changesCount == 1 else { throw StoreError("redemption \(original.reference) has no take \(r.takeIndex)") }
                // Points given back to a lot that lost its last ones, or to one with some left.
                let back = try w(.returnToOpenLot)
                try back.bind(1, s.event.member.rawValue); try back.bind(2, r.lotID); try back.bind(3, r.points.value)
                try back.done()
                try move(w, entry: id, position: j, lot: r.lotID, issuer: r.issuer, redeemer: s.partner, points: -r.points.value, &state.flows)
            }
            for lot in reopened {
                let insert = try w(.insertReopened)
                try insert.bind(1, lot)
                try insert.done()
            }
        }
    }

    private static func move(
        _ w: WriterStatements, entry: Int64, position: Int, lot: Int64, issuer: PartnerID, redeemer: PartnerID, points: Int64,
        _ flows: inout FlowChanges
    ) throws {
        let move = try w(.insertMove)
        try move.bind(1, entry); try move.bind(2, Int64(position)); try move.bind(3, lot)
        try move.bind(4, issuer.rawValue); try move.bind(5, redeemer.rawValue); try move.bind(6, points)
        try move.done()
        flows.add(points, issuer: issuer, redeemer: redeemer)
    }

    /// Changes the points left in one of the member's lots from `held` (what the posting was
    /// decided from) by `delta`. With the lot cache, the change joins the batch's
    /// (`OpenLotChanges`, written in key order by `BatchState.writeOpenLots`); without it (the
    /// savepoint path), it is written at once (`writeOpenLot`). Either way the row must hold
    /// exactly `held`, or the posting (with its batch) fails.
    private static func changeOpenLot(
        _ w: WriterStatements, _ state: inout BatchState, _ member: MemberID, _ lot: Int64, by delta: Int64, holding held: Int64
    ) throws {
        let after = held + delta
        guard after >= 0 else { throw StoreError("lot \(lot) would hold \(after) points") }
        if state.lots.enabled {
            try state.openLotChanges.change(member, lot, from: held, to: after)
        } else {
            try writeOpenLot(w, member, lot, from: held, to: after)
        }
    }

    /// Writes a change of the points left in one of the member's lots, from `held` to `after`:
    /// a new row for a new lot (`held` 0), an update, or the row's deletion when none are left.
    /// The row must hold exactly `held`; if it does not, the decision was made from something
    /// other than the database, and the posting (with its batch) fails.
    static func writeOpenLot(_ w: WriterStatements, _ member: MemberID, _ lot: Int64, from held: Int64, to after: Int64) throws {
        guard after >= 0 else { throw StoreError("lot \(lot) would hold \(after) points") }
        let write: FastStatement
        if held == 0 {
            if after == 0 { return }  // a new lot emptied in the same batch: no row to write
            write = try w(.insertOpenLot)
            try write.bind(1, member.rawValue); try write.bind(2, lot); try write.bind(3, after)
        } else if after == 0 {
            write = try w(.deleteOpenLot)
            try write.bind(1, member.rawValue); try write.bind(2, lot); try write.bind(3, held)
        } else {
            write = try w(.updateOpenLot)
            try write.bind(1, after); try write.bind(2, member.rawValue); try write.bind(3, lot); try write.bind(4, held)
        }
        try write.done()
        guard w.db.changesCount == 1 else {
            throw CachedLotsDisagreement("lot \(lot) does not hold the \(held) points the posting was decided from")
        }
    }

    /// Adds `delta` to the member's `open_points`; an earn's `firstJournalID` makes the row of
    /// a member new to the coalition.
    ///
    /// With `expected` (the points of the cached lots the posting was decided from, which
    /// `open_points` must equal), the row must hold exactly that: the UPDATE has it in its
    /// WHERE, and its count of changed rows is the check (no read, no `RETURNING`, which
    /// SQLite runs through an ephemeral table: as dear as the update itself). A row that
    /// holds anything else throws `CachedLotsDisagreement`.
    static func changeMember(_ w: WriterStatements, _ member: MemberID, by delta: Int64, expected: Int64?, firstJournalID: Int64?) throws {
        let update: FastStatement
        if let expected {
            update = try w(.updateMemberFrom)
            try update.bind(1, expected + delta); try update.bind(2, member.rawValue); try update.bind(3, expected)
        } else {
            update = try w(.addToMember)
            try update.bind(1, delta); try update.bind(2, member.rawValue)
        }
        try update.done()
        if w.db.changesCount == 1 { return }
        // No row changed: a member new to the coalition (its first earn; no lots, so nothing
        // expected), or a row that does not hold what the cached lots say (the INSERT then
        // meets it).
        guard let firstJournalID, (expected ?? 0) == 0 else {
            guard let expected else { throw StoreError("the member of lot-holding postings has no row") }
            throw CachedLotsDisagreement("the member's row does not hold the \(expected) points its cached lots do")
        }
        let insert = try w(.insertMember)
        try insert.bind(1, member.rawValue); try insert.bind(2, firstJournalID); try insert.bind(3, delta)
        do {
            try insert.done()
        } catch let error as DatabaseError where error.resultCode == .SQLITE_CONSTRAINT && expected != nil {
            throw CachedLotsDisagreement("the member has a row, but its cached lots are none")
        }
    }
}

/// What a batch's postings changed in their members' `open_points`, written once per member at
/// the end of the batch (`Store.saveMembers`), in the order of the member table's key, rather
/// than one UPDATE per posting at a random place of that table: at a million entries the
/// per-posting updates were about a tenth of the writer's time (docs/BENCHMARKS.md).
///
/// The check each posting made (`Rules.changeMember`: the row holds exactly the points of the
/// cached lots the posting was decided from) is kept whole: the first posting's expectation
/// goes to SQLite with the batch's total, in the UPDATE's WHERE; each later posting's must equal
/// it plus what the earlier postings of the batch added, checked here as it comes. Either way a
/// disagreement throws `CachedLotsDisagreement`. Used only with the lot cache (the savepoint
/// path changes each member at once, inside its posting's savepoint).
struct MemberChanges {
    struct Change {
        /// What the row must hold before the batch's changes (nil: nothing to check).
        var expected: Int64?
        var delta: Int64
        /// The journal id of the batch's first earn of the member: a member new to the coalition
        /// gets its row with it.
        var firstJournalID: Int64?
    }

    private var changes: [MemberID: Change] = [:]

    /// Adds one posting's change; `expected` is what the member's row holds before it (the
    /// points of the cached lots it was decided from).
    mutating func add(_ member: MemberID, by delta: Int64, expected: Int64?, firstJournalID: Int64?) throws {
        // One look-up of the member: the change is made in place (the dictionary's `_modify`).
        try MemberChanges.add(to: &changes[member], by: delta, expected: expected, firstJournalID: firstJournalID)
    }

    private static func add(to slot: inout Change?, by delta: Int64, expected: Int64?, firstJournalID: Int64?) throws {
        guard var c = slot else {
            slot = Change(expected: expected, delta: delta, firstJournalID: firstJournalID)
            return
        }
        if let expected {
            if let first = c.expected {
                guard first + c.delta == expected else {
                    throw CachedLotsDisagreement("the member's row holds \(first + c.delta) points after this batch's earlier postings, but its cached lots \(expected)")
                }
            } else {
                c.expected = expected - c.delta
            }
        }
        c.delta += delta  // at most 10^9 a posting, Limits.postingBatchMax postings: no overflow
        if c.firstJournalID == nil { c.firstJournalID = firstJournalID }
        slot = c
    }

    /// The changes, in the order of `member`'s primary key (SQLite's BINARY collation: member
    /// ids are ASCII, where Swift's order is the same).
    var inKeyOrder: [(member: MemberID, change: Change)] {
        changes.map { ($0.key, $0.value) }.sorted { $0.member.rawValue < $1.member.rawValue }
    }
}

/// What a batch's postings changed in their members' open lots (`lot_open`), written at the end
/// of the batch in the table's key order (member, lot), rather than one write per take or earn
/// at a random place of that table (`BatchState.writeOpenLots`). Used only with the lot cache.
///
/// Each change keeps the check it had when written at once: the first change of a lot in the
/// batch remembers what the row held (`before`; 0: a new lot, no row), which the write checks
/// (the UPDATE's or DELETE's WHERE, or the INSERT's key); each later change of it must start
/// from where the earlier ones left it, checked here as it comes. Either way a disagreement
/// throws `CachedLotsDisagreement`.
///
/// Anything that reads a member's open lots from SQLite during the batch first writes that
/// member's changes (`BatchState.openLots` on a member not cached, the reversals, the debug
/// cross-check), so that SQLite never answers with rows the batch has changed.
struct OpenLotChanges {
    struct Change: Equatable {
        /// What the row holds before the batch (0: no row, a lot of this batch).
        var before: Int64
        /// What it holds after the batch's changes so far (0: no row).
        var after: Int64
    }

    /// Each member's changed lots, in lot order (a member has few: a short sorted list,
    /// searched by halves, costs less than a dictionary of its own; a member with thousands of
    /// lots taken at once costs a search of its list per lot, not a scan).
    private var changes: [MemberID: [(lot: Int64, change: Change)]] = [:]

    /// Adds one change of a lot, decided from `held` points.
    mutating func change(_ member: MemberID, _ lot: Int64, from held: Int64, to after: Int64) throws {
        // One look-up of the member: its list is changed in place (the dictionary's `_modify`).
        try OpenLotChanges.change(&changes[member, default: []], lot, from: held, to: after)
    }

    private static func change(_ lots: inout [(lot: Int64, change: Change)], _ lot: Int64, from held: Int64, to after: Int64) throws {
        let i = lots.lowerBound(of: lot) { $0.lot }
        guard i < lots.count, lots[i].lot == lot else {
            lots.insert((lot, Change(before: held, after: after)), at: i)  // at the end, when lots come in order
            return
        }
        guard lots[i].change.after == held else {
            throw CachedLotsDisagreement("lot \(lot) holds \(lots[i].change.after) points after this batch's earlier postings, but its cached lots \(held)")
        }
        lots[i].change.after = after
    }

    /// The changes of one member's lots, in lot order, taken out.
    mutating func take(_ member: MemberID) -> [(lot: Int64, change: Change)] {
        changes.removeValue(forKey: member) ?? []
    }

    /// The members with changes, in the order of `lot_open`'s key (SQLite's BINARY collation:
    /// member ids are ASCII, where Swift's order is the same).
    var membersInKeyOrder: [MemberID] { changes.keys.sorted { $0.rawValue < $1.rawValue } }

    /// `stored` (a member's open lots as SQLite holds them) with this batch's changes of them
    /// applied: for the debug cross-check, which must not write them early. A lot of this batch
    /// (no row yet) comes from `lot`, its row in the lot table.
    func applied(to stored: [OpenLot], of member: MemberID, lot: (Int64) throws -> OpenLot) rethrows -> [OpenLot] {
        guard let mine = changes[member] else { return stored }
        var result: [OpenLot] = []
        for var l in stored {
            let i = mine.lowerBound(of: l.id) { $0.lot }
            if i < mine.count, mine[i].lot == l.id { l.remaining = Points(mine[i].change.after) }
            if l.remaining.value > 0 { result.append(l) }
        }
        for (id, c) in mine where c.before == 0 && c.after > 0 {
            var l = try lot(id)
            l.remaining = Points(c.after)
            result.append(l)
        }
        return result.sorted { $0.id < $1.id }
    }
}

/// What a batch's postings changed in the all-time flows issuer -> redeemer, written once at the
/// end of the batch (`BatchState.save`) rather than one upsert per take and return.
struct FlowChanges {
    private(set) var points: [ReplayBook.FlowKey: Int64] = [:]

    mutating func add(_ k: Int64, issuer: PartnerID, redeemer: PartnerID) {
        points[ReplayBook.FlowKey(issuer: issuer, redeemer: redeemer), default: 0] += k
    }

    /// Adds the changes to `flow`. A flow never goes below 0 (its CHECK): a return takes back
    /// only what a redemption, in this batch or an earlier one, put there; a net return is
    /// an update of a flow that must exist.
    func save(_ db: Database) throws {
        for (key, k) in points.sorted(by: { ($0.key.issuer, $0.key.redeemer) < ($1.key.issuer, $1.key.redeemer) }) where k != 0 {
            let flow: FastStatement
            if k > 0 {
                flow = try FastStatement(
                    db,
                    """
                    INSERT INTO flow (issuer, redeemer, points) VALUES (?, ?, ?)
                    ON CONFLICT (issuer, redeemer) DO UPDATE SET points = points + excluded.points
                    """)
                try flow.bind(1, key.issuer.rawValue); try flow.bind(2, key.redeemer.rawValue); try flow.bind(3, k)
            } else {
                flow = try FastStatement(db, "UPDATE flow SET points = points + ? WHERE issuer = ? AND redeemer = ?")
                try flow.bind(1, k); try flow.bind(2, key.issuer.rawValue); try flow.bind(3, key.redeemer.rawValue)
            }
            try flow.done()
            guard db.changesCount == 1 else { throw StoreError("flow \(key.issuer) -> \(key.redeemer) missing for a return of \(-k) points") }
        }
    }
}

/// A lot in `lot_open`, or a member's `open_points`, did not hold the points a posting was
/// decided from.
struct CachedLotsDisagreement: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Index lookups in the journal and the lot tables.
enum Lookup {
    /// The earlier entries of a partner under this webhook id and under this reference, in
    /// one query (SQLite answers it from the two unique indexes).
    /// `aliases`: whether any webhook-id alias exists (else the alias table is not read).
    static func earlier(_ db: Database, _ partner: PartnerID, _ id: WebhookID, _ reference: Reference, aliases: Bool) throws -> (Entry?, Entry?) {
        let rows = try Row.fetchAll(
            db.cachedStatement(
                sql: "SELECT \(JournalRow.columns) FROM journal WHERE partner = ? AND (webhook_id = ? OR reference = ?)"),
            arguments: [partner.rawValue, id.rawValue, reference.rawValue])
        var byID: Entry?, byRef: Entry?
        for row in rows {
            let e = try JournalRow.journalEntry(row).0
            if e.webhookID == id { byID = e }
            if e.event.reference == reference { byRef = e }
        }
        if byID == nil, aliases, let row = try Row.fetchOne(
            db.cachedStatement(
                sql: "SELECT \(JournalRow.columns) FROM journal WHERE id = (SELECT journal_id FROM webhook_alias WHERE partner = ? AND webhook_id = ?)"),
            arguments: [partner.rawValue, id.rawValue])
        {
            byID = try JournalRow.journalEntry(row).0
        }
        return (byID, byRef)
    }

    /// Whether the partner has an earlier entry under this webhook-id (its own, or bound to it as
    /// an alias) or this reference: when not (most refusals), `earlier` need not be asked.
    static func mayHaveEarlier(_ w: WriterStatements, _ s: Submission) throws -> Bool {
        let exists = try w(.existsEarlier)
        try exists.bind(1, s.partner.rawValue); try exists.bind(2, s.webhookID.rawValue); try exists.bind(3, s.event.reference.rawValue)
        guard let found = try exists.oneRow({ try $0.int64(0) }) else { throw StoreError("an EXISTS query returned no row") }
        return found != 0
    }

    /// Whether this webhook-id of the partner is bound to an earlier entry as an alias (v14).
    static func isAlias(_ db: Database, _ partner: PartnerID, _ id: WebhookID) throws -> Bool {
        try Bool.fetchOne(
            db.cachedStatement(sql: "SELECT EXISTS (SELECT 1 FROM webhook_alias WHERE partner = ? AND webhook_id = ?)"),
            arguments: [partner.rawValue, id.rawValue]) ?? false
    }

    /// Binds a webhook-id answered as a replay of `journalID` (same reference and content) to
    /// that entry, so that it replays it again, and conflicts with other content.
    static func recordAlias(_ db: Database, _ partner: PartnerID, _ id: WebhookID, journalID: Int64) throws {
        try db.cachedStatement(sql: "INSERT INTO webhook_alias (partner, webhook_id, journal_id) VALUES (?, ?, ?)")
            .execute(arguments: [partner.rawValue, id.rawValue, journalID])
    }

    /// What a reversal needs of its original: the columns it checks, not the whole entry.
    struct Original {
        var journalID: Int64
        var sequence: Int64
        var reference: Reference
    }

    /// The original of a reversal: an earlier event of the same partner, of the matching
    /// kind, naming the same member.
    static func original(_ w: WriterStatements, _ s: Submission) throws -> Result<Original, Problem> {
        guard let ref = s.event.originalReference, let wanted = s.event.kind.originalKind else {
            preconditionFailure("original() of a non-reversal")
        }
        let select = try w(.selectOriginal)
        try select.bind(1, s.partner.rawValue); try select.bind(2, ref.rawValue)
        defer { select.finish() }
        guard try select.step(), try select.int64(2) == Int64(wanted.rawValue) else {
            return .failure(Problem(.unknownOriginal,
                "original_reference \(ref) is not an earlier \(wanted.typeName) of partner \(s.partner)"))
        }
        let member = try select.text(3)
        guard member == s.event.member.rawValue else {
            return .failure(Problem(.memberMismatch,
                "\(ref) belongs to member \(member), not \(s.event.member)"))
        }
        return .success(Original(journalID: try select.int64(0), sequence: try select.int64(1), reference: ref))
    }

    static func openLots(_ db: Database, _ member: MemberID) throws -> [OpenLot] {
        try openLots(FastStatement(db, WriterStatements.Key.selectOpenLots.sql), member)
    }

    static func openLots(_ w: WriterStatements, _ member: MemberID) throws -> [OpenLot] {
        try openLots(w(.selectOpenLots), member)
    }

    private static func openLots(_ select: FastStatement, _ member: MemberID) throws -> [OpenLot] {
        try select.bind(1, member.rawValue)
        defer { select.finish() }
        var lots: [OpenLot] = []
        while try select.step() {
            let id = try select.int64(0)
            guard let issuer = PartnerID(try select.text(1)) else { throw StoreError("lot \(id) has an invalid issuer") }
            let expires = try select.optionalInt64(3)
            lots.append(OpenLot(
                id: id, issuer: issuer, remaining: Points(try select.int64(2)), expiresAt: expires.map { Instant(millisecondsSinceEpoch: $0) }))
        }
        return lots
    }

    static func takes(_ w: WriterStatements, redemption: Int64) throws -> [LotTake] {
        let select = try w(.selectTakes)
        try select.bind(1, redemption)
        defer { select.finish() }
        var takes: [LotTake] = []
        while try select.step() {
            let lot = try select.int64(0)
            guard let issuer = PartnerID(try select.text(1)) else { throw StoreError("take of lot \(lot) has an invalid issuer") }
            takes.append(LotTake(lotID: lot, issuer: issuer, points: Points(try select.int64(2)), returned: Points(try select.int64(3))))
        }
        return takes
    }

    static func insertJournal(_ w: WriterStatements, _ e: Entry, hash: [UInt8]) throws {
        let insert = try w(.insertJournal)
        try insert.bind(1, e.journalID); try insert.bind(2, e.partner.rawValue); try insert.bind(3, e.sequence)
        try insert.bind(4, e.webhookID.rawValue); try insert.bind(5, e.acceptedAt.millisecondsSinceEpoch)
        try insert.bind(6, Int64(e.event.kind.rawValue)); try insert.bind(7, e.event.member.rawValue); try insert.bind(8, e.event.points.value)
        try insert.bind(9, e.event.reference.rawValue); try insert.bind(10, e.event.originalReference?.rawValue)
        try insert.bind(11, e.event.occurredAt?.millisecondsSinceEpoch); try insert.bind(12, e.event.amountMinor?.value)
        try insert.bind(13, e.memberBalance.value); try insert.bind(14, blob: hash)
        try insert.done()
    }

}
