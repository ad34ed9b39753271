import GRDB

/// The schemas, as named migrations that are never edited once landed (GRDB's way).
/// SQLite enforces the shape: NOT NULL, UNIQUE, CHECK, and triggers that keep ledgers
/// append-only, gapless and chained.
enum Schema {
    /// `coalition.sqlite`: the journal (the truth: every accepted entry of every partner, in
    /// global acceptance order) and what is derived from it in the same transaction.
    static var coalition: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1-journal-lots-flows") { db in
            try db.execute(
                sql: """
                    CREATE TABLE partner_head (
                      partner TEXT PRIMARY KEY NOT NULL,
                      last_sequence INTEGER NOT NULL CHECK (last_sequence >= 0),
                      last_hash BLOB NOT NULL CHECK (length(last_hash) = 32)
                    ) WITHOUT ROWID;

                    CREATE TABLE journal (
                      id INTEGER PRIMARY KEY NOT NULL CHECK (id >= 1),
                      partner TEXT NOT NULL,
                      sequence INTEGER NOT NULL CHECK (sequence >= 1),
                      webhook_id TEXT NOT NULL CHECK (length(webhook_id) BETWEEN 1 AND 128),
                      accepted_at_ms INTEGER NOT NULL,
                      kind INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 4),
                      member TEXT NOT NULL CHECK (length(member) BETWEEN 1 AND 64),
                      points INTEGER NOT NULL CHECK (points BETWEEN 1 AND 1000000000),
                      reference TEXT NOT NULL CHECK (length(reference) BETWEEN 1 AND 128),
                      original_reference TEXT CHECK ((kind >= 3) = (original_reference IS NOT NULL)),
                      occurred_at_ms INTEGER,
                      amount_minor INTEGER CHECK (amount_minor IS NULL OR amount_minor >= 0),
                      member_balance INTEGER NOT NULL CHECK (member_balance >= 0),
                      hash BLOB NOT NULL CHECK (length(hash) = 32),
                      UNIQUE (partner, sequence),
                      UNIQUE (partner, webhook_id),
                      UNIQUE (partner, reference)
                    );
                    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
                      BEGIN SELECT RAISE(ABORT, 'journal entries never change'); END;
                    CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
                      BEGIN SELECT RAISE(ABORT, 'journal entries are never deleted'); END;

                    CREATE TABLE member (
                      member TEXT PRIMARY KEY NOT NULL,
                      first_journal_id INTEGER NOT NULL REFERENCES journal(id),
                      open_points INTEGER NOT NULL CHECK (open_points >= 0)
                    ) WITHOUT ROWID;

                    -- A lot's id is the journal id of its earn, so ids are in acceptance order.
                    CREATE TABLE lot (
                      id INTEGER PRIMARY KEY NOT NULL REFERENCES journal(id),
                      member TEXT NOT NULL,
                      issuer TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points BETWEEN 1 AND 1000000000),
                      remaining INTEGER NOT NULL CHECK (remaining >= 0 AND remaining <= points),
                      reversed INTEGER NOT NULL DEFAULT 0 CHECK (reversed >= 0 AND reversed <= points),
                      expired INTEGER NOT NULL DEFAULT 0 CHECK (expired >= 0),
                      expires_at_ms INTEGER
                    );
                    CREATE INDEX lot_open_by_member ON lot(member, id) WHERE remaining > 0;

                    -- What each redemption took, lot by lot, in the order taken.
                    CREATE TABLE lot_take (
                      redemption_id INTEGER NOT NULL REFERENCES journal(id),
                      position INTEGER NOT NULL CHECK (position >= 0),
                      lot_id INTEGER NOT NULL REFERENCES lot(id),
                      issuer TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points > 0),
                      returned INTEGER NOT NULL DEFAULT 0 CHECK (returned >= 0 AND returned <= points),
                      PRIMARY KEY (redemption_id, position)
                    ) WITHOUT ROWID;

                    -- Every change to a flow issuer -> redeemer, tied to the entry that made it
                    -- (+k for a redemption's take, -k for a reversal's return). A run's flows are
                    -- the sums over its entries.
                    CREATE TABLE lot_move (
                      entry_id INTEGER NOT NULL REFERENCES journal(id),
                      position INTEGER NOT NULL CHECK (position >= 0),
                      lot_id INTEGER NOT NULL REFERENCES lot(id),
                      issuer TEXT NOT NULL,
                      redeemer TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points <> 0),
                      PRIMARY KEY (entry_id, position)
                    ) WITHOUT ROWID;

                    -- All-time flows, kept current with every posting.
                    CREATE TABLE flow (
                      issuer TEXT NOT NULL,
                      redeemer TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points >= 0),
                      PRIMARY KEY (issuer, redeemer)
                    ) WITHOUT ROWID;
                    """)
        }
        m.registerMigration("v2-expiry-terms") { db in
            // Which points_expire_after_days applied from which journal id on, recorded by the
            // writer whenever the configured value changes, so that verify recomputes each
            // lot's expiry with the terms in force when it was earned.
            try db.execute(
                sql: """
                    CREATE TABLE expiry_terms (
                      from_journal_id INTEGER PRIMARY KEY NOT NULL CHECK (from_journal_id >= 1),
                      points_expire_after_days INTEGER NOT NULL CHECK (points_expire_after_days >= 0)
                    );
                    """)
        }
        m.registerMigration("v3-settlement-runs") { db in
            try db.execute(
                sql: """
                    -- A closed settlement run: the journal ids it covers and its totals. Never changes.
                    CREATE TABLE run (
                      number INTEGER PRIMARY KEY NOT NULL CHECK (number >= 1),
                      id TEXT NOT NULL UNIQUE,
                      cutoff_ms INTEGER NOT NULL,
                      first_journal_id INTEGER NOT NULL CHECK (first_journal_id >= 1),
                      last_journal_id INTEGER NOT NULL CHECK (last_journal_id >= first_journal_id - 1),
                      created_at_ms INTEGER NOT NULL,
                      operator_margin_minor INTEGER NOT NULL,
                      gross_minor INTEGER NOT NULL CHECK (gross_minor >= 0),
                      net_transfers_minor INTEGER NOT NULL CHECK (net_transfers_minor >= 0),
                      netting_efficiency_ppm INTEGER NOT NULL
                    );
                    CREATE TABLE run_partner (
                      run_number INTEGER NOT NULL REFERENCES run(number),
                      partner TEXT NOT NULL,
                      issued_points INTEGER NOT NULL,
                      redeemed_points INTEGER NOT NULL,
                      expired_points INTEGER NOT NULL CHECK (expired_points >= 0),
                      issue_price_per_1000 INTEGER NOT NULL CHECK (issue_price_per_1000 >= 0),
                      redeem_credit_per_1000 INTEGER NOT NULL CHECK (redeem_credit_per_1000 >= 0),
                      payable_minor INTEGER NOT NULL,
                      receivable_minor INTEGER NOT NULL,
                      net_minor INTEGER NOT NULL CHECK (net_minor = receivable_minor - payable_minor),
                      PRIMARY KEY (run_number, partner)
                    ) WITHOUT ROWID;
                    CREATE TABLE run_flow (
                      run_number INTEGER NOT NULL REFERENCES run(number),
                      issuer TEXT NOT NULL,
                      redeemer TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points <> 0),
                      PRIMARY KEY (run_number, issuer, redeemer)
                    ) WITHOUT ROWID;
                    CREATE TRIGGER run_immutable_u BEFORE UPDATE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_immutable_d BEFORE DELETE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_partner_immutable_u BEFORE UPDATE ON run_partner BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_partner_immutable_d BEFORE DELETE ON run_partner BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_flow_immutable_u BEFORE UPDATE ON run_flow BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_flow_immutable_d BEFORE DELETE ON run_flow BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE INDEX lot_expiring ON lot(expires_at_ms) WHERE remaining > 0 AND expires_at_ms IS NOT NULL;
                    """)
        }
        m.registerMigration("v4-notice-outbox") { db in
            try db.execute(
                sql: """
                    -- The settlement notices' outbox: written in the transaction that commits
                    -- the run, so a run never exists without its notices. The content never
                    -- changes; only the delivery state does.
                    CREATE TABLE notice (
                      id TEXT PRIMARY KEY NOT NULL,             -- <run>:<partner>, the webhook-id
                      run_number INTEGER NOT NULL REFERENCES run(number),
                      partner TEXT NOT NULL,
                      body BLOB NOT NULL,
                      created_at_ms INTEGER NOT NULL,
                      state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
                      attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
                      round_attempts INTEGER NOT NULL DEFAULT 0 CHECK (round_attempts >= 0),
                      next_attempt_at_ms INTEGER,
                      lease_owner INTEGER,
                      lease_until_ms INTEGER,
                      finished_at_ms INTEGER,
                      last_result TEXT,
                      UNIQUE (run_number, partner),
                      CHECK ((state = 'pending') = (next_attempt_at_ms IS NOT NULL)),
                      CHECK ((state = 'pending') = (finished_at_ms IS NULL))
                    );
                    CREATE INDEX notice_due ON notice(next_attempt_at_ms) WHERE state = 'pending';
                    CREATE INDEX notice_state ON notice(state, id);
                    CREATE TRIGGER notice_content_immutable BEFORE UPDATE OF id, run_number, partner, body, created_at_ms ON notice
                      BEGIN SELECT RAISE(ABORT, 'a notice''s content never changes'); END;
                    CREATE TRIGGER notice_never_deleted BEFORE DELETE ON notice
                      BEGIN SELECT RAISE(ABORT, 'notices are never deleted'); END;
                    -- Every delivery attempt: when, how long, what came back.
                    CREATE TABLE notice_attempt (
                      notice_id TEXT NOT NULL REFERENCES notice(id),
                      number INTEGER NOT NULL CHECK (number >= 1),
                      started_at_ms INTEGER NOT NULL,
                      latency_ms INTEGER,
                      http_status INTEGER,
                      error TEXT,
                      outcome TEXT NOT NULL CHECK (outcome IN ('in-flight', 'delivered', 'retry', 'dead', 'interrupted')),
                      next_attempt_at_ms INTEGER,
                      PRIMARY KEY (notice_id, number)
                    ) WITHOUT ROWID;
                    CREATE TRIGGER notice_attempt_never_deleted BEFORE DELETE ON notice_attempt
                      BEGIN SELECT RAISE(ABORT, 'attempts are never deleted'); END;
                    """)
        }
        m.registerMigration("v5-statement-ranges") { db in
            // Where each partner's entries of a run lie in its ledger (sequences are gapless and
            // rise with journal ids, so a run's entries of one partner are one range): the
            // statement reads that range straight from the partner's ledger.
            try db.execute(
                sql: """
                    ALTER TABLE run_partner ADD COLUMN entry_count INTEGER;
                    ALTER TABLE run_partner ADD COLUMN first_sequence INTEGER;
                    ALTER TABLE run_partner ADD COLUMN last_sequence INTEGER;
                    """)
        }
        m.registerMigration("v6-running-totals") { db in
            // Each partner's points so far by kind, kept by the writer at every batch, and a
            // snapshot of them (and of the flows) at each run's cutoff: a run's figures are the
            // difference of two snapshots, whatever the number of entries.
            try db.execute(
                sql: """
                    ALTER TABLE partner_head ADD COLUMN earned INTEGER NOT NULL DEFAULT 0;
                    ALTER TABLE partner_head ADD COLUMN redeemed INTEGER NOT NULL DEFAULT 0;
                    ALTER TABLE partner_head ADD COLUMN earn_reversed INTEGER NOT NULL DEFAULT 0;
                    ALTER TABLE partner_head ADD COLUMN redemption_reversed INTEGER NOT NULL DEFAULT 0;
                    UPDATE partner_head SET
                      earned = (SELECT COALESCE(SUM(points), 0) FROM journal j WHERE j.partner = partner_head.partner AND j.kind = 1),
                      redeemed = (SELECT COALESCE(SUM(points), 0) FROM journal j WHERE j.partner = partner_head.partner AND j.kind = 2),
                      earn_reversed = (SELECT COALESCE(SUM(points), 0) FROM journal j WHERE j.partner = partner_head.partner AND j.kind = 3),
                      redemption_reversed = (SELECT COALESCE(SUM(points), 0) FROM journal j WHERE j.partner = partner_head.partner AND j.kind = 4);
                    CREATE TABLE run_snapshot (
                      run_number INTEGER NOT NULL REFERENCES run(number),
                      partner TEXT NOT NULL,
                      last_sequence INTEGER NOT NULL CHECK (last_sequence >= 0),
                      earned INTEGER NOT NULL,
                      redeemed INTEGER NOT NULL,
                      earn_reversed INTEGER NOT NULL,
                      redemption_reversed INTEGER NOT NULL,
                      PRIMARY KEY (run_number, partner)
                    ) WITHOUT ROWID;
                    CREATE TABLE run_flow_snapshot (
                      run_number INTEGER NOT NULL REFERENCES run(number),
                      issuer TEXT NOT NULL,
                      redeemer TEXT NOT NULL,
                      points INTEGER NOT NULL,
                      PRIMARY KEY (run_number, issuer, redeemer)
                    ) WITHOUT ROWID;
                    CREATE TRIGGER run_snapshot_immutable_u BEFORE UPDATE ON run_snapshot BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_snapshot_immutable_d BEFORE DELETE ON run_snapshot BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_flow_snapshot_immutable_u BEFORE UPDATE ON run_flow_snapshot BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_flow_snapshot_immutable_d BEFORE DELETE ON run_flow_snapshot BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    -- The latest run closed before this migration: its snapshot, from the journal.
                    INSERT INTO run_snapshot
                      SELECT r.number, j.partner, MAX(j.sequence),
                        SUM(CASE j.kind WHEN 1 THEN j.points ELSE 0 END), SUM(CASE j.kind WHEN 2 THEN j.points ELSE 0 END),
                        SUM(CASE j.kind WHEN 3 THEN j.points ELSE 0 END), SUM(CASE j.kind WHEN 4 THEN j.points ELSE 0 END)
                      FROM journal j JOIN (SELECT number, last_journal_id FROM run ORDER BY number DESC LIMIT 1) r ON j.id <= r.last_journal_id
                      GROUP BY r.number, j.partner;
                    INSERT INTO run_flow_snapshot
                      SELECT r.number, m.issuer, m.redeemer, SUM(m.points)
                      FROM lot_move m JOIN (SELECT number, last_journal_id FROM run ORDER BY number DESC LIMIT 1) r ON m.entry_id <= r.last_journal_id
                      GROUP BY r.number, m.issuer, m.redeemer;
                    """)
        }
        m.registerMigration("v7-lot-expiry-index") { db in
            // The index a run finds its expiring lots by, without `remaining > 0` in it: that
            // predicate made every redemption that empties a lot delete an index entry at a
            // random place, some 15 % of the writer's time at a million entries
            // (docs/BENCHMARKS.md). On `expires_at_ms` alone the index only grows at its end
            // (expiry follows acceptance) and posting never touches it otherwise.
            //
            // A run then reads the lots expiring after the previous run's cutoff, plus the
            // lots in `lot_reopened`: those whose expiry had passed when a reversed redemption
            // gave them points back (the only way `remaining` grows), recorded by the writer.
            // Here, the lots in that state today.
            try db.execute(
                sql: """
                    CREATE TABLE lot_reopened (
                      lot_id INTEGER PRIMARY KEY NOT NULL REFERENCES lot(id)
                    );
                    INSERT INTO lot_reopened (lot_id)
                      SELECT id FROM lot
                      WHERE remaining > 0 AND expires_at_ms IS NOT NULL AND expires_at_ms <= (SELECT MAX(cutoff_ms) FROM run);
                    DROP INDEX lot_expiring;
                    CREATE INDEX lot_expiry ON lot(expires_at_ms) WHERE expires_at_ms IS NOT NULL;
                    """)
        }
        m.registerMigration("v8-open-lots") { db in
            // A lot's points left move out of the lot row into `lot_open`, one row per lot
            // with points left, keyed by member: a redemption changes only its member's rows
            // there (one page, with its other open lots) instead of old lot rows scattered
            // through the table by age, and the `lot_open_by_member` index (the same key,
            // kept up by every earn and every lot emptied) goes. The lot row keeps what never
            // changes after the earn, plus `reversed` and `expired`: at a million entries,
            // the lot rows' updates and that index made three quarters of the pages each
            // group commit wrote (docs/BENCHMARKS.md, session 8).
            //
            // The lot table is rebuilt without `remaining` (SQLite's way to drop a column
            // that a CHECK names); GRDB runs a migration with foreign keys off and checks
            // them all after it.
            try db.execute(
                sql: """
                    CREATE TABLE lot_open (
                      member TEXT NOT NULL,
                      lot_id INTEGER NOT NULL REFERENCES lot(id),
                      remaining INTEGER NOT NULL CHECK (remaining BETWEEN 1 AND 1000000000),
                      PRIMARY KEY (member, lot_id)
                    ) WITHOUT ROWID;
                    INSERT INTO lot_open (member, lot_id, remaining) SELECT member, id, remaining FROM lot WHERE remaining > 0;
                    CREATE TABLE lot_v8 (
                      id INTEGER PRIMARY KEY NOT NULL REFERENCES journal(id),
                      member TEXT NOT NULL,
                      issuer TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points BETWEEN 1 AND 1000000000),
                      reversed INTEGER NOT NULL DEFAULT 0 CHECK (reversed >= 0 AND reversed <= points),
                      expired INTEGER NOT NULL DEFAULT 0 CHECK (expired >= 0),
                      expires_at_ms INTEGER
                    );
                    INSERT INTO lot_v8 (id, member, issuer, points, reversed, expired, expires_at_ms)
                      SELECT id, member, issuer, points, reversed, expired, expires_at_ms FROM lot ORDER BY id;
                    DROP TABLE lot;
                    ALTER TABLE lot_v8 RENAME TO lot;
                    CREATE INDEX lot_expiry ON lot(expires_at_ms) WHERE expires_at_ms IS NOT NULL;
                    """)
        }
        m.registerMigration("v9-open-lots-within-their-lot") { db in
            // What v8's rebuild took from SQLite's checks: a lot's points left were a column
            // of the lot row, with `remaining <= points` in its CHECK; in `lot_open` they
            // must still be within their lot, and under the lot's own member.
            try db.execute(
                sql: """
                    CREATE TRIGGER lot_open_insert_within_its_lot BEFORE INSERT ON lot_open
                      WHEN NOT EXISTS (SELECT 1 FROM lot WHERE id = NEW.lot_id AND member = NEW.member AND points >= NEW.remaining)
                      BEGIN SELECT RAISE(ABORT, 'lot_open: points left must lie within a lot of the same member'); END;
                    CREATE TRIGGER lot_open_update_within_its_lot BEFORE UPDATE ON lot_open
                      WHEN NOT EXISTS (SELECT 1 FROM lot WHERE id = NEW.lot_id AND member = NEW.member AND points >= NEW.remaining)
                      BEGIN SELECT RAISE(ABORT, 'lot_open: points left must lie within a lot of the same member'); END;
                    """)
        }
        m.registerMigration("v10-coalition-currency") { db in
            // The currency every run, notice, statement and export of this coalition is in,
            // recorded by the first store opened after this migration (`Store.recordCurrency`)
            // and never changed: a closed run's statements must not turn into another currency
            // when coalition.toml does (CONTRACT §6: a closed run never changes).
            // (Applied as it is: a migration never changes once released; v12 adds to it.)
            try db.execute(
                sql: """
                    CREATE TABLE coalition_currency (
                      id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
                      currency TEXT NOT NULL CHECK (length(currency) = 3 AND currency GLOB '[A-Z][A-Z][A-Z]')
                    );
                    CREATE TRIGGER coalition_currency_no_update BEFORE UPDATE ON coalition_currency
                      BEGIN SELECT RAISE(ABORT, 'a coalition''s currency never changes'); END;
                    CREATE TRIGGER coalition_currency_no_delete BEFORE DELETE ON coalition_currency
                      BEGIN SELECT RAISE(ABORT, 'a coalition''s currency never changes'); END;
                    """)
        }
        m.registerMigration("v11-run-names-after-a-restore") { db in
            // Set by `restore`: the partners may hold notices of runs closed after the backup
            // was taken (a timeline now lost), numbered as the next runs here would be. Runs
            // closed after a restore carry its time in their id (`R<yyMMddHHmmss><number>`), so
            // no notice's webhook-id (`<run>:<partner>`) is ever reused for other figures.
            try db.execute(
                sql: """
                    CREATE TABLE run_naming (
                      id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
                      restored_at TEXT NOT NULL CHECK (length(restored_at) = 12 AND restored_at NOT GLOB '*[^0-9]*')
                    );
                    """)
        }
        m.registerMigration("v12-run-currency") { db in
            // Each run keeps its own currency: runs closed before v10, when a configuration could
            // still change it, are in the currency their notices carry (a run without notices,
            // an empty one, has none: the coalition's applies). The coalition's currency is
            // then recorded from the history (`Store.recordCurrency`), not from a configuration.
            try db.execute(
                sql: """
                    ALTER TABLE run ADD COLUMN currency TEXT CHECK (currency IS NULL OR (length(currency) = 3 AND currency GLOB '[A-Z][A-Z][A-Z]'));
                    DROP TRIGGER run_immutable_u;
                    UPDATE run SET currency = (
                      SELECT json_extract(CAST(n.body AS TEXT), '$.data.currency') FROM notice n WHERE n.run_number = run.number LIMIT 1);
                    CREATE TRIGGER run_immutable_u BEFORE UPDATE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    """)
        }
        m.registerMigration("v13-open-lot-check-on-growth") { db in
            // v9's check on an update of `lot_open`, now only where it can fail: a row that
            // keeps its member and lot and holds fewer points (every partial take of a
            // redemption) stays within its lot, since it was before and CHECK keeps it at 1 or
            // more. Every other update (more points, or another member or lot) is checked as
            // before. The look-up of the lot row it saves was a random read of an old lot for
            // every partial take.
            try db.execute(
                sql: """
                    DROP TRIGGER IF EXISTS lot_open_update_within_its_lot;
                    CREATE TRIGGER lot_open_update_within_its_lot BEFORE UPDATE ON lot_open
                      WHEN (NEW.remaining > OLD.remaining OR NEW.member IS NOT OLD.member OR NEW.lot_id IS NOT OLD.lot_id)
                        AND NOT EXISTS (SELECT 1 FROM lot WHERE id = NEW.lot_id AND member = NEW.member AND points >= NEW.remaining)
                      BEGIN SELECT RAISE(ABORT, 'lot_open: points left must lie within a lot of the same member'); END;
                    """)
        }
        m.registerMigration("v14-webhook-id-aliases") { db in
            // A webhook-id that was answered as a replay of an earlier entry with the same
            // reference and content (a partner's retry under a new webhook-id) is bound to that
            // entry: the same webhook-id again replays it, and with other content is a conflict
            // (CONTRACT §3), never a new entry. The journal's own webhook-ids are not repeated
            // here; an alias never names a webhook-id of the journal (this trigger) and the
            // writer checks a new entry's webhook-id against the aliases (`verify` re-checks).
            try db.execute(
                sql: """
                    CREATE TABLE webhook_alias (
                      partner TEXT NOT NULL,
                      webhook_id TEXT NOT NULL,
                      journal_id INTEGER NOT NULL REFERENCES journal(id),
                      PRIMARY KEY (partner, webhook_id)
                    ) WITHOUT ROWID;
                    CREATE TRIGGER webhook_alias_of_a_journal_entry BEFORE INSERT ON webhook_alias
                      WHEN EXISTS (SELECT 1 FROM journal WHERE partner = NEW.partner AND webhook_id = NEW.webhook_id)
                        OR NOT EXISTS (SELECT 1 FROM journal WHERE id = NEW.journal_id AND partner = NEW.partner)
                      BEGIN SELECT RAISE(ABORT, 'webhook_alias: the webhook-id is in the journal, or the entry is not of this partner'); END;
                    CREATE TRIGGER webhook_alias_no_update BEFORE UPDATE ON webhook_alias
                      BEGIN SELECT RAISE(ABORT, 'webhook_alias: never changes'); END;
                    CREATE TRIGGER webhook_alias_no_delete BEFORE DELETE ON webhook_alias
                      BEGIN SELECT RAISE(ABORT, 'webhook_alias: never changes'); END;
                    """)
        }
        m.registerMigration("v15-takes-and-moves-fixed") { db in
            // What a redemption took from each lot, and each move between flows, are written once
            // with their entry; only a take's `returned` grows (a reversal gives points back).
            // A reversal reads the issuer it gives back to from its take, so an edited issuer
            // would move points between the wrong partners (`verify` also compares each take
            // with the replay of the journal).
            try db.execute(
                sql: """
                    CREATE TRIGGER lot_take_only_returned_changes BEFORE UPDATE OF redemption_id, position, lot_id, issuer, points ON lot_take
                      BEGIN SELECT RAISE(ABORT, 'lot_take: only returned changes'); END;
                    CREATE TRIGGER lot_take_never_deleted BEFORE DELETE ON lot_take
                      BEGIN SELECT RAISE(ABORT, 'lot_take: never deleted'); END;
                    CREATE TRIGGER lot_move_no_update BEFORE UPDATE ON lot_move
                      BEGIN SELECT RAISE(ABORT, 'lot_move: never changes'); END;
                    CREATE TRIGGER lot_move_no_delete BEFORE DELETE ON lot_move
                      BEGIN SELECT RAISE(ABORT, 'lot_move: never changes'); END;
                    """)
        }
        m.registerMigration("v16-notice-lease-boot-time") { db in
            // A notice's lease also runs on the host's boot clock (`LeaseTime`), which no step
            // of the wall clock moves: a forward step during an attempt let another process take
            // the notice and send it at the same moment. It holds while either clock says so
            // (`Store.leaseHolds`); `lease_until_ms` (wall) also schedules the next attempt.
            try db.execute(
                sql: """
                    ALTER TABLE notice ADD COLUMN lease_boot TEXT;
                    ALTER TABLE notice ADD COLUMN lease_until_boot_ms INTEGER;
                    """)
        }
        m.registerMigration("v17-run-expiries") { db in
            // Which lots each run expired, and how many points of each: an issuer's
            // `expired_points` is then reproducible lot by lot (its JSON statement lists them;
            // CONTRACT §8). Runs closed before this migration recorded only the totals:
            // `run_expiry_recorded.from_run` is the first run with the lots.
            try db.execute(
                sql: """
                    CREATE TABLE run_expiry (
                      run_number INTEGER NOT NULL REFERENCES run(number),
                      issuer TEXT NOT NULL,
                      lot_id INTEGER NOT NULL REFERENCES lot(id),
                      member TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points BETWEEN 1 AND 1000000000),
                      PRIMARY KEY (run_number, issuer, lot_id)
                    ) WITHOUT ROWID;
                    CREATE TRIGGER run_expiry_immutable_u BEFORE UPDATE ON run_expiry BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TRIGGER run_expiry_immutable_d BEFORE DELETE ON run_expiry BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;
                    CREATE TABLE run_expiry_recorded (
                      id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
                      from_run INTEGER NOT NULL CHECK (from_run >= 1)
                    );
                    INSERT INTO run_expiry_recorded (id, from_run) SELECT 1, COALESCE(MAX(number), 0) + 1 FROM run;
                    CREATE TRIGGER run_expiry_recorded_immutable_u BEFORE UPDATE ON run_expiry_recorded BEGIN SELECT RAISE(ABORT, 'never changes'); END;
                    CREATE TRIGGER run_expiry_recorded_immutable_d BEFORE DELETE ON run_expiry_recorded BEGIN SELECT RAISE(ABORT, 'never changes'); END;
                    """)
        }
        return m
    }

    /// `ledgers/<partner>.sqlite`: the partner's own append-only, hash-chained copy of its
    /// entries. The triggers refuse any update, delete, gap or broken link.
    static var ledger: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1-entries") { db in
            try db.execute(
                sql: """
                    -- One row: whose ledger this is, and the hash the chain starts from.
                    CREATE TABLE ledger_info (
                      id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
                      partner TEXT NOT NULL,
                      genesis_hash BLOB NOT NULL CHECK (length(genesis_hash) = 32)
                    );

                    CREATE TABLE entry (
                      sequence INTEGER PRIMARY KEY NOT NULL CHECK (sequence >= 1),
                      journal_id INTEGER NOT NULL,
                      webhook_id TEXT NOT NULL,
                      accepted_at_ms INTEGER NOT NULL,
                      kind INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 4),
                      member TEXT NOT NULL,
                      points INTEGER NOT NULL CHECK (points BETWEEN 1 AND 1000000000),
                      reference TEXT NOT NULL,
                      original_reference TEXT,
                      occurred_at_ms INTEGER,
                      amount_minor INTEGER,
                      member_balance INTEGER NOT NULL CHECK (member_balance >= 0),
                      prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
                      hash BLOB NOT NULL CHECK (length(hash) = 32)
                    );
                    CREATE TRIGGER entry_append_only_update BEFORE UPDATE ON entry
                      BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
                    CREATE TRIGGER entry_append_only_delete BEFORE DELETE ON entry
                      BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
                    CREATE TRIGGER entry_gapless_chained BEFORE INSERT ON entry
                      WHEN NEW.sequence <> COALESCE((SELECT MAX(sequence) FROM entry), 0) + 1
                        OR NEW.prev_hash IS NOT (CASE WHEN NEW.sequence = 1
                             THEN (SELECT genesis_hash FROM ledger_info WHERE id = 1)
                             ELSE (SELECT hash FROM entry WHERE sequence = NEW.sequence - 1) END)
                      BEGIN SELECT RAISE(ABORT, 'ledger entries must be gapless and chained'); END;
                    """)
        }
        return m
    }
}
