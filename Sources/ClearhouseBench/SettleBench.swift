import ClearingDomain
import ClearingStore
import Foundation
import Crypto
import GRDB

/// `clearhouse-bench settle`: loads a large history straight into a data directory (bulk SQL,
/// not the posting API: the subject here is settlement), times `Store.settle`, and, in the
/// same run, the ceiling: `sqlite3` grouping and summing the same entries straight from the
/// ledger files.
enum SettleBench {
    /// Writes `dir/partners` (TOML for `partnerCount` partners) and `dir/data` (the history).
    static func load(entries: Int, partners partnerCount: Int, members: Int, dir: URL) throws {
        var terms: [PartnerID: PartnerTerms] = [:]
        var ids: [PartnerID] = []
        let partnersDir = dir.appendingPathComponent("partners")
        try FileManager.default.createDirectory(at: partnersDir, withIntermediateDirectories: true)
        try "currency = \"EUR\"\npoints_expire_after_days = 1095\n".write(
            to: partnersDir.appendingPathComponent("coalition.toml"), atomically: true, encoding: .utf8)
        for i in 1...partnerCount {
            let id = PartnerID(String(format: "p%03d", i))!
            ids.append(id)
            func bytes(_ tag: String) -> [UInt8] { Array(SHA256Digest.of("\(tag)-\(id)")) }
            terms[id] = PartnerTerms(
                id: id, name: "Partner \(i)", issuePricePer1000: MoneyMinor(1000), redeemCreditPer1000: MoneyMinor(900),
                webhookSecrets: [SecretBytes(bytes("webhook"))], apiTokenSHA256: bytes("token"),
                noticeURL: "https://127.0.0.1/\(i)", noticeSecret: SecretBytes(bytes("notice")))
            let toml = """
                id = "\(id)"
                name = "Partner \(i)"
                issue_price_per_1000 = 1000
                redeem_credit_per_1000 = 900
                webhook_secrets = ["whsec_\(Data(bytes("webhook")).base64EncodedString())"]
                api_token_sha256 = "\(bytes("token").map { String(format: "%02x", $0) }.joined())"
                notice_url = "https://notices.p\(i).example/"
                notice_secret = "whsec_\(Data(bytes("notice")).base64EncodedString())"

                """
            try toml.write(to: partnersDir.appendingPathComponent("\(id).toml"), atomically: true, encoding: .utf8)
        }
        let configuration = ClearingConfiguration(coalition: CoalitionTerms(currency: "EUR", pointsExpireAfterDays: 1095), partners: terms)
        let data = dir.appendingPathComponent("data")
        // Create the schema (and every ledger) through the store, then bulk-load with plain SQL.
        let store = try Store(dataDirectory: data, configuration: configuration)
        for id in ids { _ = try store.ledgerEntries(id) }
        try store.close()
        let t0 = DispatchTime.now()
        try bulkLoad(data: data, ids: ids, entries: entries, members: members)
        print(String(format: "loaded %d entries for %d partners and %d members in %.1f s", entries, partnerCount, members, seconds(since: t0)))
    }

    static func bulkLoad(data: URL, ids: [PartnerID], entries: Int, members: Int) throws {
        var config = GRDB.Configuration()
        config.foreignKeysEnabled = false  // bulk load of synthetic rows (moves point at lot 1)
        config.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = OFF; PRAGMA cache_size = -262144") }
        let coalition = try DatabaseQueue(path: data.appendingPathComponent("coalition.sqlite").path, configuration: config)
        var ledgers: [DatabaseQueue] = []
        for id in ids {
            let q = try DatabaseQueue(path: data.appendingPathComponent("ledgers/\(id).sqlite").path, configuration: config)
            try q.write { db in
                try db.execute(sql: "DROP TRIGGER IF EXISTS entry_gapless_chained")  // bulk load: the chain is made here
                try db.execute(sql: "INSERT OR IGNORE INTO ledger_info (id, partner, genesis_hash) VALUES (1, ?, ?)",
                               arguments: [id.rawValue, Data(Store.genesisHash(id))])
            }
            ledgers.append(q)
        }
        // Each entry hashed as the writer hashes it, chained from the partner's genesis, so
        // that a statement (which serves only rows matching their chain) reads them.
        var chainHead = ids.map(Store.genesisHash)
        // Accepted over the last 30 days, so that lots do not expire (a nightly run expires few).
        let start: Int64 = SystemClock().now().millisecondsSinceEpoch - 30 * 86_400_000
        var seq = Array(repeating: Int64(0), count: ids.count)
        var rng = SystemRandomNumberGenerator()
        let chunk = 200_000
        var done = 0
        while done < entries {
            let n = min(chunk, entries - done)
            var rows: [(Int64, Int, Int64, Int, String, Int64, Int)] = []  // id, partner idx, seq, kind, member, points, issuer idx
            rows.reserveCapacity(n)
            var hashes: [(previous: Data, hash: Data)] = []
            hashes.reserveCapacity(n)
            for k in 0..<n {
                let id = Int64(done + k + 1)
                let p = Int.random(in: 0..<ids.count, using: &rng)
                seq[p] += 1
                let roll = Int.random(in: 0..<100, using: &rng)
                let kind = roll < 60 ? 1 : roll < 90 ? 2 : roll < 95 ? 3 : 4
                rows.append((id, p, seq[p], kind, "M\(Int.random(in: 0..<members, using: &rng))", Int64.random(in: 1...500, using: &rng),
                             Int.random(in: 0..<ids.count, using: &rng)))
                let r = rows[rows.count - 1]
                let entry = Entry(
                    journalID: id, partner: ids[p], sequence: r.2, webhookID: WebhookID("w\(id)")!,
                    acceptedAt: Instant(millisecondsSinceEpoch: start + id),
                    event: Event(
                        kind: EventKind(rawValue: kind)!, member: MemberID(r.4)!, points: Points(r.5), reference: Reference("R\(id)")!,
                        originalReference: kind >= 3 ? Reference("R1")! : nil),
                    memberBalance: .zero)
                let hash = Store.chainHash(previous: chainHead[p], entry: entry)
                hashes.append((Data(chainHead[p]), Data(hash)))
                chainHead[p] = hash
            }
            try coalition.inTransaction {
                let j = try $0.makeStatement(sql: """
                    INSERT INTO journal (id, partner, sequence, webhook_id, accepted_at_ms, kind, member, points, reference,
                      original_reference, member_balance, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)
                    """)
                let lot = try $0.makeStatement(sql: "INSERT INTO lot (id, member, issuer, points, expires_at_ms) VALUES (?, ?, ?, ?, ?)")
                let open = try $0.makeStatement(sql: "INSERT INTO lot_open (member, lot_id, remaining) VALUES (?, ?, ?)")
                let move = try $0.makeStatement(sql: "INSERT INTO lot_move (entry_id, position, lot_id, issuer, redeemer, points) VALUES (?, 0, 1, ?, ?, ?)")
                for (r, h) in zip(rows, hashes) {
                    let pid = ids[r.1].rawValue
                    try j.execute(arguments: [r.0, pid, r.2, "w\(r.0)", start + r.0, r.3, r.4, r.5, "R\(r.0)", r.3 >= 3 ? "R1" : nil, h.hash])
                    if r.3 == 1 {
                        try lot.execute(arguments: [r.0, r.4, pid, r.5, start + 86_400_000 * 1095])
                        try open.execute(arguments: [r.4, r.0, r.5])
                    }
                    if r.3 == 2 { try move.execute(arguments: [r.0, ids[r.6].rawValue, pid, r.5]) }
                    if r.3 == 4 { try move.execute(arguments: [r.0, ids[r.6].rawValue, pid, -r.5]) }
                }
                return .commit
            }
            var byPartner = Array(repeating: [(Int64, Int64, Int, String, Int64, Data, Data)](), count: ids.count)
            for (r, h) in zip(rows, hashes) { byPartner[r.1].append((r.2, r.0, r.3, r.4, r.5, h.previous, h.hash)) }
            for (i, q) in ledgers.enumerated() where !byPartner[i].isEmpty {
                try q.inTransaction {
                    let s = try $0.makeStatement(sql: """
                        INSERT INTO entry (sequence, journal_id, webhook_id, accepted_at_ms, kind, member, points, reference,
                          original_reference, member_balance, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)
                        """)
                    for e in byPartner[i] {
                        try s.execute(arguments: [e.0, e.1, "w\(e.1)", start + e.1, e.2, e.3, e.4, "R\(e.1)", e.2 >= 3 ? "R1" : nil, e.5, e.6])
                    }
                    return .commit
                }
            }
            done += n
        }
        // What the writer keeps at every batch: each partner's head and running totals, and the
        // flows so far (the synthetic moves are random, so a pair's sum may come out negative;
        // the real writer never lets it).
        try coalition.inTransaction {
            try $0.execute(sql: """
                INSERT INTO partner_head (partner, last_sequence, last_hash, earned, redeemed, earn_reversed, redemption_reversed)
                SELECT partner, MAX(sequence), (SELECT hash FROM journal j WHERE j.partner = journal.partner ORDER BY sequence DESC LIMIT 1),
                  SUM(CASE kind WHEN 1 THEN points ELSE 0 END), SUM(CASE kind WHEN 2 THEN points ELSE 0 END),
                  SUM(CASE kind WHEN 3 THEN points ELSE 0 END), SUM(CASE kind WHEN 4 THEN points ELSE 0 END)
                FROM journal GROUP BY partner;
                INSERT INTO flow (issuer, redeemer, points) SELECT issuer, redeemer, MAX(0, SUM(points)) FROM lot_move GROUP BY issuer, redeemer;
                """)
            return .commit
        }
        try coalition.close()
        for q in ledgers { try q.close() }
    }
}

enum SHA256Digest {
    static func of(_ s: String) -> [UInt8] { Array(SHA256.hash(data: Array(s.utf8))) }
}
