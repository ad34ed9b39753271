import Logging

/// `serve`'s log handler: StreamLogHandler's lines on standard error, with the logger's own
/// metadata kept as set and formatted only when a line is written.
///
/// Why: Hummingbird sets a request id on each request's logger (`hb.request.id`), and
/// StreamLogHandler formats all of its metadata again at every set, so every request paid for
/// formatting that, at `warning` (the level under load), no line ever used.
struct ServerLogHandler: LogHandler {
    /// Holds no metadata of its own: this handler's is passed to it with each line.
    private var stream: StreamLogHandler
    var metadata: Logger.Metadata = [:]

    init(label: String) {
        stream = StreamLogHandler.standardError(label: label)
    }

    /// Lines to `stream` instead (tests).
    init(label: String, stream: any TextOutputStream & Sendable) {
        self.stream = StreamLogHandler(label: label, stream: stream, metadataProvider: nil)
    }

    var logLevel: Logger.Level {
        get { stream.logLevel }
        set { stream.logLevel = newValue }
    }

    var metadataProvider: Logger.MetadataProvider? {
        get { stream.metadataProvider }
        set { stream.metadataProvider = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var event = event
        // The line's own metadata wins over the logger's, as in StreamLogHandler.
        event.metadata = metadata.merging(event.metadata ?? [:]) { _, line in line }
        stream.log(event: event)
    }
}
