import CCurl
import ClearingDomain
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// HTTPS over libcurl's multi interface: every request of a call is in flight at once, on a
/// thread of its own (libcurl's calls block), with TLS verification always on, no redirects
/// followed, https only, the resolved address checked before connecting, explicit connect
/// and total timeouts, and a response-size limit.
public struct CurlTransport: OutboundTransport {
    public init() {
        _ = CurlTransport.globalInit
    }

    /// `curl_global_init` is not thread-safe; Swift runs a static's initializer exactly once.
    private static let globalInit: CURLcode = curl_global_init(Int(CURL_GLOBAL_DEFAULT))

    /// libcurl's version and features, for logs and `--version`.
    public static var version: String { String(cString: curl_version()) }

    /// Cancelling the calling task (the end of `serve`'s grace period) ends the transfers still
    /// running within one poll interval; they answer as failures (the notices are sent again).
    public func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse] {
        if requests.isEmpty { return [] }
        let cancelled = CancelFlag()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let thread = Thread { continuation.resume(returning: CurlTransport.performBlocking(requests, cancelled: cancelled)) }
                thread.name = "clearhouse-curl"
                thread.start()
            }
        } onCancel: {
            cancelled.set()
        }
    }

    /// Set from any thread; read by the transfer loop between polls.
    public typealias CancelFlag = OnceFlag

    /// Runs every request to its end (or until `cancelled` is set) on the calling thread.
    public static func performBlocking(_ requests: [OutboundRequest], cancelled: CancelFlag? = nil) -> [OutboundResponse] {
        _ = globalInit
        let transfers = requests.map(Transfer.init)
        guard let multi = curl_multi_init() else {
            return requests.map { _ in OutboundResponse(result: .failure(TransportFailure(.other, "curl_multi_init failed")), latencyMilliseconds: 0) }
        }
        defer { curl_multi_cleanup(multi) }
        _ = ch_multi_setopt_long(multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, max(1, requests.count))
        for t in transfers where t.response == nil {
            if curl_multi_add_handle(multi, t.easy) != CURLM_OK { t.fail(TransportFailure(.other, "curl_multi_add_handle failed")) }
            else { t.added = true }
        }
        var running: Int32 = 0
        repeat {
            if curl_multi_perform(multi, &running) != CURLM_OK { break }
            collect(multi, transfers)
            if running > 0 { _ = curl_multi_poll(multi, nil, 0, Int32(Limits.curlPollMillisecondsMax), nil) }
        } while running > 0 && !(cancelled?.isSet ?? false)
        collect(multi, transfers)
        let unfinished = cancelled?.isSet == true
            ? TransportFailure(.cancelled, "cancelled: the sender is stopping") : TransportFailure(.other, "the transfer did not finish")
        return transfers.map { t in
            if t.added { curl_multi_remove_handle(multi, t.easy) }
            t.close()
            return t.response ?? OutboundResponse(result: .failure(unfinished), latencyMilliseconds: 0)
        }
    }

    private static func collect(_ multi: UnsafeMutableRawPointer, _ transfers: [Transfer]) {
        var left: Int32 = 0
        while let msg = curl_multi_info_read(multi, &left) {
            guard ch_msg_is_done(msg) != 0, let easy = ch_msg_easy(msg),
                let t = transfers.first(where: { $0.easy == easy })
            else { continue }
            t.finish(ch_msg_result(msg))
        }
    }
}

/// One easy handle and the state its callbacks write to. Only the transfer's thread touches it.
private final class Transfer: @unchecked Sendable {
    let easy: UnsafeMutableRawPointer?
    let request: OutboundRequest
    var headers: UnsafeMutablePointer<curl_slist>?
    let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
    var received = 0
    var tooLarge = false
    var refusedAddress: String?
    var response: OutboundResponse?
    var added = false

    init(_ request: OutboundRequest) {
        self.request = request
        easy = curl_easy_init()
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        guard URLComponents(string: request.url)?.scheme?.lowercased() == "https" else {
            fail(TransportFailure(.invalidRequest, "only https URLs are allowed"))
            return
        }
        guard easy != nil else {
            fail(TransportFailure(.other, "curl_easy_init failed"))
            return
        }
        if let problem = configure() { fail(TransportFailure(.invalidRequest, problem)) }
    }

    /// Sets every option; returns what went wrong, or nil.
    private func configure() -> String? {
        let h = easy
        var failed: String?
        func check(_ code: CURLcode, _ what: String) {
            if code != CURLE_OK, failed == nil { failed = "\(what): \(String(cString: curl_easy_strerror(code)))" }
        }
        check(ch_easy_setopt_string(h, CURLOPT_URL, request.url), "url")
        check(ch_easy_setopt_long(h, CURLOPT_NOSIGNAL, 1), "nosignal")
        check(ch_easy_setopt_pointer(h, CURLOPT_ERRORBUFFER, errorBuffer), "errorbuffer")
        // https only, never a redirect, never a proxy from the environment.
        check(ch_easy_setopt_string(h, CURLOPT_PROTOCOLS_STR, "https"), "protocols")
        check(ch_easy_setopt_string(h, CURLOPT_REDIR_PROTOCOLS_STR, "https"), "redirect protocols")
        check(ch_easy_setopt_long(h, CURLOPT_FOLLOWLOCATION, 0), "followlocation")
        check(ch_easy_setopt_long(h, CURLOPT_MAXREDIRS, 0), "maxredirs")
        check(ch_easy_setopt_string(h, CURLOPT_PROXY, ""), "proxy")
        // TLS: verification always on; 1.2 at least; a configured CA replaces the system store.
        check(ch_easy_setopt_long(h, CURLOPT_SSL_VERIFYPEER, 1), "verifypeer")
        check(ch_easy_setopt_long(h, CURLOPT_SSL_VERIFYHOST, 2), "verifyhost")
        check(ch_easy_setopt_long(h, CURLOPT_SSLVERSION, Int(CURL_SSLVERSION_TLSv1_2)), "sslversion")
        if let ca = request.caFile {
            check(ch_easy_setopt_string(h, CURLOPT_CAINFO, ca), "cainfo")
            check(ch_easy_setopt_string(h, CURLOPT_CAPATH, nil), "capath")
        }
        if let cert = request.clientCertificateFile {
            check(ch_easy_setopt_string(h, CURLOPT_SSLCERT, cert), "sslcert")
            check(ch_easy_setopt_string(h, CURLOPT_SSLCERTTYPE, "PEM"), "sslcerttype")
        }
        if let key = request.clientKeyFile {
            check(ch_easy_setopt_string(h, CURLOPT_SSLKEY, key), "sslkey")
            check(ch_easy_setopt_string(h, CURLOPT_SSLKEYTYPE, "PEM"), "sslkeytype")
        }
        check(ch_easy_setopt_long(h, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS), "http version")
        check(ch_easy_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, max(1, request.connectTimeoutMilliseconds)), "connect timeout")
        check(ch_easy_setopt_long(h, CURLOPT_TIMEOUT_MS, max(1, request.totalTimeoutMilliseconds)), "timeout")
        check(ch_easy_setopt_off(h, CURLOPT_MAXFILESIZE_LARGE, curl_off_t(request.responseBytesMax)), "maxfilesize")
        // The body: libcurl keeps its own copy.
        check(ch_easy_setopt_long(h, CURLOPT_POST, 1), "post")
        check(ch_easy_setopt_off(h, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(request.body.count)), "postfieldsize")
        request.body.withUnsafeBufferPointer { b in
            check(ch_easy_setopt_pointer(h, CURLOPT_COPYPOSTFIELDS, UnsafeMutableRawPointer(mutating: b.baseAddress ?? UnsafePointer(bitPattern: 1)!)), "body")
        }
        // Headers: ours, no `Expect: 100-continue` round trip.
        for header in request.headers + [OutboundRequest.Header("Expect", "")] {
            // Bytes, not Characters: "\r\n" is one Character in Swift.
            guard !header.name.utf8.contains(where: { $0 == 0x3A || $0 < 0x21 || $0 == 0x7F }),
                !header.value.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 })
            else { return "header \(header.name) is not a valid header" }
            headers = curl_slist_append(headers, header.value.isEmpty ? "\(header.name):" : "\(header.name): \(header.value)")
        }
        check(ch_easy_setopt_slist(h, CURLOPT_HTTPHEADER, headers), "headers")
        let me = Unmanaged.passUnretained(self).toOpaque()
        check(ch_easy_setopt_write_function(h, transferWrite), "write function")
        check(ch_easy_setopt_pointer(h, CURLOPT_WRITEDATA, me), "write data")
        check(ch_easy_setopt_opensocket_function(h, transferOpenSocket), "opensocket function")
        check(ch_easy_setopt_pointer(h, CURLOPT_OPENSOCKETDATA, me), "opensocket data")
        return failed
    }

    func fail(_ failure: TransportFailure) {
        if response == nil { response = OutboundResponse(result: .failure(failure), latencyMilliseconds: 0) }
    }

    func finish(_ code: CURLcode) {
        var totalMicroseconds: curl_off_t = 0
        _ = ch_easy_getinfo_off(easy, CURLINFO_TOTAL_TIME_T, &totalMicroseconds)
        let latency = Int64(totalMicroseconds) / 1000
        var answered = 0
        _ = ch_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &answered)
        // An answer whose body was longer than we read still has its status (and retry-after):
        // a 2xx is success (CONTRACT §7), a long 429 or 503 is still what it says.
        let cutOff = tooLarge || code == CURLE_FILESIZE_EXCEEDED
        if code == CURLE_OK || (cutOff && (100...599).contains(answered)) {
            var status = 0
            var retryAfter: curl_off_t = 0
            var version = 0
            _ = ch_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &status)
            _ = ch_easy_getinfo_off(easy, CURLINFO_RETRY_AFTER, &retryAfter)
            _ = ch_easy_getinfo_long(easy, CURLINFO_HTTP_VERSION, &version)
            response = OutboundResponse(
                result: .success(status), retryAfterSeconds: retryAfter > 0 ? Int64(retryAfter) : nil, latencyMilliseconds: latency,
                httpVersion: version == CURL_HTTP_VERSION_2_0 ? "2" : "1.1")
            return
        }
        let detail = String(cString: errorBuffer)
        let message = detail.isEmpty ? String(cString: curl_easy_strerror(code)) : detail
        let failure: TransportFailure
        if let refused = refusedAddress, code == CURLE_COULDNT_CONNECT {
            failure = TransportFailure(.refusedAddress, "notices may not go to \(refused)")
        } else if cutOff {
            failure = TransportFailure(.responseTooLarge, "the response is longer than \(request.responseBytesMax) bytes")
        } else {
            switch code {
            case CURLE_OPERATION_TIMEDOUT: failure = TransportFailure(.timeout, message)
            case CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST: failure = TransportFailure(.connect, message)
            case CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CONNECT_ERROR, CURLE_SSL_CACERT_BADFILE, CURLE_SSL_CERTPROBLEM:
                failure = TransportFailure(.tls, message)
            case CURLE_UNSUPPORTED_PROTOCOL: failure = TransportFailure(.invalidRequest, message)
            default: failure = TransportFailure(.other, "curl error \(code.rawValue): \(message)")
            }
        }
        response = OutboundResponse(result: .failure(failure), latencyMilliseconds: latency)
    }

    func close() {
        if let easy { curl_easy_cleanup(easy) }
        curl_slist_free_all(headers)
        headers = nil
        errorBuffer.deallocate()
    }
}

/// Counts the response body (it is not kept) and cuts the transfer off past the limit.
private let transferWrite: curl_write_callback = { _, size, count, user in
    guard let user else { return 0 }
    let t = Unmanaged<Transfer>.fromOpaque(user).takeUnretainedValue()
    let n = size * count
    t.received += n
    if t.received > t.request.responseBytesMax {
        t.tooLarge = true
        return 0
    }
    return n
}

/// Checks the address libcurl is about to connect to, then opens the socket.
private let transferOpenSocket: curl_opensocket_callback = { user, _, address in
    guard let user, let address else { return CURL_SOCKET_BAD }
    let t = Unmanaged<Transfer>.fromOpaque(user).takeUnretainedValue()
    var bytes = [UInt8](repeating: 0, count: 16)
    let family = ch_sockaddr_address(address, &bytes)
    let ip = family == AF_INET ? IPAddress(bytes: Array(bytes[0..<4])) : family == AF_INET6 ? IPAddress(bytes: bytes) : nil
    guard let ip else {
        t.refusedAddress = "an address of family \(address.pointee.family)"
        return CURL_SOCKET_BAD
    }
    if let reason = AddressPolicy.refusal(ip, allowPrivateNetworks: t.request.allowPrivateNetworks) {
        t.refusedAddress = "\(ip), \(AddressPolicy.withArticle(reason))"
        return CURL_SOCKET_BAD
    }
    return socket(address.pointee.family, address.pointee.socktype, address.pointee.protocol)
}
