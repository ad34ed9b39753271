import ClearingDomain
import HTTPTypes
import Hummingbird
import HummingbirdCore
import NIOCore
import NIOHTTPTypes

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
public enum ServerChannel {
    public static func http1() -> HTTPServerBuilder {
        .http1(configuration: configuration)
    }

    public static var configuration: HTTP1Channel.Configuration {
        HTTP1Channel.Configuration(
            additionalChannelHandlers: [RequestDeadlineHandler()],
            idleTimeout: .seconds(Limits.connectionIdleSecondsMax),
            httpDecoderConfiguration: .init(
                maxHeaderFieldSize: Limits.requestHeaderDecodeBytesMax, maxHeaderListSize: Limits.requestHeaderDecodeBytesMax,
                maxHeaderFieldCount: Limits.requestHeaderFieldsMax))
    }
}

/// Closes a connection whose request is still being read `requestReadSecondsMax` after its
/// head arrived, which has stayed unwritable for `responseStallSecondsMax`, or, after its
/// current response, which has been open for `connectionAgeSecondsMax`.
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
            if let openedAt, context.eventLoop.now - openedAt >= .seconds(Limits.connectionAgeSecondsMax) {
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
