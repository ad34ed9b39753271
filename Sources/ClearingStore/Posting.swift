import ClearingDomain
import Foundation
import GRDB
import Logging
import Synchronization

/// One event to post, as it arrived: whose, under which webhook id, and what.
public struct Submission: Sendable, Equatable {
    public var partner: PartnerID
    public var webhookID: WebhookID
    public var event: Event

    public init(partner: PartnerID, webhookID: WebhookID, event: Event) {
        self.partner = partner
        self.webhookID = webhookID
        self.event = event
    }
}

/// A batch after step 1 of posting: decided and committed to the journal (or refused as a
/// whole), its new entries not yet in the partners' ledgers.
public struct DecidedBatch: Sendable {
    /// Each posting's outcome as decided; `completeInLedgers` makes it final.
    var outcomes: [PostingOutcome]
    /// Each posting's partner (parallel to `outcomes`).
    var partners: [PartnerID]
    /// The entries this batch created, by partner, in sequence order.
    var fresh: [PartnerID: [ChainedEntry]]
    /// True when the outcomes need no ledger step (all refused, or the writer stopped).
    var isFinal: Bool

    static func final(_ outcomes: [PostingOutcome]) -> DecidedBatch {
        DecidedBatch(outcomes: outcomes, partners: [], fresh: [:], isFinal: true)
    }
}

extension Store {
    /// Decides and writes a batch of postings: the single writer's one step (group commit),
    /// `decide` then `completeInLedgers`. `PostingWriter` runs the two on two threads, so that
    /// one batch is decided while the previous one is written to the ledgers.
    public func post(_ batch: [Submission]) -> [PostingOutcome] {
        completeInLedgers(decide(batch))
    }

    /// Step 1: one IMMEDIATE transaction on `coalition.sqlite` decides every posting in order,
    /// against the state the earlier ones left, and writes the accepted ones to the journal
    /// with their lots, takes, moves and flows. COMMIT = one fsync: the batch is decided.
    ///
    /// A refused posting writes nothing. If the journal cannot commit, every posting of the
    /// batch gets `unavailable` and nothing is written.
    public func decide(_ batch: [Submission]) -> DecidedBatch {
        precondition(batch.count <= Limits.postingBatchMax, "batch larger than postingBatchMax")
        let started = writerState.withLock { state -> String? in
            if state.crashed { return "the writer stopped at a fault point; reopen the store" }
            if state.closed { return "the store is closed" }
            return nil
        }
        if let reason = started { return .final(batch.map { _ in .rejected(Problem(.unavailable, reason, retryAfterSeconds: Limits.overloadRetryAfterSeconds)) }) }
        if batch.isEmpty { return .final([]) }
        // A partner whose ledger could not be written takes no posting, new or replayed, until
        // its ledger has caught up from the journal: nothing is written for a posting that
        // cannot be acknowledged.
        let lagging = writerState.withLock { $0.laggingLedgers }
        let blocked = lagging.isEmpty ? [] : catchUp(lagging)

        let decided: [PostingOutcome]
        let fresh: [PartnerID: [ChainedEntry]]
        do {
            do {
                (decided, fresh) = try decideAndCommit(batch, isolated: false, blocked: blocked)
            } catch let error as DatabaseError where error.isHeldElsewhere {
                // Another process (`settle`, `post`, a backup tool) held the journal past the
                // busy timeout: nothing was written, and deciding posting by posting would
                // only wait as long again, with every caller of the batch still waiting.
                throw error
            } catch let error where !(error is SimulatedCrash) {
                // Something in the batch hit a storage error and the whole transaction rolled
                // back. Decide it again with each posting in its own savepoint, so that one
                // poisoned posting costs only itself, and without the lot cache, which the
                // failed batch took with it (a batch of one too: its error may have come from
                // the cache, e.g. a lot overdrawn by a stale copy).
                logger.warning("batch failed; retrying posting by posting", metadata: ["error": "\(error)"])
                (decided, fresh) = try decideAndCommit(batch, isolated: true, blocked: blocked)
            }
        } catch is SimulatedCrash {
            return .final(batch.map { _ in .rejected(Problem(.unavailable, "writer stopped", retryAfterSeconds: Limits.overloadRetryAfterSeconds)) })
        } catch let error as DatabaseError where error.isHeldElsewhere {
            logger.warning("the journal is held by another process past the busy timeout", metadata: ["error": "\(error)"])
            return .final(batch.map { _ in
                .rejected(Problem(.unavailable, "the journal is busy (another process holds it); retry later", retryAfterSeconds: Limits.overloadRetryAfterSeconds))
            })
        } catch {
            logger.error("journal commit failed", metadata: ["error": "\(error)", "disk": "\(diskCondition() ?? "no trouble seen")"])
            return .final(batch.map { _ in .rejected(Problem(.unavailable, "storage is failing; retry later", retryAfterSeconds: Limits.storageRetryAfterSeconds)) })
        }
        if crashes(at: .afterJournalCommit) {
            return .final(batch.map { _ in .rejected(Problem(.unavailable, "writer stopped", retryAfterSeconds: Limits.overloadRetryAfterSeconds)) })
        }
        return DecidedBatch(outcomes: decided, partners: batch.map(\.partner), fresh: fresh, isFinal: false)
    }

    /// Step 2: each touched partner ledger gets the batch's new entries in one transaction
    /// (one fsync each, one ledger after another). Only then are outcomes final, so a 2xx is
    /// never sent for an entry not in its ledger.
    ///
    /// If a ledger cannot be written, its partner is marked lagging: its postings get
    /// `unavailable` (they are decided; a retry answers 200 with the original body once the
    /// ledger has caught up). Every later call first copies what a lagging ledger lacks from
    /// the journal; while that fails, that partner's created and replayed outcomes stay
    /// `unavailable`. Calls must come in the order their batches were decided.
    public func completeInLedgers(_ d: DecidedBatch) -> [PostingOutcome] {
        if d.isFinal { return d.outcomes }
        let stopped = { d.outcomes.map { _ in PostingOutcome.rejected(Problem(.unavailable, "writer stopped", retryAfterSeconds: Limits.overloadRetryAfterSeconds)) } }
        // A writer stopped at a fault point is a dead process: it writes and answers nothing more.
        if writerState.withLock({ $0.crashed }) { return stopped() }
        // One ledger after another, on this thread: a batch under load touches a few ledgers,
        // and handing them to other threads cost more CPU (their wake-ups) than it saved in
        // time (docs/BENCHMARKS.md, session 18). Under fault injection, a stop after the k-th
        // ledger commit leaves the others of the batch unwritten, as a crash would.
        var failed: Set<PartnerID> = []
        for partner in d.fresh.keys.sorted() {
            do {
                try appendToLedger(ledger(partner), d.fresh[partner]!)
            } catch {
                logger.error("ledger commit failed", metadata: ["partner": "\(partner)", "error": "\(error)", "disk": "\(diskCondition() ?? "no trouble seen")"])
                failed.insert(partner)
            }
            if crashes(at: .afterLedgerCommit) { return stopped() }
        }
        // A replay is acknowledged only once its entry is in the partner's ledger: another
        // process (`clearhouse post` beside `serve`) may have decided it and not copied it yet.
        // Partners with new entries in this batch are covered by their append (it first copies
        // what the ledger lacks); for the others, one read of the ledger's last sequence.
        var replayedThrough: [PartnerID: Int64] = [:]
        for (partner, outcome) in zip(d.partners, d.outcomes) where d.fresh[partner] == nil {
            if case .replayed(let e) = outcome { replayedThrough[partner] = max(replayedThrough[partner] ?? 0, e.sequence) }
        }
        for (partner, through) in replayedThrough.sorted(by: { $0.key < $1.key }) where !failed.contains(partner) {
            do {
                try catchUpLedger(partner, through: through)
            } catch {
                logger.error("ledger catch-up for a replay failed", metadata: ["partner": "\(partner)", "error": "\(error)"])
                failed.insert(partner)
            }
        }
        writerState.withLock { $0.laggingLedgers.formUnion(failed) }
        // One more try for the ledgers that failed just now. Other lagging ledgers do not
        // decide this batch's outcomes (their new entries and replays were handled above) and
        // are caught up by the decider before its next batch.
        if !failed.isEmpty {
            failed = catchUp(failed)
        }
        if failed.isEmpty { return d.outcomes }
        return zip(d.partners, d.outcomes).map { partner, outcome in
            switch outcome {
            case .created, .replayed:
                // Created in this batch, or a replay of an entry its ledger may still lack:
                // not yet acknowledged.
                if failed.contains(partner) {
                    return .rejected(Problem(.unavailable, "accepted but not yet in the partner ledger; retry for the result", retryAfterSeconds: Limits.storageRetryAfterSeconds))
                }
                return outcome
            case .rejected: return outcome
            }
        }
    }

    /// Copies into each of these ledgers what the journal holds beyond it. Returns the
    /// partners whose ledgers still lag (and keeps them marked; only the ones caught up are
    /// unmarked, since the decider and the ledger stage may both call this).
    func catchUp(_ partners: Set<PartnerID>) -> Set<PartnerID> {
        var still: Set<PartnerID> = []
        for partner in partners.sorted() {
            do {
                let copied = try catchUpLedger(partner, through: journalHead(partner))
                logger.notice("lagging ledger caught up", metadata: ["partner": "\(partner)", "entries": "\(copied)"])
            } catch {
                logger.error("ledger catch-up failed", metadata: ["partner": "\(partner)", "error": "\(error)"])
                still.insert(partner)
            }
        }
        writerState.withLock { $0.laggingLedgers.subtract(partners.subtracting(still)) }
        return still
    }

    /// The transaction of step 1, which decides every posting and commits.
    /// Not isolated (the fast path), a storage error anywhere rolls back the whole batch; isolated,
    /// each posting runs in a savepoint (SQLite then copies every page a posting touches into
    /// a statement journal, which is why it is not the default).
    private func decideAndCommit(
        _ batch: [Submission], isolated: Bool, blocked: Set<PartnerID>
    ) throws -> ([PostingOutcome], [PartnerID: [ChainedEntry]]) {
        var decided: [PostingOutcome] = []
        decided.reserveCapacity(batch.count)
        var fresh: [PartnerID: [ChainedEntry]] = [:]
        try coalition.writeWithoutTransaction { db in
            var lotsAfter: LotCache?
            try db.inTransaction(.immediate) {
                var batchState = try BatchState(db, terms: configuration.coalition, lots: takeLotCache(db, enabled: !isolated))
                let statements = WriterStatements(db)
                for s in batch {
                    if blocked.contains(s.partner) {
                        decided.append(.rejected(Problem(.unavailable, "this partner's ledger cannot be written; retry later", retryAfterSeconds: Limits.storageRetryAfterSeconds)))
                    } else if isolated {
                        decided.append(try decideIsolated(statements, s, &batchState, &fresh))
                    } else {
                        var entry: ChainedEntry?
                        decided.append(try decide(statements, s, &batchState, &entry))
                        if let entry { fresh[s.partner, default: []].append(entry) }
                    }
                }
                try writeOpenLots(statements, &batchState)
                try saveMembers(statements, batchState.members)
                // Debug builds: what the inline checks found and the members' rows did not explain.
                precondition(batchState.unconfirmed.isEmpty, batchState.unconfirmed.joined(separator: "; "))
                try batchState.save(db)
                if crashes(at: .beforeJournalCommit) { throw SimulatedCrash() }
                lotsAfter = isolated ? nil : batchState.lots
                return .commit
            }
            // Committed: the cache is what the database now holds. (Had anything thrown, the
            // cache taken by this batch would be gone with it.)
            lotCache.withLock { $0 = lotsAfter }
        }
        commitCounter.add(1, ordering: .relaxed)
        return (decided, fresh)
    }

    private func crashes(at point: FaultPoint) -> Bool {
        guard let faults, faults(point) else { return false }
        writerState.withLock { $0.crashed = true }
        logger.warning("fault injected", metadata: ["point": "\(point.rawValue)"])
        return true
    }

    /// Decides one posting inside its own savepoint, so that an unexpected storage error
    /// costs that posting alone (`unavailable`, nothing of it written), not the whole batch.
    ///
    /// Some errors make SQLite roll back the whole transaction (an I/O error, `RAISE(ROLLBACK)`):
    /// the batch's earlier postings are then gone too, so the batch fails as a whole (throws)
    /// rather than go on outside a transaction.
    private func decideIsolated(
        _ w: WriterStatements, _ s: Submission, _ state: inout BatchState, _ fresh: inout [PartnerID: [ChainedEntry]]
    ) throws -> PostingOutcome {
        let db = w.db
        var outcome = PostingOutcome.rejected(Problem(.unavailable, "storage is failing; retry later", retryAfterSeconds: Limits.storageRetryAfterSeconds))
        var local = state
        var localFresh: ChainedEntry?
        do {
            // Prepared once per connection: SAVEPOINT/RELEASE cost a step each, not a parse.
            try db.cachedStatement(sql: "SAVEPOINT posting").execute()
            let decided: PostingOutcome
            do {
                decided = try decide(w, s, &local, &localFresh)
                // Its flow changes too are written inside its savepoint: a flow that cannot
                // take them fails this posting alone, not the batch at its end.
                try local.flows.save(db)
                local.flows = FlowChanges()
                try db.cachedStatement(sql: "RELEASE posting").execute()
            } catch {
                do {
                    try injectedSavepointUndoFailure()
                    try db.cachedStatement(sql: "ROLLBACK TO posting").execute()
                    try db.cachedStatement(sql: "RELEASE posting").execute()
                } catch let undo {
                    // What the posting wrote may still be in the transaction: the batch cannot
                    // go on (its COMMIT would keep writes no posting is answered for).
                    throw SavepointUndoFailed(posting: error, undo: undo)
                }
                throw error
            }
            // Only now, with everything of it written: an error after `decide` must leave the
            // posting `unavailable`, never answered with what was rolled back.
            outcome = decided
            state = local
            if let c = localFresh { fresh[s.partner, default: []].append(c) }
        } catch {
            logger.error("posting failed in storage", metadata: ["partner": "\(s.partner)", "error": "\(error)"])
            if !db.isInsideTransaction || error is SavepointUndoFailed { throw error }
        }
        return outcome
    }

    /// Decides one posting inside the batch transaction. Every check happens before any write
    /// for this posting, so a refusal leaves nothing behind.
    private func decide(
        _ w: WriterStatements, _ s: Submission, _ state: inout BatchState, _ fresh: inout ChainedEntry?
    ) throws -> PostingOutcome {
        let db = w.db
        guard configuration.partners[s.partner] != nil else {
            return .rejected(Problem(.unknownPartner, "no partner \(JSONWriter.quote(s.partner.rawValue)) in this coalition"))
        }
        // Idempotency (same webhook id or reference: the original result, or a conflict) is
        // checked only where it can matter, so that the common case costs no lookup: before a
        // refusal is returned, and when the journal's unique indexes refuse the insert below.
        let now = state.nextAcceptedAt(clock.now())
        let journalID = state.nextJournalID
        let effects: Effects
        // The rules, and a refusal for want of points decided from cached lots, which is checked
        // against SQLite (refusals are few; a stale cache must not refuse a member who has the
        // points): each first writes the batch's changes of the member's open lots it reads.
        var refusalToCheck: [OpenLot]?
        do {
            switch s.event.kind {
            case .earned: effects = try Rules.earn(w, s, journalID: journalID, now: now, terms: configuration.coalition, &state)
            case .redeemed: effects = try Rules.redeem(w, s, now: now, &state)
            case .earnReversed: effects = try Rules.reverseEarn(w, s, now: now, &state)
            case .redemptionReversed: effects = try Rules.reverseRedemption(w, s, now: now, &state)
            }
            if case .refused(let problem) = effects, problem.kind == .insufficientPoints, let cached = state.lots.cached(s.event.member) {
                try state.writeOpenLots(w, of: s.event.member)
                refusalToCheck = cached
            }
        } catch let error as CachedLotsDisagreement {
            throw lotCacheMismatch(cached: nil, detail: error.description)
        }
        if case .refused(let problem) = effects {
            if let cached = refusalToCheck, try cached != Lookup.openLots(w, s.event.member) {
                throw lotCacheMismatch(cached: openPointsOf(cached), detail: "a refusal for want of points; the stored lots differ")
            }
            // A refusal is the original result when the posting is a replay: looked up only
            // where the journal's unique indexes say an earlier entry may be (most refusals: none).
            guard try Lookup.mayHaveEarlier(w, s) else { return .rejected(problem) }
            return try earlierOutcome(db, s, &state) ?? .rejected(problem)
        }
        guard case .apply(let balanceAfter, let lotChange, let write) = effects else { preconditionFailure() }
        // The member's cached lots, as this posting was decided from them (nil: not cached).
        let cachedBefore = state.lots.cached(s.event.member).map(openPointsOf)

        let head = try state.head(db, s.partner)
        let entry = Entry(
            journalID: journalID, partner: s.partner, sequence: head.sequence + 1, webhookID: s.webhookID,
            acceptedAt: now, event: s.event, memberBalance: balanceAfter)
        let hash = Store.chainHash(previous: head.hash, entry: entry)
        // A webhook-id bound to an earlier entry as an alias is not in the journal's unique
        // index: checked here, and only once the coalition has any alias at all.
        if state.hasAliases, try Lookup.isAlias(db, s.partner, s.webhookID), let earlier = try earlierOutcome(db, s, &state) {
            return earlier
        }
        do {
            try Lookup.insertJournal(w, entry, hash: hash)
        } catch let error as DatabaseError where error.resultCode == .SQLITE_CONSTRAINT {
            // SQLite undid the failed INSERT alone (nothing of this posting was written yet);
            // the transaction goes on.
            guard let earlier = try earlierOutcome(db, s, &state) else { throw error }
            return earlier
        }
        let n = s.event.points.value
        let change: Int64 = switch s.event.kind {
        case .earned, .redemptionReversed: n
        case .redeemed, .earnReversed: -n
        }
        // Defence in depth for the lot cache, in every build and for every kind: each lot the
        // posting changes in `lot_open`, and the member's `open_points`, must hold exactly
        // what the cached lots it was decided from say. If not, something wrote lots behind
        // the cache's back; nothing of this batch commits, and it is decided again from SQLite.
        // With the lot cache, the member's row is changed once at the end of the batch
        // (`MemberChanges`); without it (savepoints), at once, inside this posting's savepoint.
        do {
            try write(w, journalID, &state)
            let first = s.event.kind == .earned ? journalID : nil
            if state.lots.enabled {
                try state.members.add(s.event.member, by: change, expected: cachedBefore, firstJournalID: first)
            } else {
                try Rules.changeMember(w, s.event.member, by: change, expected: cachedBefore, firstJournalID: first)
            }
        } catch let error as CachedLotsDisagreement where cachedBefore != nil {
            throw lotCacheMismatch(cached: cachedBefore!, detail: error.description)
        }
        state.lots.apply(lotChange, member: s.event.member)
        state.advance(s.partner, sequence: entry.sequence, hash: hash, journalID: journalID, kind: s.event.kind, points: s.event.points)
        fresh = ChainedEntry(entry: entry, previousHash: head.hash, hash: hash)
        if Store.checksBalancesInline {
            // SQLite's lots of the member with the batch's changes not yet written applied (read
            // without writing them: the batch's end must write them as it would in release).
            let lots = try state.openLotChanges.applied(to: Lookup.openLots(w, s.event.member), of: s.event.member) { id in
                guard let row = try Row.fetchOne(db, sql: "SELECT issuer, expires_at_ms FROM lot WHERE id = ?", arguments: [id]),
                    let issuer = PartnerID(row[0] as String)
                else { throw StoreError("lot \(id) is missing") }
                return OpenLot(id: id, issuer: issuer, remaining: .zero, expiresAt: (row[1] as Int64?).map { Instant(millisecondsSinceEpoch: $0) })
            }
            var disagreement = FIFO.balance(lots, at: now) == balanceAfter ? nil : "balance after posting disagrees with the lots"
            if disagreement == nil, let cached = state.lots.cached(s.event.member), cached != lots {
                disagreement = "the lot cache disagrees with the lots"
            }
            if let disagreement {
                // Decided from cached lots, it may be a cache gone stale behind the writer's
                // back, which the check on the member's row at the batch's end catches (the
                // batch is then decided again): a bug only if that check passes.
                precondition(cachedBefore != nil, disagreement)
                state.unconfirmed.append("member \(s.event.member): \(disagreement)")
            }
        }
        return .created(entry)
    }
}

extension Store {
    /// The outcome an earlier entry of the partner under the same webhook id (its own, or
    /// one bound to it as an alias) or reference dictates (replay with the original entry, or
    /// conflict), or nil when there is none. A replay by reference under a new webhook-id binds
    /// that webhook-id to the entry (`webhook_alias`): it was answered with this entry, so it
    /// replays it from then on, and is a conflict with any other content.
    fileprivate func earlierOutcome(_ db: Database, _ s: Submission, _ state: inout BatchState) throws -> PostingOutcome? {
        let (byWebhook, byReference) = try Lookup.earlier(db, s.partner, s.webhookID, s.event.reference, aliases: state.hasAliases)
        if let earlier = byWebhook {
            if earlier.event == s.event { return .replayed(earlier) }
            return .rejected(Problem(.conflict,
                "webhook-id \(s.webhookID) was already used for different content (sequence \(earlier.sequence))"))
        }
        if let earlier = byReference {
            if earlier.event == s.event {
                try Lookup.recordAlias(db, s.partner, s.webhookID, journalID: earlier.journalID)
                state.hasAliases = true
                return .replayed(earlier)
            }
            return .rejected(Problem(.conflict,
                "reference \(s.event.reference) was already used for different content (sequence \(earlier.sequence))"))
        }
        return nil
    }
}

struct SimulatedCrash: Error {}

/// A posting failed in its savepoint and undoing the savepoint failed too.
struct SavepointUndoFailed: Error, CustomStringConvertible {
    var posting: any Error
    var undo: any Error
    var description: String { "\(posting); undoing its savepoint failed: \(undo)" }
}

/// The writer's lot cache disagreed with SQLite (`decide`); the batch is decided again without it.
struct LotCacheMismatch: Error {}

/// What a member's `open_points` holds for these lots: their remaining points, expired or not.
private func openPointsOf(_ lots: [OpenLot]) -> Int64 {
    lots.reduce(Int64(0)) { $0 &+ $1.remaining.value }
}

extension Store {
    /// Writes the batch's changes to its members' open lots, in key order (`OpenLotChanges`). A
    /// row that does not hold what the cached lots said is a disagreement of the cache: the
    /// batch is decided again without it.
    ///
    /// Debug builds then read back what these writes left (the per-posting check compares the
    /// cache with the gathered changes, built from the same numbers, so only this one sees the
    /// rows): each lot written must hold what the batch left it, and the member's lots must
    /// equal its cached ones, a difference the member's row must explain at the batch's end
    /// (`unconfirmed`: a stale cache differs in lots the batch did not change).
    fileprivate func writeOpenLots(_ w: WriterStatements, _ state: inout BatchState) throws {
        for member in state.openLotChanges.membersInKeyOrder {
            let written: [(lot: Int64, change: OpenLotChanges.Change)]
            do {
                written = try state.writeOpenLots(w, of: member)
            } catch let error as CachedLotsDisagreement {
                throw lotCacheMismatch(cached: nil, detail: error.description)
            }
            if Store.checksBalancesInline {
                let stored = try Lookup.openLots(w, member)
                for (lot, c) in written {
                    let held = stored.first { $0.id == lot }?.remaining.value ?? 0
                    precondition(held == c.after, "lot \(lot) holds \(held) points after the batch's end wrote \(c.after)")
                }
                if let cached = state.lots.cached(member), cached != stored {
                    state.unconfirmed.append("member \(member): the open lots written at the batch's end differ from the lot cache")
                }
            }
        }
    }

    /// Writes the batch's changes to its members' rows, in key order. A row that does not hold
    /// what the cached lots said is a disagreement of the cache: the batch is decided again
    /// without it.
    fileprivate func saveMembers(_ w: WriterStatements, _ members: MemberChanges) throws {
        for (member, c) in members.inKeyOrder {
            do {
                try Rules.changeMember(w, member, by: c.delta, expected: c.expected, firstJournalID: c.firstJournalID)
            } catch let error as CachedLotsDisagreement where c.expected != nil {
                throw lotCacheMismatch(cached: c.expected!, detail: error.description)
            }
        }
    }

    /// Logs and counts a disagreement of the lot cache with SQLite; the error to throw. The log
    /// names no member (member ids are card numbers, which no log carries).
    /// `cached`: the member's points the failing posting was decided from, where that is what
    /// disagreed (else the detail names the lot and the points).
    fileprivate func lotCacheMismatch(cached: Int64?, detail: String) -> LotCacheMismatch {
        var metadata: Logger.Metadata = ["detail": "\(detail)"]
        if let cached { metadata["cached"] = "\(cached)" }
        logger.error("lot cache disagrees with the database; deciding the batch again without it", metadata: metadata)
        lotCacheMismatchCounter.add(1, ordering: .relaxed)
        return LotCacheMismatch()
    }
}

extension Store {
    /// The writer's lot cache for a batch, taken out of the store (so that a batch that fails
    /// leaves none behind). Inside the batch's transaction: a cache filled while the database
    /// was at another `data_version` (another connection committed since) is not used.
    fileprivate func takeLotCache(_ db: Database, enabled: Bool) throws -> LotCache {
        let version = try Int64.fetchOne(db.cachedStatement(sql: "PRAGMA data_version")) ?? 0
        let cached = lotCache.withLock { cache in
            defer { cache = nil }
            return cache
        }
        if enabled, let cached, cached.dataVersion == version { return cached }
        return LotCache(dataVersion: version, enabled: enabled, membersMax: lotCacheMembersMax)
    }

    /// Drops the writer's lot cache: for writes to lots outside posting (settlement's expiry).
    func dropLotCache() {
        lotCache.withLock { $0 = nil }
    }
}

extension Store {
    /// Re-reads each member's balance after its posting and stops if it disagrees with what
    /// the rules computed. On in debug builds (every test); off in release, where it costs a
    /// sixth of the writer's time and `verify` re-derives every `member_balance` from a replay.
    #if DEBUG
    static let checksBalancesInline = true
    #else
    static let checksBalancesInline = false
    #endif
}

/// The writer's view of the coalition during one batch: next journal id, last acceptance
/// time, and the partners' chain heads. Loaded inside the batch's IMMEDIATE transaction, so it
/// is current even when another process wrote since the last batch.
struct BatchState {
    struct Head {
        var sequence: Int64
        var hash: [UInt8]
        /// Points of every entry so far, by kind (earned, redeemed, earn reversed, redemption
        /// reversed): settlement takes a run's totals as differences of these.
        var totals: [Int64] = [0, 0, 0, 0]
        var dirty = false
    }

    private var lastJournalID: Int64
    private var lastAcceptedAt: Instant
    private var heads: [PartnerID: Head] = [:]
    /// The members' open lots, taken from the store for this batch (`LotCache`).
    var lots: LotCache
    /// What the batch's accepted postings changed in the flows, written by `save`.
    var flows = FlowChanges()
    /// What they changed in their members' rows (with the lot cache), written by `Store.saveMembers`.
    var members = MemberChanges()
    /// What they changed in their members' open lots (with the lot cache), written by
    /// `writeOpenLots` (a member's, before its lots are read from SQLite; all, at the batch's end).
    var openLotChanges = OpenLotChanges()
    /// Debug builds: disagreements of a posting decided from cached lots with the lots in
    /// SQLite (`Store.checksBalancesInline`), left for the members' rows to explain.
    var unconfirmed: [String] = []
    /// Whether any webhook-id is bound to an entry as an alias (then each new entry's
    /// webhook-id is looked up among them; until then, no posting pays for the look-up).
    var hasAliases: Bool

    init(_ db: Database, terms: CoalitionTerms, lots: LotCache) throws {
        self.lots = lots
        hasAliases = try Bool.fetchOne(db.cachedStatement(sql: "SELECT EXISTS (SELECT 1 FROM webhook_alias)")) ?? false
        let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT id, accepted_at_ms FROM journal ORDER BY id DESC LIMIT 1"))
        lastJournalID = row?[0] ?? 0
        // Every new entry falls after the last run's cutoff, even if the clock stepped back.
        // The last run's (cutoffs only rise, run after run: `Store.refuseCutoff`), through the
        // run table's key: not a scan of every run at every batch.
        let lastCutoff = try Int64.fetchOne(db.cachedStatement(sql: "SELECT cutoff_ms FROM run ORDER BY number DESC LIMIT 1"))
        lastAcceptedAt = Instant(millisecondsSinceEpoch: max(row?[1] ?? Int64.min, lastCutoff.map { $0 + 1 } ?? Int64.min))
        let recorded = try Int64.fetchOne(
            db.cachedStatement(sql: "SELECT points_expire_after_days FROM expiry_terms ORDER BY from_journal_id DESC LIMIT 1"))
        if recorded != terms.pointsExpireAfterDays {
            try db.execute(
                sql: "INSERT OR REPLACE INTO expiry_terms (from_journal_id, points_expire_after_days) VALUES (?, ?)",
                arguments: [lastJournalID + 1, terms.pointsExpireAfterDays])
        }
    }

    /// Acceptance times never go backwards, so acceptance order = journal order = time order.
    mutating func nextAcceptedAt(_ now: Instant) -> Instant {
        lastAcceptedAt = max(now, lastAcceptedAt)
        return lastAcceptedAt
    }

    /// The id the next accepted entry gets; taken by `advance`.
    var nextJournalID: Int64 { lastJournalID + 1 }

    /// A member's open lots, oldest first: from the lot cache, else from SQLite once the batch's
    /// changes of them are written.
    mutating func openLots(_ w: WriterStatements, _ member: MemberID) throws -> [OpenLot] {
        if let cached = lots.cached(member) { return cached }
        try writeOpenLots(w, of: member)
        return try lots.openLots(w, member)
    }

    /// Writes the batch's changes of one member's open lots (`OpenLotChanges`), in lot order;
    /// returns them.
    @discardableResult
    mutating func writeOpenLots(_ w: WriterStatements, of member: MemberID) throws -> [(lot: Int64, change: OpenLotChanges.Change)] {
        let changes = openLotChanges.take(member)
        for (lot, c) in changes {
            try Rules.writeOpenLot(w, member, lot, from: c.before, to: c.after)
        }
        return changes
    }

    mutating func head(_ db: Database, _ partner: PartnerID) throws -> Head {
        if let h = heads[partner] { return h }
        let row = try Row.fetchOne(
            db.cachedStatement(
                sql: "SELECT last_sequence, last_hash, earned, redeemed, earn_reversed, redemption_reversed FROM partner_head WHERE partner = ?"),
            arguments: [partner.rawValue])
        let h = row.map { Head(sequence: $0[0], hash: Array($0[1] as Data), totals: [$0[2], $0[3], $0[4], $0[5]]) }
            ?? Head(sequence: 0, hash: Store.genesisHash(partner))
        heads[partner] = h
        return h
    }

    mutating func advance(_ partner: PartnerID, sequence: Int64, hash: [UInt8], journalID: Int64, kind: EventKind, points: Points) {
        precondition(journalID == lastJournalID + 1)
        lastJournalID = journalID
        // Changed in place (one look-up; no copy of its totals).
        BatchState.advance(&heads[partner, default: Head(sequence: 0, hash: [])], sequence: sequence, hash: hash, kind: kind, points: points)
    }

    private static func advance(_ h: inout Head, sequence: Int64, hash: [UInt8], kind: EventKind, points: Points) {
        h.sequence = sequence
        h.hash = hash
        h.totals[kind.rawValue - 1] += points.value  // at most 10^9 per entry: no overflow before 9·10^9 entries
        h.dirty = true
    }

    /// Writes what the batch changed in the partners' heads and the flows.
    func save(_ db: Database) throws {
        try flows.save(db)
        for (partner, h) in heads where h.dirty {
            try db.cachedStatement(
                sql: """
                    INSERT INTO partner_head (partner, last_sequence, last_hash, earned, redeemed, earn_reversed, redemption_reversed)
                    VALUES (?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (partner) DO UPDATE SET last_sequence = excluded.last_sequence, last_hash = excluded.last_hash,
                      earned = excluded.earned, redeemed = excluded.redeemed, earn_reversed = excluded.earn_reversed,
                      redemption_reversed = excluded.redemption_reversed
                    """
            ).execute(arguments: [partner.rawValue, h.sequence, Data(h.hash), h.totals[0], h.totals[1], h.totals[2], h.totals[3]])
        }
    }
}

extension DatabaseError {
    /// Another connection (another process) held the database past the busy timeout.
    var isHeldElsewhere: Bool { resultCode == .SQLITE_BUSY || resultCode == .SQLITE_LOCKED }
}
