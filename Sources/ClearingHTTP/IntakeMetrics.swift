import ClearingDomain
import CoreMetrics
import Metrics
import Prometheus
import Synchronization

/// The intake's metrics (swift-metrics, exported in the Prometheus text format by
/// swift-prometheus at `/metrics`). A registry of its own, passed in, so that tests and
/// several servers in one process never share global state.
public final class IntakeMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    public let factory: PrometheusMetricsFactory

    /// The handles each request and posting would otherwise make anew through the factory (a
    /// registry look-up under its lock, and the dimensions' arrays), kept once made. Bounded:
    /// routes are the router's templates (or `unmatched`), statuses and outcomes few.
    private struct RequestKey: Hashable, Sendable { var route: String; var status: Int }
    private let requestHandles = Mutex<[RequestKey: (CoreMetrics.Counter, CoreMetrics.Timer)]>([:])
    private let postingCounters = Mutex<[String: CoreMetrics.Counter]>([:])
    private let groupCommitRecorder: CoreMetrics.Recorder
    private let queueDepthGauge: CoreMetrics.Gauge

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        var f = PrometheusMetricsFactory(registry: registry)
        f.defaultDurationHistogramBuckets = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
        ]
        f.defaultValueHistogramBuckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
        factory = f
        groupCommitRecorder = CoreMetrics.Recorder(label: "clearhouse_group_commit_postings", dimensions: [], aggregate: true, factory: f)
        queueDepthGauge = CoreMetrics.Gauge(label: "clearhouse_writer_queue_depth", dimensions: [], factory: f)
    }

    /// One request: by route template and status; its latency by route and status class
    /// (`2xx`, `4xx`, `5xx`), so that the latency of accepted postings is seen apart from
    /// the fast refusals of an overload.
    func request(route: String, status: Int, nanoseconds: Int64) {
        let (counter, timer) = IntakeMetrics.kept(requestHandles, RequestKey(route: route, status: status)) {
            (CoreMetrics.Counter(label: "clearhouse_http_requests_total", dimensions: [("route", route), ("status", String(status))], factory: factory),
             CoreMetrics.Timer(label: "clearhouse_http_request_duration_seconds", dimensions: [("route", route), ("class", "\(status / 100)xx")], factory: factory))
        }
        counter.increment()
        timer.recordNanoseconds(nanoseconds)
    }

    /// One posting decided: `created`, `replayed` or the problem's slug.
    func posting(_ outcome: PostingOutcome) {
        let label: String
        switch outcome {
        case .created: label = "created"
        case .replayed: label = "replayed"
        case .rejected(let p): label = p.kind.rawValue
        }
        IntakeMetrics.kept(postingCounters, label) {
            CoreMetrics.Counter(label: "clearhouse_postings_total", dimensions: [("outcome", label)], factory: factory)
        }.increment()
    }

    /// The handle kept under `key`, made (once) by `make` if there is none yet.
    private static func kept<Key: Hashable & Sendable, Handle: Sendable>(_ handles: borrowing Mutex<[Key: Handle]>, _ key: Key, _ make: () -> Handle) -> Handle {
        handles.withLock { kept in
            if let made = kept[key] { return made }
            let made = make()
            kept[key] = made
            return made
        }
    }

    /// The size of one group commit (postings per journal transaction).
    public func groupCommit(postings: Int) {
        groupCommitRecorder.record(postings)
    }

    func queueDepth(_ n: Int) {
        queueDepthGauge.record(n)
    }

    /// The Prometheus text exposition.
    func render() -> [UInt8] { registry.emitToBuffer() }
}
