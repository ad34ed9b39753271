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

    /// One pass: every notice due when it starts, each sent at most once, `inFlightMax` at a
    /// time, one at a time per partner. `only` limits the pass to one notice (the operator's
    /// `notices retry`).
    ///
    /// `inFlightMax` lanes each claim one notice, send it, record its answer and claim the
    /// next. A lane never takes a partner another lane is sending to, so a slow or silent
    /// partner (even with a backlog) holds up one lane, up to the transfer's timeout, never the
    /// other partners' notices; and each answer is recorded when it comes.
    @discardableResult
    public func deliverDue(only: String? = nil) async throws -> DeliveryPass {
        var pass = DeliveryPass()
        // A read first: an idle worker never queues behind the posting writer.
        let (store, start) = (self.store, clock.now())
        if try await onDatabaseThread({ try store.noticeDue(at: start) }) {
            let shared = PassState(start: start)
            // A lane that fails (an answer that could not be recorded) stops the pass: no lane
            // claims another notice, those in flight finish (a thrown error would cancel their
            // transfers), and the pass then throws the first failure.
            let (total, failure) = await withTaskGroup(of: (DeliveryPass, (any Error)?).self) { group in
                for _ in 0..<max(1, options.inFlightMax) {
                    group.addTask { await self.lane(only: only, shared) }
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
        // Counts change when this process sends, or when another one does (`notices retry`):
        // recounted after sending, and at least every `noticeGaugeRefreshMilliseconds`.
        let after = clock.now().millisecondsSinceEpoch
        if pass.attempted > 0 || after - countsPublishedAt.load(ordering: .relaxed) >= Limits.noticeGaugeRefreshMilliseconds {
            try await publishCounts()
            countsPublishedAt.store(after, ordering: .relaxed)
        }
        return pass
    }

    /// What the lanes of one pass share: when it started (it claims what was due then), how
    /// many claims are left, the partners being sent to, whether a lane failed, and the
    /// partners' terms, read once per pass, when the first notice is claimed.
    private final class PassState: Sendable {
        private struct State {
            var claimsLeft = Limits.noticeClaimsPerPassMax
            var sending: Set<PartnerID> = []
            var stopped = false
            var configuration: ClearingConfiguration?
        }
        let start: Instant
        private let state = Mutex(State())

        init(start: Instant) { self.start = start }

        /// Takes one claim of the pass's budget; false once it is spent or the pass stopped.
        func takeClaim() -> Bool {
            state.withLock { s in
                guard s.claimsLeft > 0, !s.stopped else { return false }
                s.claimsLeft -= 1
                return true
            }
        }

        func stop() { state.withLock { $0.stopped = true } }

        /// Runs `claim` with the partners being sent to, and marks those it claimed. Callers
        /// run one claim at a time (the serial database queue), so no two claim the same
        /// partner; the lock is not held during the claim (a database write that may wait).
        func claiming(_ claim: (Set<PartnerID>) throws -> [ClaimedNotice]) rethrows -> [ClaimedNotice] {
            let sending = state.withLock { $0.sending }
            let claimed = try claim(sending)
            state.withLock { s in for n in claimed { s.sending.insert(n.partner) } }
            return claimed
        }

        func sent(_ notices: [ClaimedNotice]) { state.withLock { s in for n in notices { s.sending.remove(n.partner) } } }

        func configuration(_ read: () -> ClearingConfiguration) -> ClearingConfiguration {
            state.withLock { s in
                if let c = s.configuration { return c }
                let c = read()
                s.configuration = c
                return c
            }
        }
    }

    /// One lane of a pass: claims a notice, sends it, records the answer; again until nothing
    /// this pass may take is left.
    private func lane(only: String?, _ shared: PassState) async -> (DeliveryPass, (any Error)?) {
        var pass = DeliveryPass()
        do {
            try await laneLoop(only: only, shared, &pass)
            return (pass, nil)
        } catch {
            shared.stop()
            return (pass, error)
        }
    }

    private func laneLoop(only: String?, _ shared: PassState, _ pass: inout DeliveryPass) async throws {
        let (store, clock, options, owner) = (self.store, self.clock, self.options, self.owner)
        let lease = Int64(options.connectTimeoutMilliseconds + options.totalTimeoutMilliseconds) + Limits.noticeLeaseSlackMilliseconds
        // Stopping (SIGTERM) or cancelled: no new claim; the notice just sent was recorded, and
        // what is still due waits in the outbox for the next start.
        while !Task.isCancelled && !Task.isShuttingDownGracefully && shared.takeClaim() {
            // On the serial database queue, so that no two lanes claim for the same partner.
            let claimed = try await onDatabaseThread {
                try shared.claiming { sending in
                    try store.claimDueNotices(
                        clock: clock, limit: 1, owner: owner, leaseMilliseconds: lease, ownerAlive: NoticeDispatcher.processAlive,
                        only: only, dueThrough: shared.start, skippingPartners: sending)
                }
            }
            guard !claimed.isEmpty else { break }
            defer { shared.sent(claimed) }
            try await send(claimed, shared.configuration(currentConfiguration), into: &pass)
        }
    }

    /// Delivers until the task is cancelled or a graceful shutdown begins: a pass, then a nap
    /// until the next notice is due (at most the poll interval, since `settle` runs in other
    /// processes and adds notices to the outbox).
    public func run() async {
        logger.info("notice delivery started", metadata: ["transport": "\(CurlTransport.version)"])
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            var attempted = 0
            do {
                attempted = try await deliverDue().attempted
            } catch {
                logger.error("notice delivery pass failed", metadata: ["error": "\(error)"])
            }
            var nap = options.pollIntervalMilliseconds
            let store = self.store
            if let due = try? await onDatabaseThread({ try store.nextNoticeDue() }) {
                nap = min(nap, max(0, due.millisecondsSinceEpoch - clock.now().millisecondsSinceEpoch))
            }
            // A pass that sent nothing never loops at once (e.g. a notice due but leased by
            // another process whose lease has not run out).
            if attempted == 0 { nap = max(nap, Limits.noticeIdleNapMillisecondsMin) }
            if nap > 0 {
                let wait = nap
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(wait)) }
            }
        }
        logger.info("notice delivery stopped")
    }

    private func send(_ claimed: [ClaimedNotice], _ configuration: ClearingConfiguration, into pass: inout DeliveryPass) async throws {
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
                    try await finish(notice, response, into: &pass)
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

    private func finish(_ notice: ClaimedNotice, _ response: OutboundResponse, into pass: inout DeliveryPass) async throws {
        let finishedAt = clock.now()
        let failure: TransportFailure? = if case .failure(let f) = response.result { f } else { nil }
        let decision = NoticeSchedule.decide(
            attempt: notice.roundAttempt, result: NoticeAttemptResult(status: response.status, retryAfterSeconds: response.retryAfterSeconds),
            finishedAt: finishedAt, jitterPPM: jitterPPM())
        let store = self.store
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
