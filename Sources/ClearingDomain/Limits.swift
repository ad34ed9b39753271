/// Every limit of Clearhouse, in one place (TIGER_STYLE: put a limit on everything).
/// Names carry their unit last.
public enum Limits {
    // MARK: Identifiers (CONTRACT §1, §3)
    public static let partnerIDBytesMin = 2
    public static let partnerIDBytesMax = 32
    public static let memberIDBytesMax = 64
    public static let referenceBytesMax = 128
    public static let webhookIDBytesMax = 128

    // MARK: Quantities (CONTRACT §1)
    public static let pointsPerEventMin: Int64 = 1
    public static let pointsPerEventMax: Int64 = 1_000_000_000
    /// Largest purchase amount accepted in `amount_minor` (ten trillion minor units).
    public static let amountMinorMax: Int64 = 10_000_000_000_000
    /// Largest price per 1000 points a partner's terms may name (minor units).
    public static let pricePer1000MinorMax: Int64 = 1_000_000_000
    /// Longest configurable point lifetime: 100 years.
    public static let pointsExpireAfterDaysMax: Int64 = 36_500

    // MARK: Intake (CONTRACT §3)
    public static let eventBodyBytesMax = 64 * 1024
    /// Deepest nesting of objects and arrays accepted in a body (an event needs 2).
    public static let jsonDepthMax = 8
    public static let signatureToleranceSecondsMax: Int64 = 300
    /// Digits read of a `webhook-timestamp` (past Int64's 19 it is far from any clock: stale).
    public static let webhookTimestampDigitsMax = 64

    /// Most bytes of a request's own text (a path, a header) a problem's detail repeats back.
    public static let echoedTextBytesMax = 128

    /// How long the server may keep reading a body it refused unread before it closes the
    /// connection.
    public static let refusedBodyDrainMillisecondsMax = 20
    /// How long a closing TLS connection waits for the peer's close_notify.
    public static let tlsShutdownTimeoutMillisecondsMax = 100
    /// A partner's token bucket holds this many seconds of its rate.
    public static let rateBurstSeconds: Int64 = 2
    /// Longest a request's headers may be, in bytes, all together.
    public static let requestHeaderBytesMax = 16 * 1024
    /// Past this, the HTTP decoder refuses a request head before building it (one field or
    /// all together), and closes the connection.
    public static let requestHeaderDecodeBytesMax = 32 * 1024
    /// Most header fields in one request.
    public static let requestHeaderFieldsMax = 100
    /// Most connections open at once; past this the server stops accepting (the kernel's
    /// listen backlog holds the rest). About 85 KiB of memory each under TLS.
    public static let connectionsMax = 1_024
    /// Most connections open at once from one client address; past this a new connection from
    /// it is closed before its TLS handshake, so that one client (or a flood from one host)
    /// cannot take every slot under `connectionsMax`. A quarter of them: partners behind one
    /// NAT address share it. Loopback is not limited (a reverse proxy on the same host).
    public static let connectionsPerAddressMax = 256
    /// A connection with no request in progress is closed after this long (also one that
    /// never completes its TLS handshake or request head).
    public static let connectionIdleSecondsMax: Int64 = 15
    /// A request must be read whole (head to end of body) within this long of its head, or its
    /// connection is closed (slow bodies).
    public static let requestReadSecondsMax: Int64 = 10
    /// A connection that stays unwritable this long (its client reads none of what it is
    /// sent) is closed.
    public static let responseStallSecondsMax: Int64 = 30
    /// A connection open this long is closed after its current response (`connection: close`),
    /// so that a client sending a cheap request just inside the idle timeout cannot keep its
    /// slot under `connectionsMax` for ever.
    public static let connectionAgeSecondsMax: Int64 = 600
    /// Seconds a client is told to wait in `retry-after` when the server sheds load.
    public static let overloadRetryAfterSeconds = 1
    /// `retry-after` when storage fails (a disk full, a ledger that cannot be written) or the
    /// server is shutting down: longer than an overload's, since it takes longer to pass.
    public static let storageRetryAfterSeconds = 5
    /// Longest bearer token read (reads, `/metrics`, and the check on posts).
    public static let bearerTokenBytesMax = 512
    /// Highest `rate_per_second` a partner file may give.
    public static let ratePerSecondMax: Int64 = 1_000_000
    /// Below this many free bytes, a storage error is logged as the disk being full.
    public static let diskFullBytes: Int64 = 4 * 1024 * 1024
    /// Longest the server waits for in-flight requests when shutting down.
    public static let shutdownGraceSecondsMax: Int64 = 30
    /// On SIGTERM, how long the server keeps listening with `/readyz` at 503 and new postings
    /// refused with 503 and `retry-after`, before it closes its listener and drains: a load
    /// balancer polling readiness sees the stop, and a client sees a 503, not a refused connection.
    public static let shutdownDrainMilliseconds: Int64 = 1_000
    /// How long a test's self-sent signal is waited for (`Interruption.raiseAndWait`).
    public static let signalWaitMillisecondsMax = 5_000

    // MARK: Posting writer (group commit)
    /// Most postings decided in one coalition transaction (one fsync of the journal).
    public static let postingBatchMax = 4096
    /// Group-commit delay: under load (the previous batch held at least
    /// `postingBatchGatherFrom` postings), the writer waits up to this long for more postings
    /// before deciding a batch smaller than `postingBatchGatherTo`, so that one fsync serves more
    /// postings (PostgreSQL's `commit_delay`, for the same reason). A posting that arrives after
    /// the writer was idle for longer than this delay never waits.
    public static let postingBatchGatherMicrosecondsMax = 2_000
    public static let postingBatchGatherFrom = 4
    public static let postingBatchGatherTo = 48
    /// How long the writer's ledger stage is idle before it copies into the ledgers what another
    /// process (`clearhouse post`) decided in the journal and did not copy before it died.
    public static let ledgerCatchUpIdleSecondsMax: Int64 = 5
    /// Most postings waiting for the writer; past this, callers get `unavailable`.
    public static let postingQueueMax = 65_536
    /// Load shedding: while the oldest waiting posting has waited longer than this, new ones
    /// get `unavailable` with `retry-after` at once, so the latency of accepted postings stays
    /// bounded however many clients push (the writer is behind; queueing more only adds wait).
    public static let postingQueueWaitMillisecondsMax: Int64 = 250
    /// SQLite page cache of each coalition connection (KiB): a whole batch's pages stay in
    /// memory until its COMMIT, and the hot parts of the journal's indexes stay cached.
    public static let coalitionCacheKiBMax = 64 * 1024
    /// The coalition's WAL, in frames (pages), past which the writer checkpoints at its commit
    /// so that the WAL can start over (64 MiB at 4 KiB pages). Below it, checkpoints run in the
    /// background, on their own connection (`Checkpointer`).
    public static let coalitionWALFramesMax: Int32 = 16_384
    /// The buffer the coalition writer's WAL writes are gathered in (bytes; one per open
    /// store): a group commit's thousands of frames reach the file in writes of 64 KiB (the
    /// layer's most per call), not two system calls each (`CSQLiteConfig/wal_buffer.c`).
    /// 0 turns gathering off.
    public static let coalitionWALBufferBytes = 1024 * 1024
    /// New WAL frames that start a background checkpoint (SQLite's own autocheckpoint default).
    public static let walCheckpointFramesFrom: Int32 = 1_000
    /// The writer's cache of members' open lots (`LotCache`): most members and most lots it
    /// holds before it starts empty again. A lot is 48 bytes in its member's array (more with
    /// the array's spare capacity), a member some 150 bytes (its id, array and table slot):
    /// about 150 MiB at most, at both limits. Checked when a member's lots are loaded and when
    /// an earn adds one.
    public static let lotCacheMembersMax = 262_144
    public static let lotCacheLotsMax = 1_048_576
    /// SQLite page cache of each ledger connection (KiB): ledgers are appended to, so little
    /// is needed, and there is one per partner.
    public static let ledgerCacheKiBMax = 2 * 1024
    /// A restore copies each file through a buffer of this size.
    public static let fileCopyChunkBytes = 1024 * 1024
    /// Slices `settle` re-adds a run's rows in at once, each on its own reader connection
    /// (before it locks the journal), to use the machine's cores.
    public static let settlePassesMax = 2
    /// Breaches a refused restore names in its one-line error (`verify` on the staged files
    /// lists them all).
    public static let verifyBreachesShownMax = 5
    /// How long a writer waits for another process's lock on the coalition database.
    public static let databaseBusyTimeoutSecondsMax = 10

    // MARK: Settlement notices (CONTRACT §7)
    /// Delay before each attempt, after the previous one failed: the Standard Webhooks
    /// schedule (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h).
    public static let noticeRetryDelaysSeconds: [Int64] = [0, 5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 72_000, 86_400]
    /// Attempts before a notice becomes a dead letter (per round; `notices retry` starts a new one).
    public static var noticeAttemptsMax: Int { noticeRetryDelaysSeconds.count }
    /// Each delay is moved by up to this fraction (parts per million), up or down.
    public static let noticeJitterPPMMax: Int64 = 100_000
    /// The longest `retry-after` of a partner's 429 or 503 that is honoured.
    public static let noticeRetryAfterSecondsMax: Int64 = 86_400
    /// The furthest ahead of now a next attempt can be scheduled (the longest delay with its
    /// jitter, or the longest `retry-after`, and an hour's slack for clocks that differ a little);
    /// a notice scheduled further ahead was scheduled by a wall clock since set back, and is due
    /// at once.
    public static var noticeNextAttemptAheadMillisecondsMax: Int64 {
        let longest = noticeRetryDelaysSeconds.max()! * (1_000_000 + noticeJitterPPMMax) / 1_000_000
        return (max(longest, noticeRetryAfterSecondsMax) + 3_600) * 1000
    }
    public static let noticeConnectTimeoutMillisecondsMax = 10_000
    public static let noticeTotalTimeoutMillisecondsMax = 30_000
    /// The most of a partner's response body read (and discarded).
    public static let noticeResponseBytesMax = 64 * 1024
    /// Longest `notice_url` a partner file may give.
    public static let noticeURLBytesMax = 2_048
    /// Deliveries in flight at once: the lanes of a delivery pass, each one transfer at a time.
    public static let noticesInFlightMax = 8
    /// A notice attempt whose outcome could not be recorded is recorded again after this many
    /// milliseconds times the try's number (`noticeRecordTriesMax` tries).
    public static let noticeRecordRetryStepMilliseconds = 100
    /// Due notices read per claim, for each one that may be claimed (some are leased by another
    /// process and skipped), plus a margin.
    public static let noticeClaimReadFactor = 4
    public static let noticeClaimReadMargin = 16
    /// Longest one wait of libcurl's transfer loop: how soon a cancelled sender stops.
    public static let curlPollMillisecondsMax = 250
    /// A claimed notice's lease outlives its total timeout by this much; a lease whose process
    /// has died is void at once.
    public static let noticeLeaseSlackMilliseconds: Int64 = 5_000
    /// How often the worker in `serve` looks for notices due (settle runs in another process).
    public static let noticePollIntervalMilliseconds: Int64 = 1_000
    /// The shortest nap of the delivery worker after a pass that sent nothing.
    public static let noticeIdleNapMillisecondsMin: Int64 = 250
    /// The outbox gauges are recounted at least this often, even when nothing is sent.
    public static let noticeGaugeRefreshMilliseconds: Int64 = 30_000
    /// Tries to record one attempt's result (a busy database) before the pass gives up on it.
    public static let noticeRecordTriesMax = 5
    /// Notices one delivery pass claims at most (each is attempted at most once per pass).
    public static let noticeClaimsPerPassMax = 8_000
    /// Most notices `notices list` prints.
    public static let noticeListRowsMax = 10_000
    /// Longest error text kept for one attempt.
    public static let noticeErrorBytesMax = 512

    // MARK: Statements (CONTRACT §8)
    /// Entries read from a ledger and written to a statement response at a time.
    public static let statementBatchEntries = 2_000
    /// Statement digests remembered for their signatures (cleared when full).
    public static let statementDigestCacheMax = 4_096

    // MARK: Configuration
    public static let partnersMax = 1_000
    public static let webhookSecretsPerPartnerMax = 8
    /// Characters in a partner's display `name` (partners/<id>.toml).
    public static let partnerNameCharactersMax = 200
    /// Tries at opening a database (switching a new file to WAL) or at its pending migrations
    /// when another process does the same at the same moment (each failed try rolls back; the
    /// next sees what the other did).
    public static let databaseOpenAttemptsMax = 10
    public static let configFileBytesMax = 256 * 1024
    /// A webhook or notice secret's bytes (after `whsec_`): any length CONTRACT §2 allows is
    /// accepted; below the Standard Webhooks recommendation of 24 bytes, with a warning.
    public static let secretBytesMin = 1
    public static let secretBytesRecommendedMin = 24
    public static let secretBytesMax = 1024
    /// The largest `file:PATH` secret file read (a secret is at most `whsec_` and the base64 of
    /// `secretBytesMax` bytes, with room for a line end).
    public static let secretFileBytesMax = 4096

    // MARK: Command line and simulation
    public static let simulatedEventsMax = 100_000_000
    public static let simulatedMembersMax = 100_000_000
}
