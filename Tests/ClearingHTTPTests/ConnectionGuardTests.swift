@testable import ClearingHTTP
import ClearingDomain
import HTTPTypes
import NIOCore
import NIOEmbedded
import NIOHTTPTypes
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
}
