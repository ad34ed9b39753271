import ClearingDomain
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The single writer with group commit. Callers from any task enqueue a submission and
/// suspend; one dedicated thread (the decider) takes everything queued (up to
/// `postingBatchMax`), decides it and commits it to the journal as one batch (one fsync);
/// a second thread (the ledger stage) then appends the batch to each touched partner ledger
/// (one fsync each) and only then resumes each caller with its outcome. The two run at once
/// on consecutive batches: while batch n is written to the ledgers, batch n+1 is decided,
/// and at most one decided batch waits for the ledger stage. While a batch is on disk, the
/// next one gathers, so the number of fsyncs per posting falls as load rises.
///
/// The queue is bounded in count (`postingQueueMax`) and in time: while its oldest posting
/// has waited longer than `postingQueueWaitMillisecondsMax`, the writer is behind and new
/// postings are shed. When full, behind, or once shutdown began, callers get `unavailable`
/// (503 with `retry-after`) at once. `shutdown()` finishes everything already queued.
public final class PostingWriter: @unchecked Sendable {
    // @unchecked: `queue`, `queuedAt`, `shed` and `closing` are only touched under `condition`
    // (the decider waits on it); `decided`, `deciderDone` and `finished` under `stage` (the
    // ledger stage and `shutdown` wait on it). Two conditions, so that queuing a posting
    // wakes the decider only.
    private let store: Store
    /// Monotonic, both: the group-commit gather's timed wait and the ledger stage's idle wait
    /// must not stretch (or end at once, again and again) when the wall clock steps
    /// (``MonotonicCondition``).
    private let condition = MonotonicCondition()
    private let stage = MonotonicCondition()
    private var queue: [(Submission, @Sendable (PostingOutcome) -> Void)] = []
    /// When each queued posting was queued (parallel to `queue`).
    private var queuedAt: [ContinuousClock.Instant] = []
    private var shed = 0
    private var closing = false
    private var finished = false
    /// A decided batch waiting for the ledger stage (at most one), and whether the decider
    /// has ended (so the ledger stage ends once this is empty).
    private var decided: [(DecidedBatch, [@Sendable (PostingOutcome) -> Void])] = []
    private var deciderDone = false
    private let batchSizes = BatchSizeStats()
    /// CPU time each of the two threads used, recorded as it ends (for benchmarks).
    private var deciderCPU: Duration = .zero
    private var ledgerStageCPU: Duration = .zero

    /// Called on the writer's thread with the size of each committed batch (for metrics).
    private let batchObserver: (@Sendable (Int) -> Void)?

    /// Most postings that may wait; past this, callers get `unavailable` at once.
    private let queueMax: Int
    /// Longest the oldest waiting posting may have waited before new ones are shed; nil for
    /// a local loader that bounds its own postings in flight (`simulate`, benchmarks).
    private let waitMax: Duration?
    /// The group-commit delay (`Limits.postingBatchGatherMicrosecondsMax`; tests lengthen it).
    private let gatherMax: Duration
    /// How long the ledger stage is idle before it looks for ledgers behind the journal
    /// (`Limits.ledgerCatchUpIdleSecondsMax`; tests shorten it).
    private let catchUpIdle: Duration
    /// Batches for which the decider waited to gather more postings.
    private var gathered = 0

    public init(
        store: Store, queueMax: Int = Limits.postingQueueMax,
        waitMax: Duration? = .milliseconds(Limits.postingQueueWaitMillisecondsMax),
        gatherMax: Duration = .microseconds(Limits.postingBatchGatherMicrosecondsMax),
        catchUpIdle: Duration = .seconds(Limits.ledgerCatchUpIdleSecondsMax),
        batchObserver: (@Sendable (Int) -> Void)? = nil
    ) {
        precondition(queueMax >= 1 && queueMax <= Limits.postingQueueMax)
        precondition(waitMax.map { $0 > .zero && $0 <= .milliseconds(Limits.postingQueueWaitMillisecondsMax) } ?? true)
        self.queueMax = queueMax
        self.waitMax = waitMax
        self.gatherMax = gatherMax
        self.catchUpIdle = catchUpIdle
        self.store = store
        self.batchObserver = batchObserver
        // Named as `top -H`, `ps -L` and `perf` show them: Linux keeps at most 15 bytes of a
        // thread's name and refuses a longer one (the thread then keeps the process's name).
        // (Foundation's `Thread.name`, set before `start`, does not reach the kernel here.)
        PostingWriter.startThread(named: PostingWriter.deciderThreadName) { [self] in self.runDecider() }
        PostingWriter.startThread(named: PostingWriter.ledgerThreadName) { [self] in self.runLedgerStage() }
    }

    static let deciderThreadName = "ch-decider"
    static let ledgerThreadName = "ch-ledgers"

    private static func startThread(named name: String, _ body: @escaping @Sendable () -> Void) {
        Thread {
            nameThisThread(name)
            body()
        }.start()
    }

    private static func nameThisThread(_ name: String) {
        precondition(name.utf8.count <= 15, "a thread name Linux keeps has at most 15 bytes")
        #if canImport(Glibc)
        // pthread_setname_np is not imported without _GNU_SOURCE; the kernel's own file for it:
        let fd = open("/proc/thread-self/comm", O_WRONLY)
        guard fd >= 0 else { return }  // no /proc: the thread stays unnamed, nothing else changes
        _ = name.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        #endif
    }

    /// Posts one event; returns once its outcome is durable (or refused).
    public func post(_ submission: Submission) async -> PostingOutcome {
        await withCheckedContinuation { continuation in
            enqueue(submission) { continuation.resume(returning: $0) }
        }
    }

    /// Queues one event and calls `completion` with its outcome once durable (or refused),
    /// on the writer's thread. Postings queued by one thread are decided in the order queued.
    public func enqueue(_ submission: Submission, completion: @escaping @Sendable (PostingOutcome) -> Void) {
        condition.lock()
        if closing {
            condition.unlock()
            completion(.rejected(Problem(.unavailable, "shutting down", retryAfterSeconds: Limits.storageRetryAfterSeconds)))
            return
        }
        if queue.count >= queueMax {
            shed += 1
            condition.unlock()
            completion(.rejected(Problem(.unavailable, "the writer's queue is full", retryAfterSeconds: Limits.overloadRetryAfterSeconds)))
            return
        }
        let now = ContinuousClock.now
        if let waitMax, let oldest = queuedAt.first, now - oldest > waitMax {
            shed += 1
            condition.unlock()
            completion(.rejected(Problem(.unavailable, "the writer is behind; retry later", retryAfterSeconds: Limits.overloadRetryAfterSeconds)))
            return
        }
        queue.append((submission, completion))
        queuedAt.append(now)
        condition.signal()
        condition.unlock()
    }

    /// False once shutdown began.
    public var isAccepting: Bool {
        condition.lock()
        defer { condition.unlock() }
        return !closing
    }

    /// Postings waiting for the writer right now.
    public var queueDepth: Int {
        condition.lock()
        defer { condition.unlock() }
        return queue.count
    }

    /// Postings refused because the queue was full or the writer behind, since start.
    public var shedCount: Int {
        condition.lock()
        defer { condition.unlock() }
        return shed
    }

    /// Batches for which the writer waited up to the group-commit delay for more postings.
    public var gatheredBatches: Int {
        condition.lock()
        defer { condition.unlock() }
        return gathered
    }

    /// How many batches were committed and how many postings they held.
    public var batchStatistics: (batches: Int, postings: Int, largest: Int) { batchSizes.snapshot() }

    /// CPU time (user and system) the decider and the ledger stage used over their lives, each
    /// recorded as its thread ends (zero before): final once `shutdown()` returned. For
    /// benchmarks: the decider holds the writer's rate.
    public var threadCPUTimes: (decider: Duration, ledgerStage: Duration) {
        stage.lock()
        defer { stage.unlock() }
        return (deciderCPU, ledgerStageCPU)
    }

    /// This thread's CPU time so far.
    private static func threadCPU() -> Duration {
        var t = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0 else { return .zero }
        return .seconds(t.tv_sec) + .nanoseconds(t.tv_nsec)
    }

    /// Stops taking new postings, finishes every queued one, and returns when the writer
    /// thread has ended.
    public func shutdown() {
        condition.lock()
        closing = true
        condition.broadcast()
        condition.unlock()
        stage.lock()
        while !finished { stage.wait() }
        stage.unlock()
    }

    /// The decider: takes queued postings, decides and commits them to the journal, and
    /// hands the batch to the ledger stage (waiting while one batch already waits there).
    private func runDecider() {
        var previous = 0
        while true {
            condition.lock()
            if queue.isEmpty && !closing {
                // Idle for longer than the delay: no load, so the next posting is not held back.
                let idleFrom = ContinuousClock.now
                while queue.isEmpty && !closing { condition.wait() }
                if ContinuousClock.now - idleFrom > gatherMax { previous = 0 }
            }
            if previous >= Limits.postingBatchGatherFrom && !closing && queue.count < Limits.postingBatchGatherTo {
                // Under load: gather a little longer, so that one commit serves more postings.
                gathered += 1
                let until = MonotonicCondition.deadline(after: gatherMax)
                while queue.count < Limits.postingBatchGatherTo && !closing && condition.wait(until: until) {}
            }
            if queue.isEmpty && closing {
                condition.unlock()
                let cpu = PostingWriter.threadCPU()
                stage.lock()
                deciderCPU = cpu
                deciderDone = true
                stage.broadcast()
                stage.unlock()
                return
            }
            let n = min(queue.count, Limits.postingBatchMax)
            let batch = Array(queue.prefix(n))
            queue.removeFirst(n)
            queuedAt.removeFirst(n)
            condition.unlock()

            previous = batch.count
            let result = store.decide(batch.map(\.0))
            batchSizes.record(batch.count)
            batchObserver?(batch.count)

            stage.lock()
            while !decided.isEmpty { stage.wait() }
            decided.append((result, batch.map(\.1)))
            stage.broadcast()
            stage.unlock()
        }
    }

    /// The ledger stage: writes each decided batch to the partners' ledgers, in the order
    /// decided, then answers its callers. Idle for `catchUpIdle`, it copies into the ledgers
    /// what another process decided and did not copy (`Store.catchUpLedgersBehind`); a batch
    /// decided meanwhile waits for that, and skips the entries it finds already there.
    private func runLedgerStage() {
        while true {
            stage.lock()
            while decided.isEmpty && !deciderDone {
                if !stage.wait(until: MonotonicCondition.deadline(after: catchUpIdle)), decided.isEmpty && !deciderDone {
                    stage.unlock()
                    store.catchUpLedgersBehind()
                    stage.lock()
                }
            }
            if decided.isEmpty && deciderDone {
                ledgerStageCPU = PostingWriter.threadCPU()
                finished = true
                stage.broadcast()
                stage.unlock()
                return
            }
            let (batch, completions) = decided.removeFirst()
            stage.broadcast()
            stage.unlock()

            let outcomes = store.completeInLedgers(batch)
            for (completion, outcome) in zip(completions, outcomes) { completion(outcome) }
        }
    }
}

final class BatchSizeStats: @unchecked Sendable {
    private let lock = NSLock()
    private var batches = 0
    private var postings = 0
    private var largest = 0

    func record(_ n: Int) {
        lock.lock()
        batches += 1
        postings += n
        largest = max(largest, n)
        lock.unlock()
    }

    func snapshot() -> (batches: Int, postings: Int, largest: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (batches, postings, largest)
    }
}
