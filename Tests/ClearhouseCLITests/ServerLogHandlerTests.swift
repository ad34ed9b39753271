@testable import ClearhouseCLI
import Logging
import Synchronization
import Testing

/// Collects the lines a handler writes.
final class LineSink: TextOutputStream, Sendable {
    private let text = Mutex("")
    func write(_ string: String) { text.withLock { $0 += string } }
    var lines: [String] { text.withLock { $0.split(separator: "\n").map(String.init) } }
}

struct ServerLogHandlerTests {
    /// The handler's lines are StreamLogHandler's, with the logger's metadata (set as
    /// Hummingbird sets a request id) and the line's own, the line's winning a shared key.
    @Test func linesCarryTheLoggersMetadataAndTheLinesOwn() {
        let sink = LineSink()
        var logger = Logger(label: "clearhouse") { ServerLogHandler(label: $0, stream: sink) }
        logger.logLevel = .info
        logger[metadataKey: "hb.request.id"] = "r1"
        logger[metadataKey: "partner"] = "fuelco"
        logger.info("request", metadata: ["status": "201", "partner": "freshmart"])
        logger.debug("not written")
        var quiet = logger
        quiet.logLevel = .warning
        quiet.info("not written either")
        quiet.warning("slow", metadata: ["ms": "30"])

        let lines = sink.lines
        #expect(lines.count == 2)
        let first = lines.first ?? ""
        #expect(first.contains(" info clearhouse: "))
        #expect(first.contains("hb.request.id=r1"))
        #expect(first.contains("status=201"))
        #expect(first.contains("partner=freshmart") && !first.contains("partner=fuelco"))
        #expect(first.hasSuffix("] request"))
        let second = lines.last ?? ""
        #expect(second.contains(" warning clearhouse: ") && second.contains("hb.request.id=r1") && second.contains("ms=30"))
        // The logger's metadata reads back as set.
        #expect(logger[metadataKey: "partner"] == "fuelco")
    }
}
