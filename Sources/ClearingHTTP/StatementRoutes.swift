import ClearingDomain
import ClearingStore
import CompressNIO
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import Synchronization

extension HTTPField.Name {
    static let clearhouseSignature = HTTPField.Name("Clearhouse-Signature")!
    static let contentDigest = HTTPField.Name("Content-Digest")!
}

/// The SHA-256 of each statement document already served (runs never change, so neither do
/// they): the signature header is then ready without a first pass over the entries.
final class StatementDigests: Sendable {
    private let digests = Mutex<[String: [UInt8]]>([:])

    func get(_ key: String) -> [UInt8]? { digests.withLock { $0[key] } }

    func put(_ key: String, _ digest: [UInt8]) {
        digests.withLock { d in
            if d.count >= Limits.statementDigestCacheMax { d.removeAll(keepingCapacity: true) }
            d[key] = digest
        }
    }
}

extension Intake {
    // MARK: GET /v1/partners/{partner}/statements

    func statementList(_ request: Request, _ context: ClearhouseContext) async throws -> Response {
        let terms = try partner(context)
        try await authorizeRead(request, context, for: terms)
        let rows = try store.statements(for: terms.id).map { s -> String in
            var w = JSONWriter()
            w.string("run", s.run)
            w.string("cutoff", s.cutoff.rfc3339)
            w.int("net_minor", s.netMinor.value)
            return w.finish()
        }
        return Responses.json(200, "[" + rows.joined(separator: ",") + "]")
    }

    // MARK: GET /v1/partners/{partner}/statements/{run}.csv and .json

    func statementDocument(_ format: StatementFormat) -> @Sendable (Request, ClearhouseContext) async throws -> Response {
        { request, context in
            let terms = try partner(context)
            try await authorizeRead(request, context, for: terms)
            let runID = Intake.pathParameter(context, "run")
            let digits = runID.utf8.dropFirst()
            guard runID.utf8.first == 0x52, (6...18).contains(digits.count), digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                let header = try store.statement(for: terms.id, run: runID)
            else { throw Problem(.notFound, "no run \(JSONWriter.quote(runID))") }
            let gzip = Intake.acceptsGzip(request.headers[.acceptEncoding])
            let etag = "\"\(runID).\(terms.id).\(format.rawValue).v\(StatementFormat.version)\(gzip ? ".gz" : "")\""
            var fields: HTTPFields = [
                .contentType: format.contentType, .eTag: etag, .cacheControl: "private, max-age=31536000, immutable",
                .vary: "Accept-Encoding, Authorization",
            ]
            if let match = request.headers[.ifNoneMatch], Intake.etagMatches(match, etag) {
                return Response(status: .notModified, headers: fields)
            }
            // The signature needs the body's digest before the body goes out: computed by a
            // first pass (memory stays flat) the first time, remembered afterwards.
            let cacheKey = "\(runID)/\(terms.id)/\(format.rawValue)"
            let digest: [UInt8]
            // Whether this request's own first pass checked every row against its hash chain
            // (then the streaming pass is held to that digest alone); with a remembered digest,
            // the streaming pass checks them, so that a row changed since is never sent.
            let rowsChecked: Bool
            if let d = statementDigests.get(cacheKey) {
                digest = d
                rowsChecked = false
            } else {
                rowsChecked = true
                var hasher = SHA256()
                try await store.writeStatement(header, format) { hasher.update(data: Array($0.utf8)) }
                digest = Array(hasher.finalize())
                statementDigests.put(cacheKey, digest)
            }
            // Content-Digest (RFC 9530) is of the bytes as sent, so only on a plain response; the
            // signature header names the plain body's digest either way.
            if !gzip { fields[.contentDigest] = "sha-256=:\(Data(digest).base64EncodedString()):" }
            fields[.clearhouseSignature] = try signer.header(partner: terms.id, run: runID, format: format, sha256: digest)
            if format == .csv {
                fields[.contentDisposition] = "attachment; filename=\"\(terms.id)-\(runID).csv\""
            }
            if gzip { fields[.contentEncoding] = "gzip" }
            let store = self.store
            let logger = context.logger
            let body = ResponseBody { writer in
                let compressor: ZlibCompressor? = gzip ? try ZlibCompressor(algorithm: .gzip) : nil
                var check = SHA256()
                do {
                    try await store.writeStatement(header, format, checked: !rowsChecked) { chunk in
                        check.update(data: Array(chunk.utf8))
                        var buffer = ByteBuffer(string: chunk)
                        if let compressor { buffer = try buffer.compressStream(with: compressor, flush: .sync) }
                        try await writer.write(buffer)
                    }
                } catch let error as StoreError {
                    // A row changed since the digest was made (cut off before that row's batch),
                    // or the store failed: the operator must hear of it, as of a refused one.
                    logger.error("statement cut off", metadata: ["partner": "\(terms.id)", "run": "\(runID)", "detail": "\(error.description)"])
                    throw error
                }
                // The bytes sent must be the bytes signed; if not (never expected), cut the
                // response off before its end (and before gzip's trailer), so the client sees a
                // broken download rather than a complete, wrongly signed one.
                guard Array(check.finalize()) == digest else { throw Problem(.unavailable, "the statement changed while it was sent") }
                if let compressor {
                    var empty = ByteBuffer()
                    try await writer.write(try empty.compressStream(with: compressor, flush: .finish))
                }
                try await writer.finish(nil)
            }
            return Response(status: .ok, headers: fields, body: body)
        }
    }

    /// Whether `accept-encoding` allows gzip: its own entry decides, else `*` does (RFC 9110
    /// §12.5.3: `*;q=0, gzip` allows it, `gzip;q=0, *` does not).
    static func acceptsGzip(_ header: String?) -> Bool {
        guard let header else { return false }
        var wildcard: Bool?
        for part in header.lowercased().split(separator: ",") {
            let items = part.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }
            guard items.first == "gzip" || items.first == "*" else { continue }
            let q = items.dropFirst().first { $0.hasPrefix("q=") }.map { $0.dropFirst(2) }
            let allowed = q.map { Double($0) ?? 0 } ?? 1 > 0
            if items.first == "gzip" { return allowed }
            wildcard = wildcard ?? allowed
        }
        return wildcard ?? false
    }

    static func etagMatches(_ header: String, _ etag: String) -> Bool {
        header.split(separator: ",").contains { item in
            let t = item.trimmingCharacters(in: .whitespaces)
            return t == "*" || t == etag || t == "W/" + etag
        }
    }

    // MARK: GET /v1/keys

    func keys(_ request: Request, _ context: ClearhouseContext) async throws -> Response {
        Response(
            status: .ok, headers: [.contentType: "application/jwk-set+json", .cacheControl: "max-age=300"],
            body: .init(byteBuffer: ByteBuffer(string: signer.jwks)))
    }
}
