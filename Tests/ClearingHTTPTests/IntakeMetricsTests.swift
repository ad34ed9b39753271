@testable import ClearingHTTP
import ClearingDomain
import Testing

struct IntakeMetricsTests {
    /// The handles are made once and kept: every request and posting after the first of its
    /// kind still counts, into the same series, and kinds stay apart.
    @Test func keptHandlesKeepCounting() {
        let metrics = IntakeMetrics()
        for _ in 0..<3 { metrics.request(route: "/v1/partners/{partner}/events", status: 201, nanoseconds: 1_000_000) }
        metrics.request(route: "/v1/partners/{partner}/events", status: 409, nanoseconds: 2_000_000)
        metrics.request(route: "/healthz", status: 200, nanoseconds: 10_000)
        metrics.posting(.rejected(Problem(.conflict, "x")))
        metrics.posting(.rejected(Problem(.conflict, "y")))
        metrics.posting(.rejected(Problem(.insufficientPoints, "z")))
        metrics.queueDepth(7)
        metrics.queueDepth(3)
        metrics.groupCommit(postings: 5)
        metrics.groupCommit(postings: 9)
        let text = String(decoding: metrics.render(), as: UTF8.self)
        #expect(text.contains(#"clearhouse_http_requests_total{route="/v1/partners/{partner}/events",status="201"} 3"#), "\(text)")
        #expect(text.contains(#"clearhouse_http_requests_total{route="/v1/partners/{partner}/events",status="409"} 1"#))
        #expect(text.contains(#"clearhouse_http_requests_total{route="/healthz",status="200"} 1"#))
        #expect(text.contains(#"clearhouse_http_request_duration_seconds_count{route="/v1/partners/{partner}/events",class="2xx"} 3"#), "\(text)")
        #expect(text.contains(#"clearhouse_http_request_duration_seconds_count{route="/v1/partners/{partner}/events",class="4xx"} 1"#))
        #expect(text.contains(#"clearhouse_postings_total{outcome="conflict"} 2"#))
        #expect(text.contains(#"clearhouse_postings_total{outcome="insufficient-points"} 1"#))
        #expect(text.contains("clearhouse_writer_queue_depth 3"))
        #expect(text.contains("clearhouse_group_commit_postings_count 2"))
    }
}
