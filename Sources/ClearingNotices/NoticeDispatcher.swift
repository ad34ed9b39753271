import ClearingDomain
import ClearingStore
import CoreMetrics
import Foundation
import Logging
import PartnerTransport
import ServiceLifecycle
import StandardWebhooks
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How notices are sent. The defaults are the limits of `Limits`; tests shorten the timeouts.
public struct NoticeDeliveryOptions: Sendable {
    public var connectTimeoutMilliseconds = Limits.noticeConnectTimeoutMillisecondsMax
    public var totalTimeoutMilliseconds = Limits.noticeTotalTimeoutMillisecondsMax
    public var responseBytesMax = Limits.noticeResponseBytesMax
    public var inFlightMax = Limits.noticesInFlightMax
    public var pollIntervalMilliseconds = Limits.noticePollIntervalMilliseconds

    public init() {}
}

/// What one pass did.
public struct DeliveryPass: Equatable, Sendable {
    public var attempted = 0
    public var delivered = 0
    public var retrying = 0
    public var dead = 0

    public init() {}

    mutating func add(_ other: DeliveryPass) {
        attempted += other.attempted
        delivered += other.delivered
        retrying += other.retrying
        dead += other.dead
    }
}

/// Sends the outbox's notices: claims those due, posts them (several at once), and records
/// every attempt with what follows it (delivered, a retry at a later time, or a dead letter).
/// The schedule lives in the database, so a restart resumes it; a notice being sent when
/// the process died is sent again (same `webhook-id`): partners receive it at least once.
public final class NoticeDispatcher: Sendable {
    let store: Store
    let transport: any OutboundTransport
    let clock: any WallClock
    let options: NoticeDeliveryOptions
    let jitterPPM: @Sendable () -> Int64
    let logger: Logger
    let metrics: (any MetricsFactory)?
    let owner: Int32
    /// When the outbox gauges were last recounted (ms since the epoch).
    let countsPublishedAt = Atomic<Int64>(Int64.min / 2)
    /// The partners' current terms (URL, CA, secret), read at each pass that sends, so that
    /// a partner's fixed endpoint or rotated secret is used without a restart.
    let currentConfiguration: @Sendable () -> ClearingConfiguration

    /// - Parameters:
    ///   - jitterPPM: spreads retries (±`Limits.noticeJitterPPMMax`); random unless a test fixes it.
    ///   - metrics: where attempt counts, latencies and outbox gauges go (nil: nowhere).
    public init(
        store: Store, transport: any OutboundTransport, clock: any WallClock = SystemClock(), options: NoticeDeliveryOptions = .init(),
        jitterPPM: @escaping @Sendable () -> Int64 = { Int64.random(in: -Limits.noticeJitterPPMMax...Limits.noticeJitterPPMMax) },
        logger: Logger = Logger(label: "clearhouse.notices"), metrics: (any MetricsFactory)? = nil,
        configuration: (@Sendable () -> ClearingConfiguration)? = nil
    ) {
        currentConfiguration = configuration ?? { [store] in store.configuration }
        self.store = store
        self.transport = transport
        self.clock = clock
        self.options = options
        self.jitterPPM = jitterPPM
        self.logger = logger
        self.metrics = metrics
        owner = getpid()
    }

    /// One pass (`notices send`, `notices retry`): every notice due, each attempted at most
    /// once, `inFlightMax` at a time, one at a time per partner. `only` limits the pass to one
    /// notice.
    ///
    /// `inFlightMax` lanes each claim one notice, send it, record its answer and claim the
    /// next, until nothing the pass may take is left. A lane never takes a partner another
    /// lane is sending to, so a slow or silent partner (even with a backlog) holds up one lane,
    /// never the other partners' notices; each answer is recorded when it comes.
    @discardableResult
    public func deliverDue(only: String? = nil) async throws -> DeliveryPass {
        var pass = DeliveryPass()
        // A read first: an idle worker never queues behind the posting writer.
        let (store, start) = (self.store, clock.now())
        if try await onDatabaseThread({ try store.noticeDue(at: start) }) {
            let shared = LaneState(isPass: true, claims: Limits.noticeClaimsPerPassMax)
            // A lane that fails (an answer that could not be recorded) stops the pass: no lane
            // claims another notice, those in flight finish (a thrown error would cancel their
            // transfers), and the pass then throws the first failure.
            let (total, failure) = await withTaskGroup(of: (DeliveryPass, (any Error)?).self) { group in
                for _ in 0..<max(1, options.inFlightMax) {
                    group.addTask {
                        var lane = DeliveryPass()
                        do {
                            while try await self.deliverOne(only: only, shared, into: &lane) {}
                            return (lane, nil)
                        } catch {
                            shared.stop()
                            return (lane, error)
                        }
                    }
                }
                var total = DeliveryPass()
                var failure: (any Error)?
                for await (lane, error) in group {
                    total.add(lane)
                    failure = failure ?? error
                }
                return (total, failure)
            }
            pass = total
            if let failure { throw failure }
        }
        try await publishCountsIfDue(sent: pass.attempted > 0)
        return pass
    }

    /// Recounts the outbox gauges: after sending (counts changed), and at least every
    /// `noticeGaugeRefreshMilliseconds` (another process may have sent, or settled).
    private func publishCountsIfDue(sent: Bool) async throws {
        let now = clock.now().millisecondsSinceEpoch
        if sent || now - countsPublishedAt.load(ordering: .relaxed) >= Limits.noticeGaugeRefreshMilliseconds {
            try await publishCounts()
            countsPublishedAt.store(now, ordering: .relaxed)
        }
    }

    /// Delivers until the task is cancelled or a graceful shutdown begins (`clearhouse serve`):
    /// `inFlightMax` lanes, each claiming the next notice due as soon as it has recorded its
    /// last one, and napping (at most the poll interval: `settle` runs in other processes and
    /// adds notices) while nothing it may take is due. A new run's notices go out at once
    /// even while another partner's lane waits on a slow endpoint.
    public func run() async {
        logger.info("notice delivery started", metadata: ["transport": "\(CurlTransport.version)"])
        let shared = LaneState(isPass: false, claims: Int.max)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<max(1, options.inFlightMax) {
                group.addTask { await self.serveLane(shared) }
            }
            group.addTask {
                while !Task.isCancelled && !Task.isShuttingDownGracefully {
                    do { try await self.publishCountsIfDue(sent: shared.takeSent()) } catch {
                        self.logger.error("notice gauges could not be recounted", metadata: ["error": "\(error)"])
                    }
                    let nap = self.options.pollIntervalMilliseconds
                    try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(nap)) }
                }
            }
        }
        logger.info("notice delivery stopped")
    }

    private func serveLane(_ shared: LaneState) async {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            var ignored = DeliveryPass()
            var sent = false
            do {
                sent = try await deliverOne(only: nil, shared, into: &ignored)
            } catch {
                logger.error("notice delivery failed", metadata: ["error": "\(error)"])
            }
            if sent { continue }
            // Nothing this lane may take: nap until the next notice it may take is due (a leased
            // one not before its lease runs out; those of partners other lanes are sending to do
            // not count, else it would wake at the floor while a slow partner's backlog lasts),
            // at least `noticeIdleNapMillisecondsMin`, at most the poll interval.
            var nap = options.pollIntervalMilliseconds
            let (store, busy) = (self.store, shared.sending)
            if let due = try? await onDatabaseThread({ try store.nextNoticeDue(skippingPartners: busy) }) {
                nap = min(nap, max(0, due.millisecondsSinceEpoch - clock.now().millisecondsSinceEpoch))
            }
            let wait = max(nap, Limits.noticeIdleNapMillisecondsMin)
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(wait)) }
        }
    }

    /// What the lanes share: whether they make one pass (which attempts no notice twice), how
    /// many claims are left, the partners being sent to, whether a lane
    /// failed, whether anything was sent since the gauges were last recounted, and the
    /// partners' terms (read again at most every poll interval, outside the lock).
    private final class LaneState: Sendable {
        private struct State {
            var claimsLeft: Int
            var sending: Set<PartnerID> = []
            /// The notices this pass attempted whose outcome is not final (at most the pass's claims).
            var claimedIDs: Set<String> = []
            var stopped = false
            var sentSinceRecount = false
            var configuration: (ClearingConfiguration, ContinuousClock.Instant)?
        }
        /// A delivery pass (`notices send`), not `serve`'s continuous lanes.
        let isPass: Bool
        private let state: Mutex<State>

        init(isPass: Bool, claims: Int) {
            self.isPass = isPass
            state = Mutex(State(claimsLeft: claims))
        }

        /// Takes one claim of the budget; false once it is spent or a lane failed.
        func takeClaim() -> Bool {
            state.withLock { s in
                guard s.claimsLeft > 0, !s.stopped else { return false }
                s.claimsLeft -= 1
                return true
            }
        }

        func stop() { state.withLock { $0.stopped = true } }

        var sending: Set<PartnerID> { state.withLock { $0.sending } }

        /// Marks the partners of what a claim took. Claims run one at a time (the serial
        /// database queue), so no two lanes take the same partner.
        func claimed(_ notices: [ClaimedNotice]) { state.withLock { s in for n in notices { s.sending.insert(n.partner) } } }

        var claimedIDs: Set<String> { state.withLock { $0.claimedIDs } }

        /// Marks what was sent. In a pass, the notices whose outcome is not final (a retry, an
        /// interrupted attempt, an answer that could not be recorded) are kept out of the rest of
        /// the pass; delivered and dead ones cannot come due again, so the list stays short.
        /// (`serve`'s lanes keep no list: they run for months.)
        func sent(_ notices: [ClaimedNotice], final: Set<String>) {
            state.withLock { s in
                for n in notices {
                    s.sending.remove(n.partner)
                    if isPass && !final.contains(n.id) { s.claimedIDs.insert(n.id) }
                }
                s.sentSinceRecount = s.sentSinceRecount || !notices.isEmpty
            }
        }

        /// Whether anything was sent since the last call.
        func takeSent() -> Bool { state.withLock { s in defer { s.sentSinceRecount = false }; return s.sentSinceRecount } }

        func configuration(_ read: () -> ClearingConfiguration) -> ClearingConfiguration {
            let now = ContinuousClock.now
            if let (c, at) = state.withLock({ $0.configuration }), now - at < .milliseconds(Limits.noticePollIntervalMilliseconds) { return c }
            let c = read()
            state.withLock { $0.configuration = (c, now) }
            return c
        }
    }

    /// Claims one notice this lane may take, sends it and records the answer; false when there
    /// was none (or the budget is spent, or the sender is stopping).
    private func deliverOne(only: String?, _ shared: LaneState, into pass: inout DeliveryPass) async throws -> Bool {
        // Stopping (SIGTERM) or cancelled: no new claim; the notice just sent was recorded, and
        // what is still due waits in the outbox for the next start.
        guard !Task.isCancelled && !Task.isShuttingDownGracefully && shared.takeClaim() else { return false }
        let (store, clock, options, owner) = (self.store, self.clock, self.options, self.owner)
        let lease = Int64(options.connectTimeoutMilliseconds + options.totalTimeoutMilliseconds) + Limits.noticeLeaseSlackMilliseconds
        let claimed = try await onDatabaseThread { () throws -> [ClaimedNotice] in
            // A read first: a lane with nothing to take does not queue behind the posting writer.
            let sending = shared.sending
            // In a pass (`notices send`), the notices it already attempted and may see due again
            // (always none for `serve`'s lanes). Read here, beside `sending`.
            let claimedThisPass = shared.claimedIDs
            if only == nil, try !store.claimableNoticeExists(
                clock: clock, owner: owner, ownerAlive: NoticeDispatcher.processAlive, claimedThisPass: claimedThisPass,
                skippingPartners: sending, ownLeasesAreStale: true)
            {
                return []
            }
            // This process's own notices in flight are all of partners in `sending` (marked in
            // this same block, before their leases could be seen): a lease in its name on any
            // other notice is an earlier process's with the same pid.
            let claimed = try store.claimDueNotices(
                clock: clock, limit: 1, owner: owner, leaseMilliseconds: lease, ownerAlive: NoticeDispatcher.processAlive,
                only: only, claimedThisPass: claimedThisPass, skippingPartners: sending, ownLeasesAreStale: true)
            shared.claimed(claimed)
            return claimed
        }
        if claimed.isEmpty { return false }
        var final: Set<String> = []
        defer { shared.sent(claimed, final: final) }
        try await send(claimed, shared.configuration(currentConfiguration), into: &pass, final: &final)
        return true
    }

    /// `final`: the notices whose attempt was recorded as delivered or dead.
    private func send(
        _ claimed: [ClaimedNotice], _ configuration: ClearingConfiguration, into pass: inout DeliveryPass, final: inout Set<String>
    ) async throws {
        var requests: [OutboundRequest] = []
        var sendable: [ClaimedNotice] = []
        var unsendable: [(ClaimedNotice, OutboundResponse)] = []
        for notice in claimed {
            guard let terms = configuration.partners[notice.partner] else {
                // The partner left the configuration: the attempt fails and is retried on the
                // schedule (an operator can restore the partner or let it become a dead letter).
                // Recorded with the others, below, so one failure to record strands none of them.
                unsendable.append((notice, OutboundResponse(
                    result: .failure(TransportFailure(.invalidRequest, "partner \(notice.partner) is not in the configuration")),
                    latencyMilliseconds: 0)))
                continue
            }
            let timestamp = clock.now().millisecondsSinceEpoch / 1000
            let signature = WebhookSignature.sign(id: notice.id, timestamp: timestamp, body: notice.body, secret: terms.noticeSecret)
            requests.append(OutboundRequest(
                url: terms.noticeURL,
                headers: [
                    .init("Content-Type", "application/json"),
                    .init("User-Agent", "Clearhouse-Notices/1"),
                    .init("webhook-id", notice.id),
                    .init("webhook-timestamp", String(timestamp)),
                    .init("webhook-signature", signature),
                ],
                body: notice.body, caFile: terms.noticeCAFile, clientCertificateFile: configuration.coalition.noticeClientCertificateFile,
                clientKeyFile: configuration.coalition.noticeClientKeyFile, allowPrivateNetworks: configuration.coalition.noticeAllowPrivateNetworks,
                connectTimeoutMilliseconds: options.connectTimeoutMilliseconds, totalTimeoutMilliseconds: options.totalTimeoutMilliseconds,
                responseBytesMax: options.responseBytesMax))
            sendable.append(notice)
        }
        let responses = await transport.perform(requests)
        // Every answer is recorded, even if recording one of them fails (a busy database):
        // each gets a few tries, and the first error is thrown only after all were tried.
        var firstError: (any Error)?
        for (notice, response) in unsendable + Array(zip(sendable, responses)) {
            for attempt in 1...Limits.noticeRecordTriesMax {
                do {
                    if try await finish(notice, response, into: &pass) { final.insert(notice.id) }
                    break
                } catch {
                    if attempt == Limits.noticeRecordTriesMax {
                        logger.error("could not record a notice attempt", metadata: ["notice": "\(notice.id)", "error": "\(error)"])
                        firstError = firstError ?? error
                    } else {
                        try? await Task.sleep(for: .milliseconds(Limits.noticeRecordRetryStepMilliseconds * attempt))
                    }
                }
            }
        }
        if let firstError { throw firstError }
    }

    /// Records one attempt; true when the notice's outcome is final (delivered or dead).
    @discardableResult
    private func finish(_ notice: ClaimedNotice, _ response: OutboundResponse, into pass: inout DeliveryPass) async throws -> Bool {
        let finishedAt = clock.now()
        let failure: TransportFailure? = if case .failure(let f) = response.result { f } else { nil }
        let store = self.store
        if let failure, failure.kind == .cancelled {
            // This sender is stopping and cut the transfer short: no answer, and not the
            // partner's failure. Recorded as interrupted, given back to the round (unlike a
            // crash's), and due again at the next start.
            try await onDatabaseThread { try store.interruptNoticeAttempt(notice, reason: "the sender stopped before the answer came") }
            logger.notice("notice attempt interrupted by a stop; due again at the next start",
                          metadata: ["notice": "\(notice.id)", "partner": "\(notice.partner)", "attempt": "\(notice.attempt)"])
            return false
        }
        let decision = NoticeSchedule.decide(
            attempt: notice.roundAttempt, result: NoticeAttemptResult(status: response.status, retryAfterSeconds: response.retryAfterSeconds),
            finishedAt: finishedAt, jitterPPM: jitterPPM())
        try await onDatabaseThread {
            try store.finishNoticeAttempt(
                notice, finishedAt: finishedAt, latencyMilliseconds: response.latencyMilliseconds, httpStatus: response.status,
                error: failure?.description, decision: decision)
        }
        pass.attempted += 1
        let outcome: String
        var metadata: Logger.Metadata = [
            "notice": "\(notice.id)", "partner": "\(notice.partner)", "attempt": "\(notice.attempt)",
            "latency_ms": "\(response.latencyMilliseconds)",
        ]
        if let s = response.status { metadata["status"] = "\(s)" }
        if let f = failure { metadata["error"] = "\(f)" }
        switch decision {
        case .delivered:
            pass.delivered += 1
            outcome = "delivered"
            logger.info("notice delivered", metadata: metadata)
        case .retry(let at):
            pass.retrying += 1
            outcome = "retry"
            metadata["next_attempt_at"] = "\(at)"
            logger.warning("notice attempt failed; will retry", metadata: metadata)
        case .dead(let reason):
            pass.dead += 1
            outcome = "dead"
            metadata["reason"] = "\(reason)"
            logger.error("notice is a dead letter", metadata: metadata)
        }
        if let factory = metrics {
            Counter(label: "clearhouse_notice_attempts_total", dimensions: [("outcome", outcome)], factory: factory).increment()
            Timer(label: "clearhouse_notice_attempt_duration_seconds", dimensions: [], factory: factory)
                .recordMilliseconds(response.latencyMilliseconds)
        }
        if case .retry = decision { return false }
        return true
    }

    /// The outbox's SQLite work, off Swift's cooperative threads: a write may wait for the
    /// posting writer's batch (or another process's transaction, up to the busy timeout), and
    /// the HTTP handlers and every posting's answer run on those threads.
    private func onDatabaseThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            NoticeDispatcher.databaseQueue.async { continuation.resume(with: Result { try body() }) }
        }
    }

    private static let databaseQueue = DispatchQueue(label: "clearhouse-notices-db")

    private func publishCounts() async throws {
        guard let factory = metrics else { return }
        let store = self.store
        for (state, n) in try await onDatabaseThread({ try store.noticeCounts() }) {
            Gauge(label: "clearhouse_notices", dimensions: [("state", state.rawValue)], factory: factory).record(n)
        }
    }

    /// Whether the process holding a lease still runs (a dead one's leases are void).
    @Sendable static func processAlive(_ pid: Int32) -> Bool {
        if pid == getpid() { return true }
        return kill(pid, 0) == 0 || errno == EPERM
    }
}

/// The delivery worker as a service of `clearhouse serve`'s ServiceGroup.
public struct NoticeService: Service {
    let dispatcher: NoticeDispatcher

    public init(dispatcher: NoticeDispatcher) { self.dispatcher = dispatcher }

    public func run() async throws { await dispatcher.run() }
}
