@testable import ClearingHTTP
import Crypto
import ClearingDomain
import ClearingStore
import HTTPTypes
import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOHTTPTypes
import NIOSSL
import NIOTLS
import Testing

/// The deadlines of `RequestDeadlineHandler`, on an embedded channel with a virtual clock.
@Suite struct ConnectionGuardTests {
    func channel() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(handler: RequestDeadlineHandler())
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    /// Open a second before the limit, closed a second after it.
    func expectClosedJustAfter(_ c: EmbeddedChannel, seconds limit: Int64, _ why: Comment) {
        c.embeddedEventLoop.advanceTime(by: .seconds(limit - 1))
        #expect(c.isActive)
        c.embeddedEventLoop.advanceTime(by: .seconds(2))
        #expect(!c.isActive, why)
    }

    let head = HTTPRequestPart.head(HTTPRequest(method: .post, scheme: "https", authority: "localhost", path: "/v1/partners/fuelco/events"))

    @Test func aBodyNotWholeWithinTheReadDeadlineClosesTheConnection() throws {
        let c = try channel()
        try c.writeInbound(head)
        try c.writeInbound(HTTPRequestPart.body(ByteBuffer(string: "{")))
        expectClosedJustAfter(c, seconds: Limits.requestReadSecondsMax, "a trickled body must be cut off")
    }

    @Test func aRequestReadInTimeKeepsItsConnectionWhileItsResponseIsPending() throws {
        let c = try channel()
        try c.writeInbound(head)
        try c.writeInbound(HTTPRequestPart.end(nil))
        c.embeddedEventLoop.advanceTime(by: .seconds(Limits.requestReadSecondsMax * 3))
        #expect(c.isActive)
        _ = try c.finish()
    }

    @Test func aClientThatReadsNothingIsClosedAfterTheStallLimit() throws {
        let c = try channel()
        c.isWritable = false
        c.pipeline.fireChannelWritabilityChanged()
        expectClosedJustAfter(c, seconds: Limits.responseStallSecondsMax, "a connection unwritable for the whole stall limit must be closed")
    }

    @Test func aClientThatReadsNowAndThenIsKept() throws {
        let c = try channel()
        for _ in 0..<5 {
            c.isWritable = false
            c.pipeline.fireChannelWritabilityChanged()
            c.embeddedEventLoop.advanceTime(by: .seconds(Limits.responseStallSecondsMax - 5))
            c.isWritable = true
            c.pipeline.fireChannelWritabilityChanged()
        }
        c.embeddedEventLoop.advanceTime(by: .seconds(Limits.responseStallSecondsMax * 2))
        #expect(c.isActive)
        _ = try c.finish()
    }

    @Test func anOldConnectionIsClosedAfterItsCurrentResponse() throws {
        let c = try channel()
        let ok = HTTPResponse(status: .ok)
        // Young: answered and kept.
        try c.writeOutbound(HTTPResponsePart.head(ok))
        try c.writeOutbound(HTTPResponsePart.end(nil))
        guard case .head(let first) = try c.readOutbound(as: HTTPResponsePart.self) else { Issue.record("no head"); return }
        #expect(first.headerFields[.connection] == nil)
        #expect(c.isActive)
        _ = try c.readOutbound(as: HTTPResponsePart.self)
        // Past the age limit (a client that keeps it busy just inside the idle timeout): the
        // next response says so and the connection closes once it is written.
        c.embeddedEventLoop.advanceTime(by: .seconds(Limits.connectionAgeSecondsMax))
        try c.writeInbound(head)
        try c.writeInbound(HTTPRequestPart.end(nil))
        try c.writeOutbound(HTTPResponsePart.head(ok))
        #expect(c.isActive, "the response is finished first")
        try c.writeOutbound(HTTPResponsePart.end(nil))
        guard case .head(let last) = try c.readOutbound(as: HTTPResponsePart.self) else { Issue.record("no head"); return }
        #expect(last.headerFields[.connection] == "close")
        #expect(!c.isActive)
    }

    /// A route that answers `connection: close` (a body refused unread) has the connection
    /// closed once that response is written, and not before.
    @Test func aResponseSayingCloseClosesTheConnectionOnceWritten() throws {
        let c = try channel()
        try c.writeInbound(head)
        var refused = HTTPResponse(status: .contentTooLarge)
        refused.headerFields[.connection] = "close"
        try c.writeOutbound(HTTPResponsePart.head(refused))
        #expect(c.isActive, "the response is finished first")
        try c.writeOutbound(HTTPResponsePart.end(nil))
        guard case .head(let written) = try c.readOutbound(as: HTTPResponsePart.self) else { Issue.record("no head"); return }
        #expect(written.headerFields[.connection] == "close")
        #expect(!c.isActive)
    }
}

/// `HTTP1ConnectionHandler`: what an HTTP/1 head says about its connection reaches the router
/// and the response.
@Suite struct HTTP1ConnectionTests {
    func request(_ version: HTTPVersion, _ headers: [(String, String)] = []) -> HTTPServerRequestPart {
        // HTTP/1.1 needs its one host (RFC 9112 §3.2); HTTP/1.0 may go without.
        let host = version.major == 1 && version.minor >= 1 ? [("host", "localhost")] : []
        return .head(HTTPRequestHead(version: version, method: .POST, uri: "/v1/partners/fuelco/events", headers: HTTPHeaders(host + headers)))
    }

    /// Sends `request` in, answers it with a 201, and returns the head the router saw and the final head written.
    func exchange(_ c: EmbeddedChannel, _ request: HTTPServerRequestPart) throws -> (HTTPRequestHead, HTTPResponseHead) {
        try c.writeInbound(request)
        guard case .head(let seen) = try c.readInbound(as: HTTPServerRequestPart.self) else { throw StoreError("no head read") }
        try c.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .created)))
        guard case .head(let written) = try c.readOutbound(as: HTTPServerResponsePart.self) else { throw StoreError("no head written") }
        return (seen, written)
    }

    @Test func anHTTP10RequestIsAnsweredInHTTP10WithCloseAndWithoutItsExpectation() throws {
        for asked in [[("expect", "100-continue")], [("connection", "keep-alive")]] {
            let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())  // each closes its connection
            let (seen, written) = try exchange(c, request(.http1_0, asked))
            #expect(seen.headers["expect"].isEmpty, "RFC 9110 10.1.1: ignored for HTTP/1.0")
            #expect(seen.headers["connection"] == ["close"], "Hummingbird closes after the response on exactly this")
            #expect(written.version == .http1_0, "so that NIO frames the body by length or by the close, never in chunks")
            #expect(written.headers["connection"] == ["close"])
        }
    }

    @Test func closeInAnyLetterCaseReachesTheRouterAsCloseAndIsAnswered() throws {
        for spelling in ["Close", "CLOSE", "keep-alive, Close"] {
            let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())  // each closes its connection
            let (seen, written) = try exchange(c, request(.http1_1, [("Connection", spelling)]))
            #expect(seen.headers["connection"] == ["close"], "\(spelling)")
            #expect(written.version == .http1_1 && written.headers["connection"] == ["close"])
        }
    }

    /// A request that arrives once the connection is closing (its idle timeout, a stop) is
    /// dropped: it would be decided, and its answer never written.
    @Test func nothingReadAfterTheCloseBeganReachesTheRouter() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try c.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        _ = try exchange(c, request(.http1_1))
        c.pipeline.close(mode: .output, promise: nil)
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil, "a request after the close began is not read")
    }

    /// An answer that itself says `close` (a body refused unread): a request pipelined behind
    /// it is not read, since its answer could never be written after the close.
    @Test func nothingReadAfterAnAnswerSayingCloseReachesTheRouter() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try c.writeInbound(request(.http1_1))
        _ = try c.readInbound(as: HTTPServerRequestPart.self)
        try c.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .notFound, headers: ["connection": "close"])))
        try c.writeInbound(request(.http1_1))
        #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil)
    }

    func respond(_ c: EmbeddedChannel, _ status: HTTPResponseStatus, _ headers: HTTPHeaders = [:]) throws {
        try c.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers)))
        try c.writeOutbound(HTTPServerResponsePart.end(nil))
    }

    func heads(_ c: EmbeddedChannel) throws -> [HTTPRequestHead] {
        var seen: [HTTPRequestHead] = []
        while let part = try c.readInbound(as: HTTPServerRequestPart.self) {
            if case .head(let h) = part { seen.append(h) }
        }
        return seen
    }

    /// Pipelined requests reach the router one at a time: the next once the answer before it
    /// has been written to its end (a 100 Continue is not that answer).
    @Test func pipelinedRequestsAreAnsweredInOrderAndAKeptConnectionIsLeftAlone() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try c.writeInbound(request(.http1_1, [("expect", "100-continue")]))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        try c.writeInbound(request(.http1_1, [("connection", "close")]))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        let first = try heads(c)
        #expect(first.count == 1, "the second request waits for the first one's answer")
        #expect(first.first?.headers["expect"] == ["100-continue"] && first.first?.headers["connection"].isEmpty == true)
        try c.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .continue)))
        try c.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .created)))
        #expect(try heads(c).isEmpty, "still waiting: the answer has not ended")
        try c.writeOutbound(HTTPServerResponsePart.end(nil))
        let second = try heads(c)
        #expect(second.count == 1 && second.first?.headers["connection"] == ["close"])
        try respond(c, .ok)
        var written: [HTTPResponseHead] = []
        while let part = try c.readOutbound(as: HTTPServerResponsePart.self) {
            if case .head(let h) = part { written.append(h) }
        }
        #expect(written.map(\.headers["connection"]) == [[], [], ["close"]], "only the second request said close")
    }

    /// RFC 9112 9.6: a request pipelined behind one whose answer says `close` (a body refused
    /// unread) is never passed on: it would be decided, and its answer never written.
    @Test func aRequestPipelinedBehindAnAnswerSayingCloseIsDroppedUnread() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.body(ByteBuffer(string: "{}")))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(try heads(c).count == 1)
        try respond(c, .unsupportedMediaType, ["connection": "close"])
        #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil, "the request behind is dropped")
        try c.writeInbound(request(.http1_1))
        #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil, "and so is anything read later")
    }

    /// Three pipelined: each passed on after the answer before it; the third is dropped
    /// when the second's answer says `close`.
    @Test func aRequestHeldBehindTwoIsDroppedWhenTheSecondAnswerSaysClose() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        for _ in 0..<3 {
            try c.writeInbound(request(.http1_1))
            try c.writeInbound(HTTPServerRequestPart.end(nil))
        }
        #expect(try heads(c).count == 1)
        try respond(c, .created)
        #expect(try heads(c).count == 1, "the second, and only the second")
        try respond(c, .unsupportedMediaType, ["connection": "close"])
        #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil, "the third is dropped")
    }

    /// The server stopping (Hummingbird closes after the answer being written): a request held
    /// behind that answer is never passed on, whether the stop came before the answer's head
    /// (which then says `close`) or between its head and its end (already sent without it).
    @Test func aRequestHeldWhenTheServerStopsIsDroppedAndTheAnswerSaysClose() throws {
        for stopBeforeHead in [true, false] {
            let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
            try c.writeInbound(request(.http1_1))
            try c.writeInbound(HTTPServerRequestPart.end(nil))
            try c.writeInbound(request(.http1_1))
            try c.writeInbound(HTTPServerRequestPart.end(nil))
            #expect(try heads(c).count == 1)
            if stopBeforeHead { c.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
            try c.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .created)))
            if !stopBeforeHead { c.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
            try c.writeOutbound(HTTPServerResponsePart.end(nil))
            #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil, "held request passed on while stopping (\(stopBeforeHead))")
            guard case .head(let written) = try c.readOutbound(as: HTTPServerResponsePart.self) else { Issue.record("no head"); return }
            #expect(written.headers["connection"] == (stopBeforeHead ? ["close"] : []))
        }
    }

    /// An error and the client's half-close read behind a held request reach the router after
    /// that request, in order, not before it.
    @Test func errorsAndHalfCloseBehindAHeldRequestKeepTheirPlace() throws {
        final class Record: ChannelInboundHandler {
            typealias InboundIn = HTTPServerRequestPart
            var seen: [String] = []
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                if case .head = unwrapInboundIn(data) { seen.append("head") }
                if case .end = unwrapInboundIn(data) { seen.append("end") }
            }
            func errorCaught(context: ChannelHandlerContext, error: any Error) { seen.append("error") }
            func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
                if let e = event as? ChannelEvent, e == .inputClosed { seen.append("inputClosed") }
            }
        }
        let record = Record()
        let c = EmbeddedChannel()
        try c.pipeline.syncOperations.addHandler(HTTP1ConnectionHandler())
        try c.pipeline.syncOperations.addHandler(record)
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        try c.writeInbound(request(.http1_1))
        c.pipeline.fireErrorCaught(HTTPParserError.invalidChunkSize)
        c.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(record.seen == ["head", "end"])
        try respond(c, .created)
        #expect(record.seen == ["head", "end", "head", "error", "inputClosed"])
    }

    /// A request head the HTTP parser refuses (too large, too many fields) gets a problem
    /// document like every refusal (Hummingbird wrote a bare 400), and the connection closes;
    /// a parse error in a request's body is left to the route reading it.
    @Test func anUnreadableHeadGetsAProblemDocumentAndTheConnectionCloses() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try c.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        c.pipeline.fireErrorCaught(HTTPParserError.headerOverflow)
        guard case .head(let head) = try c.readOutbound(as: HTTPServerResponsePart.self) else { Issue.record("no head"); return }
        #expect(head.status == .badRequest && head.headers["content-type"] == ["application/problem+json"])
        #expect(head.headers["connection"] == ["close"])
        guard case .body(.byteBuffer(let body)) = try c.readOutbound(as: HTTPServerResponsePart.self) else { Issue.record("no body"); return }
        let text = String(buffer: body)
        #expect(text.contains("urn:clearhouse:problem:malformed") && text.contains("at most 32 KiB in 100 fields"), "\(text)")
        #expect(head.headers["content-length"] == ["\(body.readableBytes)"])
        #expect(!c.isActive, "closed once written")

        let mid = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try mid.writeInbound(request(.http1_1))
        #expect(throws: HTTPParserError.self) {
            mid.pipeline.fireErrorCaught(HTTPParserError.invalidChunkSize)
            try mid.throwIfErrorCaught()
        }
        #expect(try mid.readOutbound(as: HTTPServerResponsePart.self) == nil, "the route answers a body it cannot read")
    }

    /// Framing by `transfer-encoding` that this server and another hop could read apart
    /// (request smuggling) is refused before any body is read, with a dated problem document,
    /// and the connection closes: a coding other than `chunked` alone (501), and any
    /// `transfer-encoding` in HTTP/1.0 (400). `chunked` alone, in any case, goes on.
    @Test func transferCodingsOtherThanChunkedAloneAreRefused() throws {
        let refused: [(HTTPVersion, [(String, String)], HTTPResponseStatus, String)] = [
            (.http1_1, [("transfer-encoding", "gzip, chunked")], .notImplemented, "not-implemented"),
            (.http1_1, [("transfer-encoding", "gzip"), ("transfer-encoding", "chunked")], .notImplemented, "not-implemented"),
            (.http1_1, [("transfer-encoding", "identity, chunked")], .notImplemented, "not-implemented"),
            (.http1_1, [("transfer-encoding", "chunked, chunked")], .notImplemented, "not-implemented"),
            (.http1_1, [("transfer-encoding", "chunked,")], .notImplemented, "not-implemented"),
            (.http1_0, [("transfer-encoding", "chunked")], .badRequest, "malformed"),
        ]
        for (version, headers, status, slug) in refused {
            let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
            try c.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            try c.writeInbound(request(version, headers))
            #expect(try c.readInbound(as: HTTPServerRequestPart.self) == nil, "the router never sees it: \(headers)")
            guard case .head(let head) = try c.readOutbound(as: HTTPServerResponsePart.self) else { Issue.record("no head"); continue }
            #expect(head.status == status && head.headers["connection"] == ["close"], "\(headers)")
            #expect(head.headers["date"].first?.hasSuffix(" GMT") == true, "a refusal is dated too")
            guard case .body(.byteBuffer(let body)) = try c.readOutbound(as: HTTPServerResponsePart.self) else { Issue.record("no body"); continue }
            #expect(String(buffer: body).contains("urn:clearhouse:problem:\(slug)"), "\(String(buffer: body))")
            #expect(!c.isActive, "closed: the body's framing is unknown")
        }
        for spelling in ["chunked", "Chunked", " CHUNKED "] {
            let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
            let (seen, _) = try exchange(c, request(.http1_1, [("transfer-encoding", spelling)]))
            #expect(seen.headers["transfer-encoding"] == [spelling])
        }
    }

    /// An unreadable head pipelined behind requests (held, or read while an answer is being
    /// written) is refused with the problem document once the answers before it have ended.
    @Test func anUnreadableHeadBehindRequestsIsRefusedAfterTheirAnswers() throws {
        let c = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try c.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        c.pipeline.fireErrorCaught(HTTPParserError.invalidContentLength)  // held behind the second
        #expect(try heads(c).count == 1)
        try respond(c, .ok)
        #expect(try heads(c).count == 1, "the second passed on; the error waits for its answer")
        var statuses: [UInt] = []
        while let part = try c.readOutbound(as: HTTPServerResponsePart.self) { if case .head(let h) = part { statuses.append(h.status.code) } }
        #expect(statuses == [200])
        try respond(c, .ok)
        var after: [HTTPResponseHead] = []
        while let part = try c.readOutbound(as: HTTPServerResponsePart.self) { if case .head(let h) = part { after.append(h) } }
        #expect(after.map(\.status.code) == [200, 400] && after.last?.headers["content-type"] == ["application/problem+json"])
        #expect(!c.isActive)
        // Read while the only answer is being written (nothing held): the same.
        let d = EmbeddedChannel(handler: HTTP1ConnectionHandler())
        try d.writeInbound(request(.http1_1))
        try d.writeInbound(HTTPServerRequestPart.end(nil))
        d.pipeline.fireErrorCaught(HTTPParserError.headerOverflow)
        #expect(try d.readOutbound(as: HTTPServerResponsePart.self) == nil, "not before the answer in flight")
        try respond(d, .created)
        var codes: [UInt] = []
        while let part = try d.readOutbound(as: HTTPServerResponsePart.self) { if case .head(let h) = part { codes.append(h.status.code) } }
        #expect(codes == [201, 400])
    }

    /// While a request waits behind another, nothing more is read from the connection (the
    /// held parts stay bounded); the read is made once they have been passed on.
    @Test func noReadIsMadeWhileARequestIsHeld() throws {
        final class Reads: ChannelOutboundHandler {
            typealias OutboundIn = Any
            var count = 0
            func read(context: ChannelHandlerContext) {
                count += 1
                context.read()
            }
        }
        let reads = Reads()
        let c = EmbeddedChannel()
        try c.pipeline.syncOperations.addHandler(reads)
        try c.pipeline.syncOperations.addHandler(HTTP1ConnectionHandler())
        try c.writeInbound(request(.http1_1))
        try c.writeInbound(HTTPServerRequestPart.end(nil))
        c.read()
        #expect(reads.count == 1, "nothing held: reads pass")
        try c.writeInbound(request(.http1_1))
        c.read()
        #expect(reads.count == 1, "a request held: no read")
        try respond(c, .created)
        #expect(reads.count == 2, "the held request passed on: the read is made")
        #expect(try heads(c).count == 2)
    }
}

/// The per-address connection limit of `AddressLimitHandler`, on embedded channels sharing one
/// count (as all the channels of one server do).
@Suite struct AddressLimitTests {
    func open(_ addresses: AddressConnections, from ip: String, port: Int = 40_000) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(handler: AddressLimitHandler(addresses, logger: Logger(label: "test")))
        try channel.connect(to: SocketAddress(ipAddress: ip, port: port)).wait()
        return channel
    }

    @Test func anAddressHoldingItsLimitHasItsNextConnectionClosedAndOthersAreNotAffected() throws {
        let addresses = AddressConnections(limit: 2)
        let a1 = try open(addresses, from: "192.0.2.1"), a2 = try open(addresses, from: "192.0.2.1", port: 40_001)
        #expect(a1.isActive && a2.isActive)
        let a3 = try open(addresses, from: "192.0.2.1", port: 40_002)
        #expect(!a3.isActive, "a third connection from the same address must be closed")
        #expect(addresses.count("192.0.2.1") == 2, "the refused connection is not counted")
        let b1 = try open(addresses, from: "2001:db8::1")
        #expect(b1.isActive && addresses.count("2001:db8:0:0::/64") == 1, "another address has its own count")
        // A connection from the address closes: the next one from it is accepted.
        _ = try a1.close().wait()
        #expect(addresses.count("192.0.2.1") == 1)
        let a4 = try open(addresses, from: "192.0.2.1", port: 40_003)
        #expect(a4.isActive)
        for c in [a2, a4, b1] { _ = try c.close().wait() }
        #expect(addresses.count("192.0.2.1") == 0 && addresses.count("2001:db8:0:0::/64") == 0, "every close releases its count")
    }

    /// IPv6 clients are counted by /64 (a host holds one and could pick an address per
    /// connection); an IPv4-mapped address counts with its IPv4 address.
    @Test func ipv6CountsByPrefixAndMappedIPv4AsIPv4() throws {
        let addresses = AddressConnections(limit: 1)
        let a = try open(addresses, from: "2001:db8:1:2::1")
        #expect(a.isActive && addresses.count("2001:db8:1:2::/64") == 1)
        #expect(!(try open(addresses, from: "2001:db8:1:2:ffff::9")).isActive, "the same /64")
        #expect(try open(addresses, from: "2001:db8:1:3::1").isActive, "another /64")
        let v4 = try open(addresses, from: "192.0.2.7")
        #expect(v4.isActive)
        #expect(!(try open(addresses, from: "::ffff:192.0.2.7")).isActive, "the same client over IPv4-mapped IPv6")
        #expect(try open(addresses, from: "::ffff:127.0.0.1").isActive, "mapped loopback is loopback")
    }

    /// Connections from this host (a reverse proxy, the operator's tools) are not limited.
    @Test func loopbackIsNotLimited() throws {
        let addresses = AddressConnections(limit: 1)
        var local: [EmbeddedChannel] = []
        for port in 50_000..<50_003 {
            local.append(try open(addresses, from: "127.0.0.1", port: port))
            local.append(try open(addresses, from: "::1", port: port))
        }
        #expect(local.allSatisfy { $0.isActive })
        #expect(addresses.count("127.0.0.1") == 0 && addresses.count("::1") == 0)
        for c in local { _ = try c.close().wait() }
    }

    /// The handler is added to a channel that is already open (as `serve` adds it): it counts
    /// the connection then, once.
    @Test func addedToAnOpenChannelItCountsTheConnectionOnce() throws {
        let addresses = AddressConnections(limit: 1)
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "192.0.2.9", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(AddressLimitHandler(addresses, logger: Logger(label: "test")))
        #expect(channel.isActive && addresses.count("192.0.2.9") == 1)
        let second = try open(addresses, from: "192.0.2.9", port: 2)
        #expect(!second.isActive)
        _ = try channel.close().wait()
        #expect(addresses.count("192.0.2.9") == 0)
    }
}

/// `/metrics` answers this host; others only with the operator's token.
@Suite struct MetricsAccessTests {
    @Test func loopbackAlwaysOthersOnlyWithTheToken() throws {
        let token = Array(SHA256.hash(data: Array("scraper-token".utf8)))
        let here = try SocketAddress(ipAddress: "127.0.0.1", port: 5000), six = try SocketAddress(ipAddress: "::1", port: 5000)
        let away = try SocketAddress(ipAddress: "10.0.0.5", port: 5000)
        #expect(Intake.metricsAllowed(remote: nil, authorization: nil, tokenSHA256: nil), "in-process")
        #expect(Intake.metricsAllowed(remote: here, authorization: nil, tokenSHA256: nil))
        #expect(Intake.metricsAllowed(remote: six, authorization: nil, tokenSHA256: token))
        #expect(!Intake.metricsAllowed(remote: away, authorization: nil, tokenSHA256: nil))
        #expect(!Intake.metricsAllowed(remote: away, authorization: "Bearer scraper-token", tokenSHA256: nil), "no token configured: loopback only")
        #expect(!Intake.metricsAllowed(remote: away, authorization: nil, tokenSHA256: token))
        #expect(!Intake.metricsAllowed(remote: away, authorization: "Bearer wrong", tokenSHA256: token))
        #expect(Intake.metricsAllowed(remote: away, authorization: "Bearer scraper-token", tokenSHA256: token))
    }
}

/// TLS handshake failures are counted (and logged, the first and one in a hundred); errors
/// after a completed handshake are not handshake failures.
@Suite struct TLSHandshakeFailureTests {
    @Test func aFailureBeforeTheHandshakeCompletesIsCountedOnceAfterItIsNot() throws {
        let failures = TLSFailures()
        let failing = EmbeddedChannel(handler: TLSHandshakeFailureHandler(failures, logger: Logger(label: "test")))
        failing.pipeline.fireErrorCaught(NIOSSLError.handshakeFailed(.sslError([])))
        failing.pipeline.fireErrorCaught(NIOSSLError.uncleanShutdown)
        #expect(failures.total == 1, "one per connection")
        let completed = EmbeddedChannel(handler: TLSHandshakeFailureHandler(failures, logger: Logger(label: "test")))
        completed.pipeline.fireUserInboundEventTriggered(TLSUserEvent.handshakeCompleted(negotiatedProtocol: nil))
        completed.pipeline.fireErrorCaught(NIOSSLError.uncleanShutdown)
        #expect(failures.total == 1, "after the handshake: not a handshake failure")
        _ = try? failing.finish()
        _ = try? completed.finish()
    }
}
