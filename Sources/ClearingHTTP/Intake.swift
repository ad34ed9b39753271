import ClearingDomain
import StandardWebhooks
import ClearingStore
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTPTypes

/// The routes of CONTRACT §3 and §4 over the posting API, and the operational ones.
public struct Intake: Sendable {
    let configuration: ClearingConfiguration
    let store: Store
    let writer: PostingWriter
    let limiter: RateLimiter
    /// The partner's reads (balance, statements), at the same rate in a bucket of their own: a
    /// partner's reads never spend what its postings may, and a token cannot try member ids or
    /// pull statements faster than its rate.
    let readLimiter: RateLimiter
    let clock: any WallClock
    /// SHA-256 of each partner's bearer token -> the partner.
    let tokenOwners: [[UInt8]: PartnerID]
    /// SHA-256 of each partner's client certificate -> the partner.
    let certificateOwners: [[UInt8]: PartnerID]
    public let metrics: IntakeMetrics
    /// Signs statements; its public key is at `/v1/keys`.
    let signer: StatementSigner
    let statementDigests = StatementDigests()
    /// Set when the server begins to stop (`beginStopping`).
    let stopping = OnceFlag()

    /// The server is stopping: `/readyz` answers 503 and a posting that arrives from now on gets
    /// 503 `unavailable` with `retry-after` and its connection closed; postings already being
    /// read or decided finish (`serve` keeps listening for `Limits.shutdownDrainMilliseconds`,
    /// then drains and stops).
    public func beginStopping() { stopping.set() }

    /// - Parameter signer: the coalition's statement key (`serve` reads `<certs>/statement.key`);
    ///   without one, a key made for this process only (tests).
    public init(
        configuration: ClearingConfiguration, store: Store, writer: PostingWriter, clock: any WallClock = SystemClock(),
        metrics: IntakeMetrics = IntakeMetrics(), signer: StatementSigner = StatementSigner(key: Curve25519.Signing.PrivateKey())
    ) {
        self.metrics = metrics
        self.signer = signer
        self.configuration = configuration
        self.store = store
        self.writer = writer
        self.clock = clock
        limiter = RateLimiter(configuration: configuration)
        readLimiter = RateLimiter(configuration: configuration)
        var tokens: [[UInt8]: PartnerID] = [:]
        var certs: [[UInt8]: PartnerID] = [:]
        for (id, p) in configuration.partners {
            tokens[p.apiTokenSHA256] = id
            if let c = p.clientCertSHA256 { certs[c] = id }
        }
        tokenOwners = tokens
        certificateOwners = certs
    }

    /// Every route the server answers; `docs/openapi.yaml` must describe exactly these (a test
    /// compares them), and `router()` registers exactly these.
    public static let routes: [(method: String, path: String)] = [
        ("POST", "/v1/partners/:partner/events"),
        ("GET", "/v1/partners/:partner/members/:member/balance"),
        ("GET", "/v1/partners/:partner/statements"),
        ("GET", "/v1/partners/:partner/statements/{run}.json"),
        ("GET", "/v1/partners/:partner/statements/{run}.csv"),
        ("GET", "/v1/keys"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    ]

    /// The methods served at a concrete path (for a 405's `allow`): `:name` matches any one
    /// segment, `{run}.json` any segment with that suffix.
    static func methods(servedAt path: String) -> [String] {
        // Empty segments are skipped, as Hummingbird's router skips them (`/a//b/` is `/a/b`),
        // so that a path the router would route with another method is 405 here, not 404.
        let segments = path.split(separator: "/")
        let methods = routes.filter { route in
            let pattern = route.path.split(separator: "/")
            return pattern.count == segments.count && zip(pattern, segments).allSatisfy { p, s in
                if p.hasPrefix(":") { return !s.isEmpty }
                if p.hasPrefix("{"), let close = p.firstIndex(of: "}") { return s.count > p[p.index(after: close)...].count && s.hasSuffix(p[p.index(after: close)...]) }
                return p == s
            }
        }.map(\.method)
        // Every GET route answers HEAD too (the router makes it: the GET's answer, no body).
        return Array(Set(methods + (methods.contains("GET") ? ["HEAD"] : []))).sorted()
    }

    func handler(_ path: String) -> @Sendable (Request, ClearhouseContext) async throws -> Response {
        switch path {
        case "/v1/partners/:partner/events": return { try await postEvent($0, $1) }
        case "/v1/partners/:partner/members/:member/balance": return { try await balance($0, $1) }
        case "/v1/partners/:partner/statements": return { try await statementList($0, $1) }
        case "/v1/partners/:partner/statements/{run}.json": return statementDocument(.json)
        case "/v1/partners/:partner/statements/{run}.csv": return statementDocument(.csv)
        case "/v1/keys": return { try await keys($0, $1) }
        case "/healthz": return { _, _ in Responses.json(200, #"{"status":"ok"}"#) }
        case "/readyz":
            return { _, _ in
                writer.isAccepting && !stopping.isSet
                    ? Responses.json(200, #"{"status":"ready"}"#) : Responses.problem(Problem(.unavailable, "shutting down"))
            }
        case "/metrics":
            return { request, context in
                guard Intake.metricsAllowed(
                    remote: context.channel?.remoteAddress, authorization: request.headers[.authorization],
                    tokenSHA256: configuration.coalition.metricsTokenSHA256)
                else {
                    throw Problem(.unauthorized, "/metrics answers this host, or the operator's bearer token (metrics_token_sha256 in coalition.toml)")
                }
                metrics.queueDepth(writer.queueDepth)
                return Response(
                    status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                    body: .init(byteBuffer: ByteBuffer(bytes: metrics.render())))
            }
        default: preconditionFailure("no handler for \(path)")
        }
    }

    public func router() -> Router<ClearhouseContext> {
        let router = Router(context: ClearhouseContext.self)
        router.add(middleware: RequestLogMiddleware(metrics: metrics))  // outermost: sees every final status
        router.add(middleware: ProblemMiddleware())
        router.add(middleware: HeaderLimitMiddleware())
        for route in Intake.routes {
            let handle = handler(route.path)
            router.on(RouterPath(route.path), method: HTTPRequest.Method(route.method)!, use: handle)
            if route.method == "GET" {
                // Every GET route answers HEAD: the GET's answer without its body
                // (`Responses.head(of:)`; Hummingbird's own would say `content-length: 0` for a
                // streamed statement).
                router.on(RouterPath(route.path), method: .head) { request, context in Responses.head(of: try await handle(request, context)) }
            }
        }
        return router
    }

    /// A path segment as the id it names: percent-decoded (RFC 3986 §6.2.2.2: `G%31` is `G1`,
    /// and `%2E%2E` the member `..`, which a client would otherwise normalise away); then
    /// checked against its id's pattern like any other, so a decoded `/` or NUL is refused.
    static func pathParameter(_ context: some RequestContext, _ name: String) -> String {
        let raw = context.parameters.get(name) ?? ""
        return raw.utf8.contains(UInt8(ascii: "%")) ? (raw.removingPercentEncoding ?? raw) : raw
    }

    func partner(_ context: ClearhouseContext) throws(Problem) -> PartnerTerms {
        let text = Intake.pathParameter(context, "partner")
        guard let id = PartnerID(text), let terms = configuration.partners[id] else {
            throw Problem(.unknownPartner, "no partner \(JSONWriter.quote(text)) in this coalition")
        }
        return terms
    }

    // MARK: POST /v1/partners/{partner}/events

    func postEvent(_ request: Request, _ context: ClearhouseContext) async throws -> Response {
        if stopping.isSet {
            // Arrived after the stop began: not taken (its body is left unread), and this
            // connection closes; the client retries once the server is back.
            var response = Responses.problem(Problem(.unavailable, "the server is stopping; retry later", retryAfterSeconds: Limits.overloadRetryAfterSeconds))
            response.headers[.connection] = "close"
            context.closeConnectionSoon()
            return response
        }
        let terms: PartnerTerms
        let body: ByteBuffer
        do {
            (terms, body) = try await admitAndRead(request, context)
        } catch {
            // Refused before the body was read. Hummingbird would drain it to reuse the
            // connection; when it may be large (no length, or over the limit), close instead,
            // and say so (`connection: close`), so that no client sends its next request on a
            // connection about to close. Close too when the client waits for `100 Continue`
            // before its body: it may never send it, and the server would read its next request
            // as that body (RFC 9110 §10.1.1).
            let length = request.headers[.contentLength].flatMap { Int($0) }
            guard length == nil || length! > Limits.eventBodyBytesMax || Intake.awaitsContinue(request) else { throw error }
            var response = Responses.failure(error, request, logger: context.logger)
            response.headers[.connection] = "close"
            context.closeConnectionSoon()
            return response
        }
        // One webhook-id and one timestamp: a header sent twice would reach the signature check
        // joined ("a, b") and be refused as a bad signature, which sends the partner looking
        // at its secret instead of at whatever repeats the header.
        for name in [HTTPField.Name.webhookID, .webhookTimestamp] {
            let lines = request.headers[values: name].count
            if lines > 1 { throw Problem(.malformed, "\(name.canonicalName): sent \(lines) times; a request carries it once") }
        }
        let bytes = body.readableBytesView
        let id = request.headers[.webhookID]
        if let problem = WebhookSignature.verify(
            id: id, timestamp: request.headers[.webhookTimestamp], signatures: Intake.signatureEntries(request.headers),
            body: bytes, secrets: terms.webhookSecrets, now: clock.now())
        {
            throw problem
        }
        // Charged only for authentic requests, so nobody can spend a partner's rate for it.
        if let wait = limiter.admit(terms.id, now: clock.now()) {
            throw Problem(.rateLimited, "partner \(terms.id) is over its rate of \(terms.ratePerSecond ?? 0) requests/s", retryAfterSeconds: wait)
        }
        guard let webhookID = id.flatMap(WebhookID.init) else {
            throw Problem(.malformed, "webhook-id: must be 1-128 characters of [A-Za-z0-9._:-]")
        }
        let event = try EventParser.parse(bytes)
        let outcome = await writer.post(Submission(partner: terms.id, webhookID: webhookID, event: event))
        metrics.posting(outcome)
        return Responses.outcome(outcome)
    }

    /// Whether the client waits for `100 Continue` before it sends its body.
    static func awaitsContinue(_ request: Request) -> Bool {
        request.headers[.expect]?.lowercased() == "100-continue"
    }

    /// Every `webhook-signature` entry of the request, however many lines carry them (a sender
    /// may send one line per secret): space-separated, as one line would list them.
    static func signatureEntries(_ headers: HTTPFields) -> String? {
        let lines = headers[values: .webhookSignature]
        return lines.isEmpty ? nil : lines.joined(separator: " ")
    }

    /// Everything that can refuse a posting before its body is read, then the body itself,
    /// read up to the limit and no further.
    func admitAndRead(_ request: Request, _ context: ClearhouseContext) async throws -> (PartnerTerms, ByteBuffer) {
        let terms = try partner(context)
        try await requireCertificateRules(context, terms)
        try refuseOtherPartnersToken(request, terms)
        try requireJSON(request)
        if let length = request.headers[.contentLength].flatMap({ Int($0) }), length > Limits.eventBodyBytesMax {
            throw Problem(.tooLarge, "the body is \(length) bytes; at most \(Limits.eventBodyBytesMax) are accepted")
        }
        // A client that waits for `100 Continue` before its body (curl does, past 1 KiB) gets it
        // now, once nothing known before the body refuses it, instead of waiting out its timeout.
        if Intake.awaitsContinue(request), let channel = context.channel {
            try await channel.writeAndFlush(HTTPResponsePart.head(HTTPResponse(status: .continue)))
        }
        var request = request
        return (terms, try await request.collectBody(upTo: Limits.eventBodyBytesMax))
    }

    /// A partner that names `client_cert_sha256` must present that certificate; a connection
    /// presenting another partner's certificate is refused for any partner (403).
    ///
    /// When no partner names a certificate, nothing here can refuse, and the certificate is not
    /// asked for: asking is a hop to the connection's event loop and back for every request.
    func requireCertificateRules(_ context: ClearhouseContext, _ terms: PartnerTerms) async throws(Problem) {
        let presented = try await presentedCertificate(context, terms)
        if let required = terms.clientCertSHA256 {
            guard let presented else {
                throw Problem(.wrongPartner, "partner \(terms.id) must use mutual TLS with its client certificate")
            }
            guard WebhookSignature.constantTimeEquals(presented, required) else {
                throw Problem(.wrongPartner, "the client certificate is not partner \(terms.id)'s")
            }
        }
    }

    /// The SHA-256 of the connection's client certificate (nil: none presented, or none asked
    /// for because no partner names one); another partner's certificate is refused (403) for
    /// any partner.
    private func presentedCertificate(_ context: ClearhouseContext, _ terms: PartnerTerms) async throws(Problem) -> [UInt8]? {
        if certificateOwners.isEmpty && terms.clientCertSHA256 == nil { return nil }
        let presented = await context.clientCertificateSHA256()
        if let presented, let owner = certificateOwners[presented], owner != terms.id {
            throw Problem(.wrongPartner, "this client certificate belongs to another partner")
        }
        return presented
    }

    /// An event is authenticated by its signature and needs no bearer token; but one sent with
    /// another partner's token is refused (403 `wrong-partner`, CONTRACT §3), as a read would be.
    /// Any other `authorization` (this partner's token, or none that is known) changes nothing.
    func refuseOtherPartnersToken(_ request: Request, _ terms: PartnerTerms) throws(Problem) {
        // Every `authorization` line: a second one cannot slip another partner's token past.
        for header in request.headers[values: .authorization] {
            guard let digest = Intake.bearerTokenSHA256(header) else { continue }
            if let owner = tokenOwners[digest], owner != terms.id {
                throw Problem(.wrongPartner, "this token belongs to another partner")
            }
        }
    }

    func requireJSON(_ request: Request) throws(Problem) {
        let type = request.headers[.contentType] ?? ""
        // The media type's essence: before any `;`, without spaces or tabs around it, any case.
        let essence = type.utf8.prefix { $0 != UInt8(ascii: ";") }.drop { $0 == 0x20 || $0 == 0x09 }
        let trimmed = essence.reversed().drop { $0 == 0x20 || $0 == 0x09 }.reversed()
        let lower = { (b: UInt8) -> UInt8 in (0x41...0x5A).contains(b) ? b + 0x20 : b }
        guard trimmed.count == 16, zip(trimmed, "application/json".utf8).allSatisfy({ lower($0) == $1 }) else {
            throw Problem(.unsupportedMediaType, "content-type must be application/json (got \(JSONWriter.quote(type)))")
        }
        // JSON is UTF-8 (RFC 8259 §8.1), and the body is read as such: a charset parameter may
        // only say so.
        if let charset = Intake.charset(of: type), charset != "utf-8" {
            throw Problem(.unsupportedMediaType, "content-type's charset must be utf-8 (got \(JSONWriter.quote(type)))")
        }
        // The body is signed and read as sent: a coded one (gzip) is not decoded, so it is
        // refused as such rather than parsed as broken JSON (RFC 9110 §15.5.16).
        let coding = request.headers[values: .contentEncoding].joined(separator: ",")
        if coding.split(separator: ",").contains(where: { $0.trimmingCharacters(in: .whitespaces).lowercased() != "identity" }) {
            throw Problem(.unsupportedMediaType, "content-encoding \(JSONWriter.quote(coding)) is not accepted: send the JSON body as it is, not encoded")
        }
    }

    /// The `charset` parameter of a media type, lowercased and unquoted; nil when none.
    static func charset(of type: String) -> String? {
        for parameter in type.split(separator: ";").dropFirst() {
            let pair = parameter.split(separator: "=", maxSplits: 1)
            guard pair.count == 2, pair[0].trimmingCharacters(in: .whitespaces).lowercased() == "charset" else { continue }
            var value = pair[1].trimmingCharacters(in: .whitespaces)
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            return value.lowercased()
        }
        return nil
    }

    // MARK: Reads (CONTRACT §4)

    /// The partner a read is for, once its credentials are checked: a bearer token whose
    /// SHA-256 is the partner's `api_token_sha256`, or the partner's client certificate.
    /// Another partner's credentials: 403; none or unknown: 401. Then the partner's rate for
    /// reads (`rate_per_second`, in a bucket apart from its postings'; charged only for reads
    /// with the partner's credentials): 429.
    func authorizeRead(_ request: Request, _ context: ClearhouseContext, for terms: PartnerTerms) async throws(Problem) {
        try await authenticateRead(request, context, for: terms)
        if let wait = readLimiter.admit(terms.id, now: clock.now()) {
            throw Problem(.rateLimited, "partner \(terms.id) is over its rate of \(terms.ratePerSecond ?? 0) reads/s", retryAfterSeconds: wait)
        }
    }

    /// The order: a credential of another partner (its certificate, its token) is 403; no
    /// credential of this partner (none, a token nobody holds, a certificate nobody's) is 401,
    /// with a challenge (CONTRACT §4: "None or wrong: 401"); and once the read is this partner's,
    /// a partner that names `client_cert_sha256` is 403 `wrong-partner` without that
    /// certificate (CONTRACT §3: "a required client certificate missing"), its token notwithstanding.
    /// A token sent beside the partner's certificate must still be valid (a wrong one is 401,
    /// another partner's 403), never ignored.
    private func authenticateRead(_ request: Request, _ context: ClearhouseContext, for terms: PartnerTerms) async throws(Problem) {
        let presented = try await presentedCertificate(context, terms)
        let certified = terms.clientCertSHA256.map { required in
            presented.map { WebhookSignature.constantTimeEquals($0, required) } ?? false
        } ?? false
        let lines = request.headers[values: .authorization].count
        if lines > 1 {
            throw Problem(.unauthorized, "authorization: sent \(lines) times; send one bearer token")
        }
        var tokenValid = false
        if let header = request.headers[.authorization] {
            guard let digest = Intake.bearerTokenSHA256(header) else {
                throw Problem(.unauthorized, "authorization must be \"Bearer <token>\"")
            }
            tokenValid = WebhookSignature.constantTimeEquals(digest, terms.apiTokenSHA256)
            if !tokenValid && tokenOwners[digest] != nil { throw Problem(.wrongPartner, "this token belongs to another partner") }
            guard tokenValid else { throw Problem(.unauthorized, "the bearer token is not valid") }
        }
        guard certified || tokenValid else {
            throw Problem(.unauthorized, "a bearer token or the partner's client certificate is required")
        }
        if terms.clientCertSHA256 != nil && !certified {
            throw Problem(.wrongPartner, presented == nil
                ? "partner \(terms.id) must use mutual TLS with its client certificate"
                : "the client certificate is not partner \(terms.id)'s")
        }
    }

    /// `/metrics` tells traffic, outcomes and queues: it answers connections from this host (a
    /// local agent, the operator's tools; also in-process tests, which have no address), and
    /// others only with the bearer token whose SHA-256 is `metrics_token_sha256`.
    static func metricsAllowed(remote: SocketAddress?, authorization: String?, tokenSHA256: [UInt8]?) -> Bool {
        guard let remote else { return true }
        if AddressLimitHandler.isThisHost(remote) { return true }
        guard let tokenSHA256, let authorization, let digest = bearerTokenSHA256(authorization) else { return false }
        return WebhookSignature.constantTimeEquals(digest, tokenSHA256)
    }

    /// SHA-256 of the token of an `authorization: Bearer <token>` header; nil when the header
    /// is not that (or the token is over `Limits.bearerTokenBytesMax` bytes).
    static func bearerTokenSHA256(_ header: String) -> [UInt8]? {
        let parts = header.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer", !parts[1].isEmpty, parts[1].utf8.count <= Limits.bearerTokenBytesMax else { return nil }
        return Array(SHA256.hash(data: Array(parts[1].utf8)))
    }

    func balance(_ request: Request, _ context: ClearhouseContext) async throws -> Response {
        let terms = try partner(context)
        try await authorizeRead(request, context, for: terms)
        let text = Intake.pathParameter(context, "member")
        guard let member = MemberID(text) else { throw Problem(.malformed, "member: must match ^[A-Za-z0-9._-]{1,64}$") }
        let points = try store.balance(of: member)
        var w = JSONWriter()
        w.string("member", member.rawValue)
        w.int("balance", points.value)
        return Responses.json(200, w.finish())
    }
}



/// One structured log line and one metric sample per request: method, path, status,
/// duration. Never headers or bodies, so no signature, token or secret is ever logged.
struct RequestLogMiddleware<Context: RequestContext>: RouterMiddleware {
    let metrics: IntakeMetrics

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        let response = try await next(request, context)
        let elapsed = ContinuousClock.now - start
        let nanos = elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000
        metrics.request(route: context.endpointPath ?? "unmatched", status: Int(response.status.code), nanoseconds: nanos)
        // Its metadata is made only when the line is written (at `warning`, as under load, it is not).
        guard context.logger.logLevel <= .info else { return response }
        // The route's template and the partner, never the path itself: a path names members
        // (card or account numbers) and runs.
        var metadata: Logger.Metadata = [
            "method": "\(request.method)", "route": "\(context.endpointPath ?? "unmatched")", "status": "\(response.status.code)",
            "ms": "\(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000)",
        ]
        if context.endpointPath != nil, let partner = PartnerID(Intake.pathParameter(context, "partner")) {
            metadata["partner"] = "\(partner)"
        }
        context.logger.info("request", metadata: metadata)
        return response
    }
}
