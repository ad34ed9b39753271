import ClearingDomain
import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOSSL
import NIOTLS
import Synchronization

/// The HTTP/1.1 channel `serve` runs: slow and idle clients cannot hold connections.
///
/// - A connection with no request in progress for `connectionIdleSecondsMax` is closed
///   (Hummingbird's idle timeout). It also closes a connection that never finishes its TLS
///   handshake or its request head (slowloris on the head: no part is decoded, so the timer
///   is never pushed back).
/// - A request whose body is not complete `requestReadSecondsMax` after its head arrived is
///   cut off and its connection closed ( ``RequestDeadlineHandler``): a client trickling its
///   body a byte at a time cannot keep pushing the idle timer back. Nothing is written for
///   it: a posting is decided only after its whole body was read.
/// - A connection that stays unwritable (the client does not read what it is sent) for
///   `responseStallSecondsMax` is closed: the idle timer is off while a response is pending,
///   so without this a client pipelining requests and never reading the answers would keep
///   its connection slot (`connectionsMax`) for ever. A slow but reading client (a large
///   statement over a slow link) keeps the connection writable now and then, and is kept.
/// - A connection open for `connectionAgeSecondsMax` is closed after its current response,
///   which says `connection: close`: a client sending a cheap request just inside the idle
///   timeout would otherwise keep its connection slot for ever.
/// - The decoder refuses heads larger than `requestHeaderDecodeBytesMax` before they are
///   built; `HeaderLimitMiddleware` then answers the smaller limit with a problem.
/// - A connection from an address that already holds `connectionsPerAddressMax` open
///   connections is closed at once, before its TLS handshake (``AddressLimitHandler``).
/// - An HTTP/1.0 request, or one saying `connection: close` in any letter case, has its
///   connection closed after its response, which says so (``HTTP1ConnectionHandler``).
public enum ServerChannel {
    public static func http1(logger: Logger) -> HTTPServerBuilder {
        .http1(configuration: configuration(AddressConnections(limit: Limits.connectionsPerAddressMax), TLSFailures(), logger: logger))
    }

    static func configuration(_ addresses: AddressConnections, _ failures: TLSFailures, logger: Logger) -> HTTP1Channel.Configuration {
        HTTP1Channel.Configuration(
            additionalChannelHandlers: [
                AddressLimitHandler(addresses, logger: logger), TLSHandshakeFailureHandler(failures, logger: logger), RequestDeadlineHandler(),
                HTTP1ConnectionHandler.Installer(),
            ],
            idleTimeout: .seconds(Limits.connectionIdleSecondsMax),
            httpDecoderConfiguration: .init(
                maxHeaderFieldSize: Limits.requestHeaderDecodeBytesMax, maxHeaderListSize: Limits.requestHeaderDecodeBytesMax,
                maxHeaderFieldCount: Limits.requestHeaderFieldsMax))
    }
}

/// The connections open from each client address, shared by all the channels of one server.
final class AddressConnections: Sendable {
    let limit: Int
    private let open = Mutex<[String: Int]>([:])
    private let refusals = Atomic<Int>(0)

    init(limit: Int) { self.limit = limit }

    /// Counts one refused connection; how many so far.
    func refused() -> Int { refusals.add(1, ordering: .relaxed).newValue }

    /// Counts one more connection from `address`; false (and nothing counted) when it already
    /// holds `limit`.
    func acquire(_ address: String) -> Bool {
        open.withLock { open in
            let n = open[address, default: 0]
            guard n < limit else { return false }
            open[address] = n + 1
            return true
        }
    }

    func release(_ address: String) {
        open.withLock { open in
            let n = open[address, default: 0] - 1
            open[address] = n > 0 ? n : nil
        }
    }

    /// Connections counted from `address` now (for tests).
    func count(_ address: String) -> Int { open.withLock { $0[address, default: 0] } }
}

/// TLS handshakes that failed, counted across the server's connections.
final class TLSFailures: Sendable {
    private let count = Atomic<Int>(0)
    /// Counts one; how many so far.
    func add() -> Int { count.add(1, ordering: .relaxed).newValue }
    var total: Int { count.load(ordering: .relaxed) }
}

/// Says when a connection's TLS handshake fails (a client certificate from another CA, an
/// old protocol, no shared cipher): the client only sees an alert, and without this the
/// operator would see nothing while onboarding a partner to mutual TLS. The first failure and
/// then one in a hundred are logged (a scanner must not flood the log), with the client's
/// address and the TLS library's reason; nothing of the certificate or the session.
final class TLSHandshakeFailureHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart

    private let failures: TLSFailures
    private let logger: Logger
    private var handshakeDone = false

    init(_ failures: TLSFailures, logger: Logger) {
        self.failures = failures
        self.logger = logger
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls { handshakeDone = true }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !handshakeDone, error is NIOSSLError {
            handshakeDone = true  // one per connection
            let n = failures.add()
            if n % 100 == 1 {
                logger.info(
                    "TLS handshake failed",
                    metadata: ["client": "\(context.channel.remoteAddress.map { "\($0)" } ?? "unknown")", "error": "\(error)", "failed_so_far": "\(n)"])
            }
        }
        context.fireErrorCaught(error)
    }
}

/// Closes a connection, as soon as it is open, from an address that already holds its
/// limit of connections (``AddressConnections``); counts it otherwise until it closes.
final class AddressLimitHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart

    private let addresses: AddressConnections
    private let logger: Logger
    /// The address this connection is counted under, once counted.
    private var counted: String?
    private var decided = false

    init(_ addresses: AddressConnections, logger: Logger) {
        self.addresses = addresses
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { admit(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        admit(context)
        context.fireChannelActive()
    }

    private func admit(_ context: ChannelHandlerContext) {
        guard !decided else { return }
        decided = true
        guard let remote = context.channel.remoteAddress, let client = AddressLimitHandler.client(remote) else { return }
        if addresses.acquire(client) {
            counted = client
        } else {
            // One line for the first refusal and then one per hundred: a flood from one
            // address must not flood the log too.
            let refused = addresses.refused()
            if refused % 100 == 1 {
                logger.warning(
                    "connection closed: its address holds the most connections allowed",
                    metadata: ["client": "\(client)", "limit": "\(addresses.limit)", "refused_so_far": "\(refused)"])
            }
            context.close(promise: nil)
        }
    }

    /// Loopback (IPv4, IPv4-mapped or ::1) or a Unix socket.
    static func isThisHost(_ address: SocketAddress) -> Bool {
        if case .unixDomainSocket = address { return true }
        return client(address) == nil
    }

    /// What a connection is counted under: an IPv4 address (also when it arrives as an
    /// IPv4-mapped IPv6 address), or the /64 an IPv6 address lies in (one host commonly holds
    /// a whole /64 and could pick a new address per connection). nil, not limited: no IP
    /// address (a Unix socket), or this host (loopback: a reverse proxy in front of `serve`
    /// brings every client from there; the operator's tools and benchmarks do too).
    static func client(_ address: SocketAddress) -> String? {
        switch address {
        case .v4(let v4):
            let octets = withUnsafeBytes(of: v4.address.sin_addr.s_addr) { Array($0) }
            return octets[0] == 127 ? nil : octets.map(String.init).joined(separator: ".")
        case .v6(let v6):
            let b = withUnsafeBytes(of: v6.address.sin6_addr) { Array($0) }
            if b[0..<10].allSatisfy({ $0 == 0 }) && b[10] == 0xFF && b[11] == 0xFF {
                return b[12] == 127 ? nil : b[12...].map(String.init).joined(separator: ".")
            }
            if b[0..<15].allSatisfy({ $0 == 0 }) && b[15] == 1 { return nil }  // ::1
            let prefix = stride(from: 0, to: 8, by: 2).map { String(UInt16(b[$0]) << 8 | UInt16(b[$0 + 1]), radix: 16) }
            return prefix.joined(separator: ":") + "::/64"
        case .unixDomainSocket:
            return nil
        }
    }

    private func release() {
        if let counted { addresses.release(counted) }
        counted = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        release()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        release()
    }
}

/// Closes a connection whose request is still being read `requestReadSecondsMax` after its
/// head arrived, which has stayed unwritable for `responseStallSecondsMax`, or, after its
/// current response, which has been open for `connectionAgeSecondsMax` or whose response says
/// `connection: close`.
final class RequestDeadlineHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private var deadline: Scheduled<Void>?
    private var stall: Scheduled<Void>?
    private var openedAt: NIODeadline?
    private var closeAfterResponse = false

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { openedAt = context.eventLoop.now }
    }

    func channelActive(context: ChannelHandlerContext) {
        if openedAt == nil { openedAt = context.eventLoop.now }
        context.fireChannelActive()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(var response) where response.status.kind != .informational:
            if response.headerFields[.connection]?.lowercased() == "close" {
                // The route decided to close (a body refused unread): after this response.
                closeAfterResponse = true
                context.write(data, promise: promise)
            } else if let openedAt, context.eventLoop.now - openedAt >= .seconds(Limits.connectionAgeSecondsMax) {
                closeAfterResponse = true
                response.headerFields[.connection] = "close"
                context.write(wrapOutboundOut(.head(response)), promise: promise)
            } else {
                context.write(data, promise: promise)
            }
        case .end where closeAfterResponse:
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            let written = context.eventLoop.makePromise(of: Void.self)
            written.futureResult.whenComplete { _ in loopBound.value.close(promise: nil) }
            if let promise { written.futureResult.cascade(to: promise) }
            context.write(data, promise: written)
        default:
            context.write(data, promise: promise)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            stall?.cancel()
            stall = nil
        } else if stall == nil {
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            stall = context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(Limits.responseStallSecondsMax)) {
                loopBound.value.close(promise: nil)
            }
        }
        context.fireChannelWritabilityChanged()
    }

    private func cancelAll() {
        deadline?.cancel()
        deadline = nil
        stall?.cancel()
        stall = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head:
            deadline?.cancel()
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            deadline = context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(Limits.requestReadSecondsMax)) {
                loopBound.value.close(promise: nil)
            }
        case .end:
            deadline?.cancel()
            deadline = nil
        case .body:
            break
        }
        context.fireChannelRead(data)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        cancelAll()
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancelAll()
        context.fireChannelInactive()
    }
}

/// What the HTTP/1 message says about its connection, which the version-free HTTP types the
/// router sees cannot carry; it sits between NIO's HTTP/1 codec and the HTTP-types codec.
///
/// - An HTTP/1.0 request is answered as HTTP/1.0 (its body delimited by a length, or by the
///   close: an HTTP/1.0 client cannot read chunks), with `connection: close`, and its
///   connection closed after the response (RFC 9112 §9.3). Its `expect` is dropped: a server
///   must ignore `100-continue` from an HTTP/1.0 client (RFC 9110 §10.1.1).
/// - A request whose `connection` lists `close` in any letter case (RFC 9110 §7.6.1: the
///   tokens are case-insensitive) reaches the router as exactly `connection: close`, which is
///   the only spelling Hummingbird closes on, and its response says `connection: close`.
///
/// Without it such a connection stayed open until the idle timeout, and a client waiting for
/// the close to end a response waited `connectionIdleSecondsMax`.
///
/// - Once the connection is being closed (its idle timeout, the server stopping, a response
///   that said `close`), a request that still arrives is dropped unread: TLS keeps passing
///   data up while it waits for the client's close_notify, and the router would decide a
///   posting whose answer could never be written (durable, and unanswered). Dropped, it was
///   never accepted; the client sees the connection close and retries.
/// - A request pipelined behind another (sent before the other's answer came) is held here,
///   and the connection read no further, until the other's answer has been written to its
///   end; then it is passed on, or dropped unread if that answer said `close` (RFC 9112 §9.6:
///   after a response saying `close` the server must process no further request). Without
///   it, the router read it from its buffer behind a refusal that closes the connection and
///   decided it while the connection closed: durable, and perhaps never answered.
final class HTTP1ConnectionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// For each request read and not yet answered (several when a client pipelines), in order:
    /// how its response must be framed.
    private var unanswered = CircularBuffer<(version: HTTPVersion, close: Bool)>(initialCapacity: 2)
    /// Set when a close of the connection (or of its output) has passed on its way out, or an
    /// answer saying `connection: close` has.
    private var closing = false
    /// Whether a request has been passed on whose answer has not yet been written to its end.
    private var answering = false
    /// What was read behind a request still being answered (see above), in order. Bounded: no
    /// read is asked of the channel while anything waits here, so it holds at most what the
    /// reads before had brought.
    private var held = CircularBuffer<Held>(initialCapacity: 0)
    /// A read the pipeline asked for while requests were held, made once they are passed on.
    private var readPending = false
    /// Set when the server began to stop (`ChannelShouldQuiesceEvent`).
    private var quiescing = false
    /// Between a request's head and its end, as passed on to the router.
    private var midRequest = false

    private enum Held {
        case part(NIOAny)
        case error(any Error)
        case event(Any)
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode != .input {
            closing = true
            held.removeAll()
        }
        context.close(mode: mode, promise: promise)
    }

    func read(context: ChannelHandlerContext) {
        if held.isEmpty {
            context.read()
        } else {
            readPending = true
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Nothing read after the close began reaches the router (see above).
        if closing { return }
        // A request behind one still being answered waits for that answer's end, and so
        // does everything read after it.
        if !held.isEmpty || (answering && isHead(data)) {
            held.append(.part(data))
            return
        }
        pass(context: context, data)
    }

    private func isHead(_ data: NIOAny) -> Bool {
        if case .head = unwrapInboundIn(data) { return true }
        return false
    }

    /// Passes a part on to the router; a request's head as its connection must be answered.
    private func pass(context: ChannelHandlerContext, _ data: NIOAny) {
        guard case .head(var head) = unwrapInboundIn(data) else {
            if case .end = unwrapInboundIn(data) { midRequest = false }
            context.fireChannelRead(data)
            return
        }
        // CONNECT asks for a tunnel, which nothing here serves; and after its head the HTTP
        // parser reads the connection as that tunnel, so no later request on it could be read.
        // Refused as any method not served (405, with what is), and the connection closed at
        // once (it used to wait out the idle timeout). NIO's response encoder sends no body in
        // any answer to CONNECT, so the problem document stays behind: `allow` says it all.
        if head.method == .CONNECT {
            refuse(context: context, status: .methodNotAllowed, Problem(.methodNotAllowed, "CONNECT is not served here: no tunnels"),
                   headers: ["allow": "GET, HEAD, POST"])
            return
        }
        // HTTP/1.1 requires exactly one `host` (RFC 9112 §3.2: a server must answer 400 to a
        // request with none or several).
        let hosts = head.headers[canonicalForm: "host"].count
        let atLeast11 = head.version.major > 1 || (head.version.major == 1 && head.version.minor >= 1)
        if atLeast11, hosts != 1 {
            refuse(context: context, status: .badRequest, Problem(.malformed, "host: an HTTP/1.1 request carries exactly one host header; this one has \(hosts)"))
            return
        }
        let legacy = head.version.major < 1 || (head.version.major == 1 && head.version.minor == 0)
        // Framing by `transfer-encoding` (RFC 9112 §6.1), refused where this server and
        // another HTTP hop could read a different body out of the same bytes (request
        // smuggling): HTTP/1.0 has no transfer codings, so such a request's framing is faulty
        // (400); a coding other than `chunked` alone cannot be decoded here (501). The NIO
        // parser frames by the last `chunked` and would pass `gzip, chunked` on as plain.
        let codings = head.headers["transfer-encoding"]
        if !codings.isEmpty {
            if legacy {
                refuse(context: context, status: .badRequest, Problem(.malformed, "transfer-encoding in an HTTP/1.0 request: its framing cannot be trusted (RFC 9112 §6.1)"))
                return
            }
            let list = codings.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false) }
                .map(Self.transferCoding)
            if list != ["chunked"] {
                let named = Responses.echoed(codings.joined(separator: ", "))
                refuse(context: context, status: .notImplemented, Problem(.notImplemented, "transfer-encoding \(JSONWriter.quote(named)): only chunked, alone, is understood"))
                return
            }
        }
        answering = true
        midRequest = true
        let close = legacy || !head.isKeepAlive
        // At most two: a request being answered, and one behind it whose predecessor was
        // answered before its own body had all been read.
        unanswered.append((legacy ? head.version : .http1_1, close))
        guard close else {
            // The common case, an HTTP/1.1 keep-alive request: passed on as it came.
            context.fireChannelRead(data)
            return
        }
        if legacy { head.headers.remove(name: "expect") }
        head.headers.replaceOrAdd(name: "connection", value: "close")
        context.fireChannelRead(wrapInboundOut(.head(head)))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // In order with the parts around it: an error behind a held request waits too, and so
        // does an unreadable head behind an answer still being written.
        if !held.isEmpty || waits(error) {
            held.append(.error(error))
            return
        }
        deliver(context: context, error)
    }

    /// A request head the HTTP parser refused, between requests, while an answer is still
    /// being written: refused once that answer has ended.
    private func waits(_ error: any Error) -> Bool {
        answering && !midRequest && !closing && error is HTTPParserError
    }

    /// A request head the HTTP parser refused (over `requestHeaderDecodeBytesMax`, over
    /// `requestHeaderFieldsMax` fields, a bad token), between requests: answered here with a
    /// problem document, as every refusal is (Hummingbird would write a bare 400), and the
    /// connection closed (the parser cannot find the next request). Any other error goes on.
    private func deliver(context: ChannelHandlerContext, _ error: any Error) {
        if let parse = error as? HTTPParserError, !midRequest, !closing {
            refuseUnreadableHead(context: context, parse)
        } else {
            context.fireErrorCaught(error)
        }
    }

    private func refuseUnreadableHead(context: ChannelHandlerContext, _ error: HTTPParserError) {
        let detail = switch error {
        case .headerOverflow:
            "the request head is too large: at most \(Limits.requestHeaderDecodeBytesMax / 1024) KiB in \(Limits.requestHeaderFieldsMax) fields"
        case .invalidContentLength: "content-length must be one decimal number"
        case .unexpectedContentLength: "a request carries transfer-encoding or content-length, not both"
        case .invalidVersion: "the request line does not end in HTTP/1.0 or HTTP/1.1"
        case .invalidMethod: "the request line's method is not one HTTP knows"
        case .invalidURL: "the request target cannot be read"
        case .invalidHeaderToken, .invalidCharactersUsed: "a header name or value holds a character HTTP does not allow"
        default: "the request head could not be read as HTTP/1.1"
        }
        refuse(context: context, status: .badRequest, Problem(.malformed, detail))
    }

    /// One entry of a `transfer-encoding` list as compared: without the spaces and tabs
    /// around it, in lower case (coding names are case-insensitive, RFC 9112 §7).
    static func transferCoding(_ entry: Substring) -> String {
        var t = entry
        while let f = t.first, f == " " || f == "\t" { t.removeFirst() }
        while let l = t.last, l == " " || l == "\t" { t.removeLast() }
        return t.lowercased()
    }

    /// Answers a request the router never sees with a problem document, and closes the
    /// connection once the answer is written.
    private func refuse(context: ChannelHandlerContext, status: HTTPResponseStatus, _ problem: Problem, headers extra: HTTPHeaders = [:]) {
        let body = ByteBuffer(string: problem.json)
        var headers: HTTPHeaders = [
            "content-type": "application/problem+json", "cache-control": "no-store",
            "content-length": String(body.readableBytes), "connection": "close",
            "date": SystemClock().now().httpDate,
        ]
        headers.add(contentsOf: extra)
        let head = HTTPResponseHead(version: .http1_1, status: status, headers: headers)
        closing = true
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in loopBound.value.close(promise: nil) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The server is stopping: Hummingbird closes the connection after the answer being
        // written, so that answer says `close`, and nothing held behind it is passed on (it
        // would be decided, and its answer never written).
        if event is ChannelShouldQuiesceEvent { quiescing = true }
        // The client's half-close, behind the requests it sent before it.
        if !held.isEmpty, let e = event as? ChannelEvent, e == .inputClosed {
            held.append(.event(event))
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        held.removeAll()
        context.fireChannelInactive()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .end:
            context.write(data, promise: promise)
            answering = false
            // Stopping since this answer's head passed: the connection closes after it.
            if quiescing { closing = true }
            passHeld(context: context)
        case .head(let response) where response.status.code >= 200:
            writeHead(context: context, response, data, promise: promise)
        case .head, .body:
            context.write(data, promise: promise)
        }
    }

    /// After an answer's end: what was held behind its request is passed on, up to the next
    /// request still to wait (or all of it dropped, when the connection is closing); then the
    /// read held back meanwhile is made.
    private func passHeld(context: ChannelHandlerContext) {
        var passed = false
        while !closing, let next = held.first {
            // The next request, or an unreadable head behind it, waits for its answer's end.
            if answering, case .part(let data) = next, isHead(data) { break }
            if case .error(let error) = next, waits(error) { break }
            held.removeFirst()
            passed = true
            switch next {
            case .part(let data): pass(context: context, data)
            case .error(let error): deliver(context: context, error)
            case .event(let event): context.fireUserInboundEventTriggered(event)
            }
        }
        // The router's channel hands reads on to its task at the end of a read.
        if passed { context.fireChannelReadComplete() }
        if closing { held.removeAll() }
        if held.isEmpty && readPending {
            readPending = false
            context.read()
        }
    }

    private func writeHead(context: ChannelHandlerContext, _ response: HTTPResponseHead, _ data: NIOAny, promise: EventLoopPromise<Void>?) {
        var response = response
        guard let request = unanswered.popFirst() else {
            context.write(data, promise: promise)
            return
        }
        guard request.close || quiescing else {
            // An answer that says `close` itself (a body refused unread, an old connection):
            // nothing read from now on is a request to decide; the close follows its end.
            if !response.isKeepAlive { closing = true }
            context.write(data, promise: promise)
            return
        }
        closing = true
        response.version = request.version
        response.headers.replaceOrAdd(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(response)), promise: promise)
    }

    /// Added with the router's channel handlers (after the HTTP-types codec), it puts an
    /// ``HTTP1ConnectionHandler`` just before that codec, where HTTP/1 messages pass.
    final class Installer: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = HTTPRequestPart

        func handlerAdded(context: ChannelHandlerContext) {
            let pipeline = context.pipeline.syncOperations
            do {
                let codec = try pipeline.handler(type: HTTP1ToHTTPServerCodec.self)
                try pipeline.addHandler(HTTP1ConnectionHandler(), position: .before(codec))
            } catch {
                // Hummingbird builds the pipeline; the live tests would see this at once.
                assertionFailure("no HTTP1ToHTTPServerCodec in the pipeline: \(error)")
            }
        }
    }
}
