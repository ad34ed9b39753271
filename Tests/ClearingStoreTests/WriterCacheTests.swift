import ClearhouseTestSupport
import ClearingDomain
@testable import ClearingStore
import Foundation
import GRDB
import Synchronization
import Testing

extension Harness {
    /// Runs these statements on the coalition's writer connection, behind the lot cache's back.
    func behindTheCache(_ statements: String...) throws {
        try store.coalition.writeWithoutTransaction { db in
            for sql in statements { try db.execute(sql: sql) }
        }
    }
}

/// Two stores where M0 earned 50 (lot 1): one to post a batch to at once, one to post it to
/// posting by posting.
private func storesWhereM0Earned50(lotCacheMembersMax: Int = Limits.lotCacheMembersMax) throws -> (Harness, Harness) {
    let batched = try Harness(lotCacheMembersMax: lotCacheMembersMax), single = try Harness(lotCacheMembersMax: lotCacheMembersMax)
    for h in [batched, single] { _ = h.post(F, "f0", Fixtures.earn("M0", 50, "F-0")) }
    return (batched, single)
}

/// The outcomes of these postings as one batch on `batched`, and one by one on `single`.
private func postedInOneBatchAndOneByOne(_ submissions: [Submission], _ batched: Harness, _ single: Harness) -> ([PostingOutcome], [PostingOutcome]) {
    (batched.store.post(submissions), submissions.map { single.store.post([$0])[0] })
}

/// The writer keeps members' open lots in memory between batches (`LotCache`) and leaves
/// checkpoints to another connection (`Checkpointer`). Neither may change an outcome.
@Suite struct WriterCacheTests {
    @Test func theCacheFollowsEarnsRedemptionsAndReversals() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 30, "G-1"))
        _ = h.post(F, "f1", Fixtures.earn("M1", 50, "F-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 40, "C-1"))  // empties G-1's lot, takes 10 of F-1's
        #expect(try h.store.checkLotCache() == 1)
        _ = h.post(C, "c2", Fixtures.reverseRedemption("M1", 15, "C-2", of: "C-1"))
        _ = h.post(F, "f2", Fixtures.reverseEarn("M1", 5, "F-2", of: "F-1"))
        _ = h.post(G, "g2", Fixtures.earn("M2", 7, "G-2"))
        #expect(try h.store.checkLotCache() >= 1)
        #expect(try h.balance("M1") == 50)
        #expect(try h.verify().ok)
    }

    /// Another connection (here a second store on the same directory, as `clearhouse post`
    /// beside `serve`) spends a member's points: the first writer must not decide from the
    /// lots it cached before.
    @Test func lotsCachedBeforeAnotherWriterCommittedAreNotUsed() throws {
        let h = try Harness()
        #expect(h.post(G, "g1", Fixtures.earn("M1", 100, "G-1")).httpStatus == 201)
        #expect(try h.store.checkLotCache() == 1, "M1's lots are cached")
        let other = try Store(dataDirectory: h.dir.url, configuration: h.configuration, clock: h.clock)
        let spent = other.post([Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.redeem("M1", 80, "F-1"))])[0]
        #expect(spent.httpStatus == 201)
        try other.close()
        // 20 are left. Decided from the stale cache (100), a redemption of 10 would succeed
        // with a balance of 90; a redemption of 30 would pass the cache and fail in SQLite.
        let r = h.post(C, "c1", Fixtures.redeem("M1", 10, "C-1"))
        #expect(entry(r)?.memberBalance == Points(10), "\(r)")
        let refused = h.post(C, "c2", Fixtures.redeem("M1", 30, "C-2"))
        #expect(refused.httpStatus == 422 && slug(refused) == "insufficient-points", "\(refused)")
        #expect(entry(h.post(C, "c3", Fixtures.redeem("M1", 10, "C-3")))?.memberBalance == Points(0))
        // Dropped because of data_version, not caught later by the open_points check.
        #expect(h.store.lotCacheMismatches == 0)
        #expect(try h.store.checkLotCache() == 1)
        #expect(try h.verify().ok)
    }

    /// The release builds' guard: a write to lots behind the cache's back on the writer's own
    /// connection (which `data_version` cannot see; settlement's expiry is such a write, and
    /// drops the cache itself) is caught by comparing the cached lots with the member's
    /// `open_points`, and the batch is decided again from SQLite: the outcome is right.
    @Test func aCacheStaleOnTheWritersOwnConnectionIsCaughtAndTheBatchDecidedAgain() throws {
        let h = try Harness()
        #expect(h.post(G, "g1", Fixtures.earn("M1", 100, "G-1")).httpStatus == 201)
        #expect(try h.store.checkLotCache() == 1)
        // A consistent change (lot and member agree) that the cache does not know of.
        try h.behindTheCache(
            "UPDATE lot_open SET remaining = 40 WHERE member = 'M1'",
            "UPDATE member SET open_points = 40 WHERE member = 'M1'")
        #expect(throws: (any Error).self) { try h.store.checkLotCache() }
        // The stale cache says 100: a redemption of 30 would leave 70. The truth is 10.
        let r = h.post(C, "c1", Fixtures.redeem("M1", 30, "C-1"))
        #expect(r.httpStatus == 201 && entry(r)?.memberBalance == Points(10), "\(r)")
        #expect(h.store.lotCacheMismatches == 1)
        #expect(try h.store.checkLotCache() == 0, "decided again without the cache")
        #expect(slug(h.post(C, "c2", Fixtures.redeem("M1", 11, "C-2"))) == "insufficient-points")
        #expect(entry(h.post(C, "c3", Fixtures.redeem("M1", 10, "C-3")))?.memberBalance == Points(0))
        #expect(h.store.lotCacheMismatches == 1)
    }

    /// The guard on the member's row: a member cached with no lots gets a row and lots behind
    /// the cache's back; its next earn (which would make the row of a member new to the
    /// coalition) meets that row, and the batch is decided again from SQLite.
    @Test func anEarnForAMemberCachedWithoutLotsMeetsItsRowAndIsDecidedAgain() throws {
        let h = try Harness()
        #expect(h.post(G, "g1", Fixtures.earn("M1", 100, "G-1")).httpStatus == 201)
        #expect(slug(h.post(C, "c1", Fixtures.redeem("M2", 5, "C-1"))) == "insufficient-points")
        #expect(try h.store.checkLotCache() == 2, "M2 is cached, with no lots")
        // M1's lot becomes M2's, consistently (lot, open lot, member row), behind the cache.
        try h.behindTheCache(
            "UPDATE lot SET member = 'M2' WHERE id = 1",
            "UPDATE lot_open SET member = 'M2' WHERE member = 'M1'",
            "INSERT INTO member (member, first_journal_id, open_points) VALUES ('M2', 1, 100)")
        let earned = h.post(F, "f1", Fixtures.earn("M2", 10, "F-1"))
        #expect(earned.httpStatus == 201 && entry(earned)?.memberBalance == Points(110), "\(earned)")
        #expect(h.store.lotCacheMismatches == 1)
        #expect(try h.balance("M2") == 110)
    }

    /// With the lot cache, a batch changes each member's row once, at its end (`MemberChanges`):
    /// the rows must come out exactly as posting one by one leaves them (points, and the first
    /// earn of a member new to the coalition), including a member whose earn is reversed whole
    /// in the same batch, and one redeemed from before the batch.
    @Test func membersChangedOnceABatchHoldWhatPostingOneByOneLeaves() throws {
        func submissions() -> [Submission] {
            [
                Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 30, "G-1")),
                Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.earn("M1", 20, "F-1")),
                Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.earn("M2", 15, "G-2")),
                Submission(partner: C, webhookID: WebhookID("c1")!, event: Fixtures.redeem("M1", 40, "C-1")),
                Submission(partner: C, webhookID: WebhookID("c2")!, event: Fixtures.reverseRedemption("M1", 10, "C-2", of: "C-1")),
                Submission(partner: G, webhookID: WebhookID("g3")!, event: Fixtures.reverseEarn("M2", 15, "G-3", of: "G-2")),
                Submission(partner: C, webhookID: WebhookID("c3")!, event: Fixtures.redeem("M0", 25, "C-3")),
                Submission(partner: C, webhookID: WebhookID("c4")!, event: Fixtures.redeem("M1", 99, "C-4")),  // refused
                Submission(partner: F, webhookID: WebhookID("f2")!, event: Fixtures.earn("M0", 5, "F-2")),
            ]
        }
        func members(_ h: Harness) throws -> [[String]] {
            try h.store.coalition.read { db in
                try Row.fetchAll(db, sql: "SELECT member, first_journal_id, open_points FROM member ORDER BY member").map { r in
                    [r[0] as String, "\(r[1] as Int64)", "\(r[2] as Int64)"]
                }
            }
        }
        let (batched, single) = try storesWhereM0Earned50()
        #expect(try batched.store.checkLotCache() == 1, "M0 is cached before the batch")
        let (outcomes, one) = postedInOneBatchAndOneByOne(submissions(), batched, single)
        #expect(outcomes.map(slug) == one.map(slug))
        #expect(outcomes.map(slug) == ["created", "created", "created", "created", "created", "created", "created", "insufficient-points", "created"])
        #expect(try members(batched) == members(single))
        #expect(try members(batched) == [["M0", "1", "30"], ["M1", "2", "20"], ["M2", "4", "0"]])
        #expect(batched.store.lotCacheMismatches == 0)
        // M0 cached throughout; M1 read again after its reversal (by the refused redemption);
        // M2 left out after its reversal.
        #expect(try batched.store.checkLotCache() == 2)
        #expect(try batched.verify().ok)
    }

    /// The guard holds for a batch of several postings of a member. Earns check no lot, so
    /// here the member's row, changed once at the batch's end, is the only guard: lots and row
    /// changed behind the cache are caught there, and the batch is decided again.
    @Test func aStaleCacheIsCaughtAtTheEndOfABatchOfEarns() throws {
        let h = try Harness()
        #expect(h.post(G, "g1", Fixtures.earn("M1", 100, "G-1")).httpStatus == 201)
        try h.behindTheCache(
            "UPDATE lot_open SET remaining = 40 WHERE member = 'M1'",
            "UPDATE member SET open_points = 40 WHERE member = 'M1'")
        // From the stale cache (100) the balances would be 105 and 112; the truth is 45 and 52.
        let outcomes = h.post([
            (F, "f1", Fixtures.earn("M1", 5, "F-1")),
            (G, "g2", Fixtures.earn("M2", 9, "G-2")),
            (C, "c1", Fixtures.earn("M1", 7, "C-1")),
        ])
        #expect(outcomes.map(slug) == ["created", "created", "created"], "\(outcomes)")
        #expect(outcomes.map { entry($0)?.memberBalance } == [Points(45), Points(9), Points(52)])
        #expect(h.store.lotCacheMismatches == 1)
        #expect(try h.balance("M1") == 52)
    }

    /// The members' rows are the guard even when the lots agree with the cache: a row changed
    /// behind it is caught at the batch's end (with the lot cache, no posting reads or writes it
    /// before), and the batch is decided again.
    @Test func aMemberRowChangedBehindTheCacheIsCaughtAtTheEndOfTheBatch() throws {
        let h = try Harness()
        #expect(h.post(G, "g1", Fixtures.earn("M1", 100, "G-1")).httpStatus == 201)
        try h.behindTheCache("UPDATE member SET open_points = 107 WHERE member = 'M1'")
        let outcomes = h.post([(F, "f1", Fixtures.earn("M1", 5, "F-1")), (C, "c1", Fixtures.redeem("M1", 30, "C-1"))])
        #expect(outcomes.map(slug) == ["created", "created"], "\(outcomes)")
        #expect(outcomes.map { entry($0)?.memberBalance } == [Points(105), Points(75)])
        #expect(h.store.lotCacheMismatches == 1)
    }

    /// `MemberChanges` itself: each posting's expectation must follow from the first one's and
    /// what came between; a member first changed without one takes the next one's.
    @Test func memberChangesCheckEachPostingsExpectation() throws {
        let m = MemberID("M1")!
        var c = MemberChanges()
        try c.add(m, by: 10, expected: 100, firstJournalID: nil)
        try c.add(m, by: -30, expected: 110, firstJournalID: nil)
        #expect(throws: CachedLotsDisagreement.self) { try c.add(m, by: 5, expected: 100, firstJournalID: 7) }
        try c.add(m, by: 5, expected: 80, firstJournalID: 7)
        #expect(c.inKeyOrder.map(\.change.delta) == [-15])
        #expect(c.inKeyOrder.map(\.change.expected) == [100])
        #expect(c.inKeyOrder.map(\.change.firstJournalID) == [7])

        var d = MemberChanges()
        try d.add(MemberID("b")!, by: 10, expected: nil, firstJournalID: 3)
        try d.add(MemberID("b")!, by: 1, expected: 60, firstJournalID: 4)
        try d.add(MemberID("a")!, by: 2, expected: 0, firstJournalID: 5)
        #expect(d.inKeyOrder.map(\.member.rawValue) == ["a", "b"])
        #expect(d.inKeyOrder.map(\.change.expected) == [0, 50])
        #expect(d.inKeyOrder.map(\.change.firstJournalID) == [5, 3])
    }

    /// With the lot cache, a batch writes its changes to open lots at its end, in key order
    /// (`OpenLotChanges`): `lot_open` must come out exactly as posting one by one leaves it.
    /// The batch has a lot taken from twice, a lot earned and emptied within it (no row ever
    /// written), a member whose changes must be written before a reversal reads its lots, a
    /// refusal, and a member redeemed from lots older than the batch.
    @Test func openLotsChangedOnceABatchHoldWhatPostingOneByOneLeaves() throws {
        func submissions() -> [Submission] {
            [
                Submission(partner: C, webhookID: WebhookID("c1")!, event: Fixtures.redeem("M0", 10, "C-1")),  // 50 -> 40
                Submission(partner: C, webhookID: WebhookID("c2")!, event: Fixtures.redeem("M0", 15, "C-2")),  // 40 -> 25
                Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 30, "G-1")),
                Submission(partner: C, webhookID: WebhookID("c3")!, event: Fixtures.redeem("M1", 30, "C-3")),  // G-1's lot: born and emptied
                Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.earn("M2", 20, "F-1")),
                Submission(partner: C, webhookID: WebhookID("c4")!, event: Fixtures.redeem("M2", 5, "C-4")),
                Submission(partner: F, webhookID: WebhookID("f2")!, event: Fixtures.reverseEarn("M2", 5, "F-2", of: "F-1")),
                Submission(partner: C, webhookID: WebhookID("c5")!, event: Fixtures.redeem("M2", 4, "C-5")),
                Submission(partner: C, webhookID: WebhookID("c6")!, event: Fixtures.reverseRedemption("M0", 15, "C-6", of: "C-2")),
                Submission(partner: C, webhookID: WebhookID("c7")!, event: Fixtures.redeem("M0", 41, "C-7")),  // refused: 40 left
                Submission(partner: C, webhookID: WebhookID("c8")!, event: Fixtures.redeem("M0", 40, "C-8")),
            ]
        }
        func openLots(_ h: Harness) throws -> [[Int64]] {
            try h.store.coalition.read { db in
                try Row.fetchAll(db, sql: "SELECT member, lot_id, remaining FROM lot_open ORDER BY member, lot_id").map { r in
                    [Int64((r[0] as String).dropFirst())!, r[1], r[2]]
                }
            }
        }
        let (batched, single) = try storesWhereM0Earned50()
        #expect(try batched.store.checkLotCache() == 1, "M0 is cached before the batch")
        let (outcomes, one) = postedInOneBatchAndOneByOne(submissions(), batched, single)
        #expect(outcomes.map(slug) == one.map(slug))
        #expect(outcomes.map { entry($0)?.memberBalance } == one.map { entry($0)?.memberBalance })
        #expect(outcomes.map { entry($0)?.memberBalance } == ([40, 25, 30, 0, 20, 15, 10, 6, 40, nil, 0] as [Int64?]).map { $0.map { Points($0) } })
        #expect(try openLots(batched) == openLots(single))
        #expect(try openLots(batched) == [[2, 6, 6]], "only M2's earn keeps points")
        #expect(batched.store.lotCacheMismatches == 0)
        #expect(try batched.verify().ok)
        #expect(try single.verify().ok)
    }

    /// A member with many small lots spends and gets back hundreds of them in one batch: the
    /// batch's changes of its open lots come out of lot order (an earn's new lot first, then
    /// takes of older lots; a reversal gives back to the last lots taken first) and must hold
    /// what posting one by one leaves, lot by lot, with no disagreement of the lot cache.
    @Test func aMemberWithManyLotsSpendsAndGetsBackHundredsInOneBatch() throws {
        let lots = 500
        let earns = (1...lots).map { Submission(partner: G, webhookID: WebhookID("g\($0)")!, event: Fixtures.earn("M9", 1, "G-\($0)")) }
        func submissions() -> [Submission] {
            [
                Submission(partner: C, webhookID: WebhookID("c1")!, event: Fixtures.redeem("M9", 300, "C-1")),  // lots 1-300
                Submission(partner: C, webhookID: WebhookID("c2")!, event: Fixtures.reverseRedemption("M9", 120, "C-2", of: "C-1")),  // 300 down to 181
                Submission(partner: G, webhookID: WebhookID("g0")!, event: Fixtures.earn("M9", 5, "G-0")),  // the newest lot, changed first
                Submission(partner: C, webhookID: WebhookID("c3")!, event: Fixtures.redeem("M9", 200, "C-3")),  // 181-380
                Submission(partner: C, webhookID: WebhookID("c4")!, event: Fixtures.redeem("M9", 125, "C-4")),  // 381-500, then G-0
                Submission(partner: C, webhookID: WebhookID("c5")!, event: Fixtures.redeem("M9", 1, "C-5")),  // refused: nothing left
            ]
        }
        let batched = try Harness(), single = try Harness()
        for h in [batched, single] {
            for start in stride(from: 0, to: lots, by: 250) { _ = h.store.post(Array(earns[start..<min(start + 250, lots)])) }
        }
        #expect(try batched.balance("M9") == Int64(lots))
        let (outcomes, one) = postedInOneBatchAndOneByOne(submissions(), batched, single)
        #expect(outcomes.map(slug) == one.map(slug))
        #expect(outcomes.map { entry($0)?.memberBalance } == ([200, 320, 325, 125, 0, nil] as [Int64?]).map { $0.map { Points($0) } })
        func openLots(_ h: Harness) throws -> [Row] {
            try h.store.coalition.read { try Row.fetchAll($0, sql: "SELECT member, lot_id, remaining FROM lot_open ORDER BY member, lot_id") }
        }
        #expect(try openLots(batched) == openLots(single))
        #expect(try openLots(batched).isEmpty, "every lot spent")
        #expect(batched.store.lotCacheMismatches == 0)
        #expect(try batched.verify().ok)
    }

    /// The other reads of a member's open lots while the batch holds changes of them: a
    /// refusal for want of points (checked against SQLite, so the changes are written first:
    /// no mismatch), a member the cache let go of with its new lot not yet written (the cache
    /// holds two members here; the lot is written, then read again from SQLite), and a
    /// redemption reversal giving points back to a lot earned and emptied in the same batch
    /// (its row, never written, is made by the return).
    @Test func everyReadOfOpenLotsDuringABatchSeesTheBatchsChanges() throws {
        func submissions() -> [Submission] {
            [
                Submission(partner: C, webhookID: WebhookID("c1")!, event: Fixtures.redeem("M0", 10, "C-1")),  // 50 -> 40, gathered
                Submission(partner: C, webhookID: WebhookID("c2")!, event: Fixtures.redeem("M0", 41, "C-2")),  // refused
                Submission(partner: G, webhookID: WebhookID("g1")!, event: Fixtures.earn("M1", 5, "G-1")),
                Submission(partner: G, webhookID: WebhookID("g2")!, event: Fixtures.earn("M2", 5, "G-2")),  // the cache is full: emptied
                Submission(partner: C, webhookID: WebhookID("c3")!, event: Fixtures.redeem("M1", 5, "C-3")),  // M1 let go of: its lot written, read again
                Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.earn("M3", 20, "F-1")),
                Submission(partner: C, webhookID: WebhookID("c4")!, event: Fixtures.redeem("M3", 20, "C-4")),  // F-1's lot: emptied
                Submission(partner: C, webhookID: WebhookID("c5")!, event: Fixtures.reverseRedemption("M3", 8, "C-5", of: "C-4")),
            ]
        }
        func state(_ h: Harness) throws -> [String] {
            try h.store.coalition.read { db in
                try Row.fetchAll(db, sql: "SELECT member, lot_id, remaining FROM lot_open ORDER BY member, lot_id").map { "\($0[0] as String)/\($0[1] as Int64)=\($0[2] as Int64)" }
                    + Row.fetchAll(db, sql: "SELECT member, open_points FROM member ORDER BY member").map { "\($0[0] as String):\($0[1] as Int64)" }
            }
        }
        let (batched, single) = try storesWhereM0Earned50(lotCacheMembersMax: 2)
        let (outcomes, one) = postedInOneBatchAndOneByOne(submissions(), batched, single)
        #expect(outcomes.map(slug) == one.map(slug))
        #expect(outcomes.map { entry($0)?.memberBalance } == one.map { entry($0)?.memberBalance })
        #expect(outcomes.map { entry($0)?.memberBalance } == ([40, nil, 5, 5, 0, 20, 0, 8] as [Int64?]).map { $0.map { Points($0) } })
        #expect(try state(batched) == state(single))
        #expect(try state(batched) == ["M0/1=40", "M2/4=5", "M3/6=8", "M0:40", "M1:0", "M2:5", "M3:8"])
        #expect(batched.store.lotCacheMismatches == 0, "the refusal was checked against rows holding the batch's changes")
        #expect(try batched.verify().ok)
    }

    /// Open lots changed behind the cache, with the member's total unchanged (so the member's
    /// row cannot tell): a batch that takes from such a lot twice is caught when its changes are
    /// written at the batch's end, and is decided again from SQLite.
    @Test func anOpenLotChangedBehindTheCacheIsCaughtWhenTheBatchWritesItsLots() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 30, "G-1"))
        _ = h.post(F, "f1", Fixtures.earn("M1", 20, "F-1"))
        _ = h.post(C, "c0", Fixtures.redeem("M1", 15, "C-0"))  // G-1's lot: 30 -> 15
        #expect(try h.store.checkLotCache() == 1)
        // 15 of F-1's points move to G-1's lot: still 35 in all.
        try h.behindTheCache(
            "UPDATE lot_open SET remaining = 30 WHERE member = 'M1' AND lot_id = 1",
            "UPDATE lot_open SET remaining = 5 WHERE member = 'M1' AND lot_id = 2")
        let outcomes = h.post([(C, "c1", Fixtures.redeem("M1", 5, "C-1")), (C, "c2", Fixtures.redeem("M1", 5, "C-2"))])
        #expect(outcomes.map(slug) == ["created", "created"], "\(outcomes)")
        #expect(h.store.lotCacheMismatches == 1)
        #expect(try h.store.checkLotCache() == 0, "the failed batch's cache is not kept; the batch decided again without one")
        // Decided again from SQLite: both takes came from G-1's lot (30 -> 20), F-1's holds 5.
        let left = try h.store.coalition.read { db in
            try Row.fetchAll(db, sql: "SELECT lot_id, remaining FROM lot_open WHERE member = 'M1' ORDER BY lot_id").map { [$0[0] as Int64, $0[1] as Int64] }
        }
        #expect(left == [[1, 20], [2, 5]])
    }

    /// `OpenLotChanges` itself: each change of a lot must start where the batch's earlier ones
    /// left it; a lot's first change keeps what the row held before the batch; members come out
    /// in key order, a member's lots in lot order.
    @Test func openLotChangesCheckEachChangesStart() throws {
        let a = MemberID("a")!, b = MemberID("b")!
        var c = OpenLotChanges()
        try c.change(b, 7, from: 30, to: 20)
        try c.change(b, 7, from: 20, to: 5)
        #expect(throws: CachedLotsDisagreement.self) { try c.change(b, 7, from: 20, to: 0) }
        try c.change(b, 3, from: 0, to: 9)
        try c.change(a, 4, from: 12, to: 0)
        #expect(c.membersInKeyOrder == [a, b])
        let lots = c.take(b)
        #expect(lots.map(\.lot) == [3, 7])
        #expect(lots.map(\.change) == [.init(before: 0, after: 9), .init(before: 30, after: 5)])
        #expect(c.take(b).isEmpty && !c.membersInKeyOrder.isEmpty)
        // The debug cross-check's view: the stored lots with the changes applied; a lot of this
        // batch (no row yet) comes from its lot row.
        try c.change(a, 9, from: 0, to: 6)
        let stored = [OpenLot(id: 4, issuer: G, remaining: Points(12), expiresAt: nil), OpenLot(id: 5, issuer: F, remaining: Points(3), expiresAt: nil)]
        let view = c.applied(to: stored, of: a) { id in OpenLot(id: id, issuer: C, remaining: .zero, expiresAt: nil) }
        #expect(view == [stored[1], OpenLot(id: 9, issuer: C, remaining: Points(6), expiresAt: nil)])
        _ = c.take(a)
        #expect(c.membersInKeyOrder.isEmpty)
    }

    /// Settlement expires lots on the writer's own connection; the cache must not keep them.
    @Test func settlementExpiryIsSeenByTheNextPosting() throws {
        let h = try Harness(expireAfterDays: 1)
        h.clock.set(Instant(rfc3339: "2026-11-22T10:00:00Z")!)
        _ = h.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 40, "C-1"))
        h.clock.set(Instant(rfc3339: "2026-11-23T11:00:00Z")!)
        _ = h.post(F, "f1", Fixtures.earn("M1", 10, "F-1"))
        #expect(try h.store.checkLotCache() == 1, "M1's lots are cached, the expired one included")
        _ = try h.store.settle()
        #expect(try h.store.checkLotCache() == 0, "settlement dropped the cache")
        // The 60 expired points were given up by the run; a return to that lot is expired too.
        let rr = h.post(C, "c2", Fixtures.reverseRedemption("M1", 40, "C-2", of: "C-1"))
        #expect(entry(rr)?.memberBalance == Points(10))
        #expect(slug(h.post(C, "c3", Fixtures.redeem("M1", 11, "C-3"))) == "insufficient-points")
        #expect(entry(h.post(C, "c4", Fixtures.redeem("M1", 10, "C-4")))?.memberBalance == Points(0))
        #expect(try h.store.checkLotCache() == 1)
        #expect(try h.verify().ok)
    }

    /// A batch that rolls back (a posting failing in storage) and is decided again posting by
    /// posting leaves no cache behind, and the next batch reads the lots afresh.
    @Test func aBatchDecidedAgainInSavepointsLeavesNoCache() throws {
        let h = try Harness()
        _ = h.post(G, "g0", Fixtures.earn("M1", 50, "G-0"))
        #expect(try h.store.checkLotCache() == 1)
        let raw = try GRDB.DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path)
        try raw.write { db in
            try db.execute(sql: "CREATE TRIGGER poison BEFORE INSERT ON lot WHEN NEW.member = 'POISON' BEGIN SELECT RAISE(ABORT, 'poison'); END")
        }
        try raw.close()
        let outcomes = h.store.post([
            Submission(partner: C, webhookID: WebhookID("c1")!, event: Fixtures.redeem("M1", 20, "C-1")),
            Submission(partner: F, webhookID: WebhookID("f1")!, event: Fixtures.earn("POISON", 10, "F-1")),
        ])
        #expect(outcomes.map(\.httpStatus) == [201, 503])
        #expect(try h.store.checkLotCache() == 0, "decided again in savepoints, without the cache")
        #expect(entry(h.post(C, "c2", Fixtures.redeem("M1", 30, "C-2")))?.memberBalance == Points(0))
        #expect(try h.store.checkLotCache() == 1)
        #expect(try h.verify().ok)
    }

    /// The same guard for the other decisions made from cached lots: an earn reversal (whose
    /// balance comes from the cache), and a refusal for want of points (which writes nothing,
    /// so it is checked against the lots in SQLite before it is answered).
    @Test func reversalsAndRefusalsFromAStaleCacheAreDecidedAgain() throws {
        func behindTheCache(_ h: Harness, remaining: Int64) throws {
            try h.behindTheCache(
                "UPDATE lot_open SET remaining = \(remaining) WHERE member = 'M1'",
                "UPDATE member SET open_points = \(remaining) WHERE member = 'M1'")
        }
        // The cache says 100, the truth is 40: reversing 10 of the earn leaves 30, not 90.
        let a = try Harness()
        _ = a.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        try behindTheCache(a, remaining: 40)
        let reversed = a.post(G, "g2", Fixtures.reverseEarn("M1", 10, "G-2", of: "G-1"))
        #expect(reversed.httpStatus == 201 && entry(reversed)?.memberBalance == Points(30), "\(reversed)")
        #expect(a.store.lotCacheMismatches == 1)

        // The cache says 40 (after a redemption of 60), the truth is 100: 70 can be redeemed.
        let b = try Harness()
        _ = b.post(G, "g1", Fixtures.earn("M1", 100, "G-1"))
        _ = b.post(C, "c1", Fixtures.redeem("M1", 60, "C-1"))
        try behindTheCache(b, remaining: 100)
        let redeemed = b.post(C, "c2", Fixtures.redeem("M1", 70, "C-2"))
        #expect(redeemed.httpStatus == 201 && entry(redeemed)?.memberBalance == Points(30), "\(redeemed)")
        #expect(b.store.lotCacheMismatches == 1)
        // A refusal from a cache that is right is not a mismatch.
        #expect(slug(b.post(C, "c3", Fixtures.redeem("M1", 31, "C-3"))) == "insufficient-points")
        #expect(b.store.lotCacheMismatches == 1)
    }

    /// Below the frame limit the writer leaves checkpoints to the background connection; at
    /// the limit it checkpoints itself, so the WAL starts over and stays small.
    @Test func checkpointsRunInTheBackgroundAndTheWALStaysBounded() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let configuration = Fixtures.configuration()
        let wal = dir.url.appendingPathComponent("coalition.sqlite-wal")
        func walBytes() -> Int { (try? FileManager.default.attributesOfItem(atPath: wal.path)[.size] as? Int) ?? 0 }
        func load(_ store: Store, _ name: String, batches: Int) -> Int {
            var largest = 0
            for b in 0..<batches {
                let batch = (0..<20).map { i in
                    Submission(partner: G, webhookID: WebhookID("\(name)\(b)-\(i)")!, event: Fixtures.earn("M\(b * 20 + i)", 10, "\(name)-\(b)-\(i)"))
                }
                #expect(store.post(batch).allSatisfy { $0.httpStatus == 201 })
                largest = max(largest, walBytes())
            }
            return largest
        }
        let roomy = try Store(dataDirectory: dir.url, configuration: configuration, walFramesMax: 1_000_000)
        _ = load(roomy, "roomy", batches: 120)
        // Background checkpoints are asynchronous: wait (bounded) for the first to finish.
        var background = roomy.checkpointCounts
        for _ in 0..<200 where background.background == 0 {
            Thread.sleep(forTimeInterval: 0.01)
            background = roomy.checkpointCounts
        }
        #expect(background.background > 0 && background.synchronous == 0, "\(background)")
        // Every commit appends at least one page (its commit frame); a batch of 20 earns, a few.
        #expect((120...120 * 100).contains(roomy.coalitionWALFramesWritten), "\(roomy.coalitionWALFramesWritten)")
        try roomy.close()
        #expect(walBytes() == 0, "a clean close truncates the WAL")

        let tight = try Store(dataDirectory: dir.url, configuration: configuration, walFramesMax: 32)
        let largest = load(tight, "tight", batches: 200)
        #expect(tight.checkpointCounts.synchronous > 0)
        // 32 frames of 4 KiB, plus one batch's frames (well under 100 pages), plus the header.
        #expect(largest < 160 * 4_128, "the WAL grew to \(largest) bytes")
        try tight.close()
        #expect(try Verifier.verify(dataDirectory: dir.url).ok)
    }
}

/// The writer's lock and condition: timed waits on the monotonic clock.
@Suite struct MonotonicConditionTests {
    @Test func aTimedWaitEndsAtItsDeadlineAndASignalEndsItSooner() async throws {
        let c = MonotonicCondition()
        c.lock()
        let start = ContinuousClock.now
        let deadline = MonotonicCondition.deadline(after: .milliseconds(30))
        while c.wait(until: deadline) {}  // no signal: only the deadline ends it
        let waited = ContinuousClock.now - start
        c.unlock()
        #expect(waited >= .milliseconds(29), "\(waited)")

        let flag = Mutex(false)
        Thread.detachNewThread {
            Thread.sleep(forTimeInterval: 0.01)
            c.lock()
            flag.withLock { $0 = true }
            c.signal()
            c.unlock()
        }
        c.lock()
        let far = MonotonicCondition.deadline(after: .seconds(30))
        while !flag.withLock({ $0 }) {
            #expect(c.wait(until: far), "a signal, not the deadline, ends this wait")
        }
        c.unlock()
        // A deadline past a second boundary carries into the seconds correctly.
        let a = MonotonicCondition.deadline(after: .milliseconds(1_999))
        #expect(a.tv_nsec >= 0 && a.tv_nsec < 1_000_000_000)
    }
}

/// Another process holding the journal past the busy timeout: the batch is answered
/// `unavailable` once, saying so, not decided a second time posting by posting (which would
/// only wait as long again). Nothing is written; the same posting succeeds once it is free.
extension PostingOutcome {
    var isCreated: Bool { if case .created = self { true } else { false } }
}

@Suite struct JournalBusyTests {
    @Test func aJournalHeldByAnotherProcessFailsTheBatchOnceAndWritesNothing() throws {
        let h = try Harness()
        #expect(h.post(G, "g0", Fixtures.earn("M1", 10, "G-0")).isCreated)
        var c = GRDB.Configuration()
        c.busyMode = .immediateError
        let other = try DatabaseQueue(path: h.dir.url.appendingPathComponent("coalition.sqlite").path, configuration: c)
        let held = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? other.writeWithoutTransaction { db in
                try db.execute(sql: "BEGIN IMMEDIATE")
                held.signal()
                release.wait()
                try db.execute(sql: "ROLLBACK")
            }
        }
        held.wait()
        let refused = h.post(G, "g1", Fixtures.earn("M1", 20, "G-1"))
        release.signal()
        guard case .rejected(let p) = refused else { Issue.record("expected unavailable, got \(refused)"); return }
        #expect(p.kind == .unavailable && p.detail.contains("journal is busy"), "\(p)")
        #expect(try h.store.ledgerEntries(G).count == 1, "nothing written")
        #expect(h.post(G, "g1", Fixtures.earn("M1", 20, "G-1")).isCreated, "the same posting, once the journal is free")
        #expect(try h.verify().ok)
    }
}

/// `settle` re-adds a run's rows before it locks the journal and, under the lock, adds the rows
/// accepted since, or takes off those after the cutoff: either way the sums are those of the
/// run's rows exactly.
@Suite struct RunRowsTests {
    @Test func rowsSummedEarlyThenCompletedEqualTheRunsRows() throws {
        let h = try Harness()
        _ = h.post(G, "g1", Fixtures.earn("M1", 1000, "G-1"))
        _ = h.post(C, "c1", Fixtures.redeem("M1", 300, "C-1"))
        let early = try h.store.coalition.read { try RunRows.afterLastRun($0) }
        // Read in slices on several connections at once: the same sums.
        let sliced = try RunRows.afterLastRun(h.store.coalition)
        #expect(sliced.kinds == early.kinds && sliced.flows == early.flows && sliced.first == 1 && sliced.through == 2)
        _ = h.post(F, "f1", Fixtures.earn("M2", 500, "F-1"))
        _ = h.post(C, "c2", Fixtures.redeem("M2", 200, "C-2"))
        _ = h.post(C, "c3", Fixtures.reverseRedemption("M1", 100, "C-3", of: "C-1"))
        try h.store.coalition.read { db in
            for last in Int64(0)...5 {
                let whole = try RunRows.through(last, from: 1, early: nil, db)
                let completed = try RunRows.through(last, from: 1, early: early, db)
                #expect(completed.kinds.filter { $0.value != [0, 0, 0, 0, 0] } == whole.kinds && completed.flows.filter { $0.value != 0 } == whole.flows.filter { $0.value != 0 }, "through \(last)")
            }
            let all = try RunRows.through(5, from: 1, early: early, db)
            #expect(all.kinds["cinema"] == [0, 500, 0, 100, 3] && all.kinds["grocer"] == [1000, 0, 0, 0, 1])
            #expect(all.flows[RunRows.Pair(issuer: "grocer", redeemer: "cinema")] == 200 && all.flows[RunRows.Pair(issuer: "fuel", redeemer: "cinema")] == 200)
            // Summed early from another first id (a run closed in between): all again.
            #expect(try RunRows.through(5, from: 3, early: early, db).kinds["grocer"] == nil)
        }
    }
}
