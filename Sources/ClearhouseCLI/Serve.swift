import ArgumentParser
import ClearingConfig
import ClearingDomain
import ClearingHTTP
import ClearingNotices
import ClearingStore
import Foundation
import Hummingbird
import NIOCore
import HummingbirdTLS
import Logging
import PartnerTransport
import ServiceLifecycle
import Synchronization

/// `clearhouse serve`: the HTTPS intake (CONTRACT §3, §4, §10).
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the partner API over HTTPS until SIGTERM or SIGINT.",
        discussion: "Needs server.crt and server.key in --certs (and ca.crt when a partner uses mutual TLS); ops/certs makes development ones. The Ed25519 key that signs statements is --certs/statement.key when present, else --data/statement.key, made on the first start. On SIGTERM it answers /readyz and new postings with 503 for one second, then stops accepting, finishes what it has accepted, closes the databases and exits 0.")

    @OptionGroup var locations: Locations
    @Option(help: "Address to listen on.") var host: String = "127.0.0.1"
    @Option(parsing: .unconditional, help: "Port to listen on (0: any free port; the chosen one is printed).") var port: Int = 8443
    @Option(help: "Directory with server.crt, server.key, ca.crt and statement.key.") var certs: String = "./certs"

    func validate() throws {
        guard (0...65_535).contains(port) else { throw ValidationError("--port must be 0...65535 (0: any free port)") }
    }

    func run() async throws {
        let configuration = try locations.loadConfiguration()
        let mutualTLS = configuration.partners.values.contains { $0.clientCertSHA256 != nil }
        let tls: NIOSSL.TLSConfiguration
        do {
            tls = try ServerTLS.configuration(directory: URL(fileURLWithPath: certs), mutualTLS: mutualTLS)
        } catch {
            printError("clearhouse serve: \(error)")
            throw ExitCode(2)
        }
        var logger = Logger(label: "clearhouse", factory: ServerLogHandler.init(label:))
        logger.logLevel = ProcessInfo.processInfo.environment["CLEARHOUSE_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        for w in configuration.warnings { logger.warning("configuration: \(w)") }
        // The TLS key readable by others: said, not refused (keys made by hand with openssl
        // often are; the statement key, made by us, must be owner-only).
        let serverKey = URL(fileURLWithPath: certs).appendingPathComponent("server.key").path
        if let mode = FileSync.modeOpenToOthers(serverKey) {
            logger.warning("the server's TLS key can be read by others; chmod 600 it", metadata: ["file": "\(serverKey)", "mode": "\(String(mode, radix: 8))"])
        }
        // A directory holding an interrupted restore is refused before anything is written
        // into it, a statement key included.
        try locations.refuseInterruptedRestore()
        // The statement key: `<certs>/statement.key` when the operator put one there; otherwise
        // `<data>/statement.key`, made on the first start and kept (CONTRACT §10 asks only for
        // the TLS pair in --certs).
        var signer: StatementSigner
        do {
            let operatorKey = URL(fileURLWithPath: certs).appendingPathComponent("statement.key")
            if FileManager.default.fileExists(atPath: operatorKey.path) {
                signer = try StatementSigner(file: operatorKey)
            } else {
                try FileManager.default.createDirectory(at: locations.dataURL, withIntermediateDirectories: true)
                let dataKey = locations.dataURL.appendingPathComponent("statement.key")
                let made: Bool
                (signer, made) = try StatementSigner.loadOrCreate(file: dataKey)
                logger.warning(
                    made ? "no statement.key in the certificate directory: made a new statement key" : "no statement.key in the certificate directory: using the data directory's",
                    metadata: ["file": "\(dataKey.path)", "keyid": "\(signer.keyID)"])
            }
            try signer.loadRetired(file: URL(fileURLWithPath: certs).appendingPathComponent("statement-retired.pub"))
        } catch {
            printError("clearhouse serve: statement key: \(error)")
            throw ExitCode(2)
        }
        var storeLogger = Logger(label: "clearhouse.store", factory: ServerLogHandler.init(label:))
        storeLogger.logLevel = logger.logLevel
        let store = try locations.openStore(configuration, creating: true, logger: storeLogger)
        let metrics = IntakeMetrics()
        let writer = PostingWriter(store: store, batchObserver: { metrics.groupCommit(postings: $0) })
        let intake = Intake(configuration: configuration, store: store, writer: writer, metrics: metrics, signer: signer)
        let app = Application(
            router: intake.router(),
            server: try .tls(ServerChannel.http1(logger: logger), tlsConfiguration: tls),
            configuration: .init(
                address: .hostname(host, port: port), serverName: nil,
                // Past this many open connections the server stops accepting (they wait in the
                // listen backlog): memory and the latency of accepted requests stay bounded
                // however many clients connect.
                availableConnectionsDelegate: .maximum(Limits.connectionsMax, logger: logger)),
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? 0
                // Written straight to the file descriptor, unbuffered, so a parent waiting for
                // it (ops/demo, tests) sees it at once.
                // A standard output that cannot take it (a full disk) costs the line, not the
                // server (the line is also in the log).
                let line = "clearhouse: listening on https://\(host):\(port)\n"
                if (try? FileHandle.standardOutput.write(contentsOf: Data(line.utf8))) == nil {
                    _ = try? FileHandle.standardError.write(contentsOf: Data("clearhouse: standard output could not be written; \(line)".utf8))
                }
            },
            logger: logger)
        // Settlement notices: delivered from the outbox while the server runs (settle, in
        // another process, adds to it; the worker polls).
        var noticeLogger = logger
        noticeLogger[metadataKey: "component"] = "notices"
        let partnersDirectory = locations.partnersURL
        let reloadLogger = noticeLogger
        let lastGood = Mutex(configuration)
        let notices = NoticeService(dispatcher: NoticeDispatcher(
            store: store, transport: CurlTransport(), logger: noticeLogger, metrics: metrics.factory,
            configuration: {
                // The partners' current notice_url, CA and secret; while the files do not load,
                // the last terms that did (and it says so): a notice secret rotated since the
                // start is not undone by a mistake in another file.
                do {
                    let loaded = try ConfigurationLoader(directory: partnersDirectory).load()
                    lastGood.withLock { $0 = loaded }
                    return loaded
                } catch {
                    reloadLogger.error("partners/ does not load; notices use the last terms that did", metadata: ["error": "\(error)"])
                    return lastGood.withLock { $0 }
                }
            }))
        // The group stops its services last first: on SIGTERM the drain first (readiness 503,
        // new postings 503, still listening), then the intake stops taking requests, before the
        // notice worker finishes its batch.
        var groupConfiguration = ServiceGroupConfiguration(
            services: [notices, app, StopDrain(intake: intake, logger: logger)], gracefulShutdownSignals: [.sigterm, .sigint],
            cancellationSignals: [], logger: logger)
        // The drain and the in-flight requests get this long together; then they are
        // cancelled. Anything the writer already took is still decided and committed below.
        groupConfiguration.maximumGracefulShutdownDuration = .seconds(Limits.shutdownGraceSecondsMax)
        let group = ServiceGroup(configuration: groupConfiguration)
        do {
            try await group.run()
        } catch {
            // Most often the address (in use, or not this machine's): finish what the writer
            // holds, close the databases, and say it in one line.
            writer.shutdown()
            try? store.close()
            if let io = error as? IOError {
                printError("clearhouse serve: cannot listen on \(host):\(port): \(String(cString: strerror(io.errnoCode)))")
            } else {
                printError("clearhouse serve: \(error)")
            }
            throw ExitCode(2)
        }
        // The server has drained its in-flight requests; finish anything still queued, then
        // close the databases cleanly (checkpointed).
        writer.shutdown()
        try store.close()
        // On standard error: a standard output gone (a closed pipe) must not turn a clean
        // stop into exit 1 (`Entry` checks what the verb printed there).
        printError("clearhouse: stopped")
    }
}

/// The first step of a graceful stop: `/readyz` turns 503 and new postings get 503 with
/// `retry-after` for `Limits.shutdownDrainMilliseconds` while the server still listens; then the
/// group stops the intake (listener closed, in-flight requests finished).
struct StopDrain: Service {
    let intake: Intake
    let logger: Logger

    func run() async throws {
        // Cancelled rather than stopped (the server failed to start, a service failed): no
        // drain to make.
        do { try await gracefulShutdown() } catch { return }
        intake.beginStopping()
        logger.notice("stopping: readiness 503, new postings refused", metadata: ["drain_ms": "\(Limits.shutdownDrainMilliseconds)"])
        try? await Task.sleep(for: .milliseconds(Limits.shutdownDrainMilliseconds))
    }
}
