import ClearingDomain
import ClearingStore
import Hummingbird
import HTTPTypes
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL

extension HTTPField.Name {
    static let webhookID = HTTPField.Name("webhook-id")!
    static let webhookTimestamp = HTTPField.Name("webhook-timestamp")!
    static let webhookSignature = HTTPField.Name("webhook-signature")!
}

enum Responses {
    /// A request's own text as a problem's detail repeats it: at most
    /// `Limits.echoedTextBytesMax` bytes of it (whole characters), then `…`.
    static func echoed(_ text: String) -> String {
        guard text.utf8.count > Limits.echoedTextBytesMax else { return text }
        var kept = text.prefix(Limits.echoedTextBytesMax)  // characters: at least as many bytes
        while kept.utf8.count > Limits.echoedTextBytesMax { kept = kept.dropLast() }
        return kept + "…"
    }

    /// A JSON body with a status.
    static func json(_ status: Int, _ body: String) -> Response {
        Response(
            status: HTTPResponse.Status(code: status),
            headers: [.contentType: "application/json", .cacheControl: "no-store"],
            body: .init(byteBuffer: ByteBuffer(string: body)))
    }

    /// An RFC 9457 problem document, with `retry-after` where the problem has one.
    static func problem(_ p: Problem) -> Response {
        var headers: HTTPFields = [.contentType: "application/problem+json", .cacheControl: "no-store"]
        if let s = p.retryAfterSeconds ?? (p.kind == .rateLimited || p.kind == .unavailable ? Limits.overloadRetryAfterSeconds : nil) {
            headers[.retryAfter] = String(s)
        }
        // Every 401 names the scheme it wants (RFC 9110 §15.5.2): a bearer token on reads, a
        // Standard Webhooks signature on postings.
        switch p.kind {
        case .unauthorized: headers[.wwwAuthenticate] = "Bearer"
        case .badSignature, .staleTimestamp: headers[.wwwAuthenticate] = #"Standard-Webhooks realm="clearhouse""#
        default: break
        }
        return Response(status: HTTPResponse.Status(code: p.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: p.json)))
    }

    static func outcome(_ o: PostingOutcome) -> Response {
        switch o {
        case .created, .replayed: json(o.httpStatus, o.bodyJSON)
        case .rejected(let p): problem(p)
        }
    }
}

/// Refuses requests whose header fields add up to more than `Limits.requestHeaderBytesMax`
/// (the HTTP parser's own, larger limit closes the connection before this runs).
struct HeaderLimitMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var bytes = 0
        for field in request.headers { bytes += field.name.rawName.utf8.count + field.value.utf8.count + 4 }
        guard bytes <= Limits.requestHeaderBytesMax else {
            throw Problem(.malformed, "the request's headers are \(bytes) bytes; at most \(Limits.requestHeaderBytesMax) are accepted")
        }
        return try await next(request, context)
    }
}

/// Turns anything a route or Hummingbird throws into a problem document, so every failure
/// on the wire is `application/problem+json` (unknown routes and methods included).
struct ProblemMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch {
            var response = Responses.failure(error, request, logger: context.logger)
            if Intake.awaitsContinue(request) {
                // Refused (404, 405, headers too large, …) while the client may still be waiting
                // for `100 Continue` before its body: it may never send it, so the server must
                // not read its next request as that body (RFC 9110 §10.1.1). After this answer
                // the connection closes (`RequestDeadlineHandler`).
                response.headers[.connection] = "close"
            }
            return request.method == .head ? Responses.head(of: response) : response
        }
    }
}

extension Responses {
    /// The answer to HEAD: the GET's status and headers, no body. A GET answered with a length
    /// keeps its `content-length`; a streamed one (a statement) has none to give, so the HEAD
    /// says none rather than 0 (RFC 9110 §9.3.2), and NIO frames it as `chunked` with no body.
    static func head(of response: Response) -> Response {
        var head = Response(status: response.status, headers: response.headers, body: ResponseBody())
        if response.body.contentLength == nil { head.headers[.contentLength] = nil }
        return head
    }
}

extension Responses {
    /// The problem document for anything a route or Hummingbird throws.
    static func failure(_ error: any Error, _ request: Request, logger: Logger) -> Response {
        switch error {
        case let p as Problem:
            return problem(p)
        case is NIOTooManyBytesError:
            return problem(Problem(.tooLarge, "the body is larger than \(Limits.eventBodyBytesMax) bytes"))
        case let e as any HTTPResponseError:
            switch e.status.code {
            case 404, 405:
                // The router answers 404 when no route has this path and method; a path served
                // with other methods is 405, with `allow` (RFC 9110 §15.5.6).
                let allowed = Intake.methods(servedAt: request.uri.path)
                guard !allowed.isEmpty, !allowed.contains(request.method.rawValue) else {
                    return problem(Problem(.notFound, "no such resource: \(Responses.echoed(request.uri.path))"))
                }
                var response = problem(Problem(.methodNotAllowed, "\(request.method) is not served at \(Responses.echoed(request.uri.path)); \(allowed.joined(separator: ", ")) is"))
                response.headers[.allow] = allowed.joined(separator: ", ")
                return response
            case 413: return problem(Problem(.tooLarge, "the body is larger than \(Limits.eventBodyBytesMax) bytes"))
            case 400..<500: return problem(Problem(.malformed, "the request could not be read"))
            default:
                logger.error("request failed", metadata: ["status": "\(e.status.code)"])
                return problem(Problem(.unavailable, "the request could not be served; retry later"))
            }
        case is HTTPParserError:
            // A body the HTTP parser could not read (a malformed chunk): the client's fault.
            return problem(Problem(.malformed, "the request's body could not be read: \(error)"))
        case is NIOSSLError, is ChannelError, is IOError:
            // The client closed or broke its connection mid-request (a body cut short): its
            // failure, not the server's; no 5xx, no error log, and nobody is left to answer.
            logger.debug("request cut short by the client", metadata: ["error": "\(type(of: error))"])
            return problem(Problem(.malformed, "the request could not be read: the connection broke"))
        default:
            var metadata: Logger.Metadata = ["error": "\(type(of: error))"]
            // The store's own words (what failed, which partner, which sequence; never a
            // secret): the operator needs them to act, as for a damaged ledger.
            if let e = error as? StoreError { metadata["detail"] = "\(e.description)" }
            logger.error("request failed", metadata: metadata)
            return problem(Problem(.unavailable, "the request could not be served; retry later"))
        }
    }
}
