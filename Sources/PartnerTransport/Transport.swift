import Foundation

/// One HTTPS POST to a partner.
public struct OutboundRequest: Sendable {
    public struct Header: Sendable, Equatable {
        public var name: String
        public var value: String
        public init(_ name: String, _ value: String) {
            self.name = name
            self.value = value
        }
    }

    public var url: String
    public var headers: [Header]
    public var body: [UInt8]
    /// PEM file of the CA to trust for this endpoint; nil = the system store.
    public var caFile: String?
    /// PEM client certificate and key to present, if the partner asks for mutual TLS.
    public var clientCertificateFile: String?
    public var clientKeyFile: String?
    /// Only when true may the endpoint resolve to a loopback or private address.
    public var allowPrivateNetworks: Bool
    public var connectTimeoutMilliseconds: Int
    public var totalTimeoutMilliseconds: Int
    /// The most response-body bytes read before the transfer is cut off.
    public var responseBytesMax: Int

    public init(
        url: String, headers: [Header], body: [UInt8], caFile: String? = nil, clientCertificateFile: String? = nil,
        clientKeyFile: String? = nil, allowPrivateNetworks: Bool = false, connectTimeoutMilliseconds: Int,
        totalTimeoutMilliseconds: Int, responseBytesMax: Int
    ) {
        self.url = url
        self.headers = headers
        self.body = body
        self.caFile = caFile
        self.clientCertificateFile = clientCertificateFile
        self.clientKeyFile = clientKeyFile
        self.allowPrivateNetworks = allowPrivateNetworks
        self.connectTimeoutMilliseconds = connectTimeoutMilliseconds
        self.totalTimeoutMilliseconds = totalTimeoutMilliseconds
        self.responseBytesMax = responseBytesMax
    }
}

/// Why a request got no HTTP answer.
public struct TransportFailure: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// The URL is not https, or the request could not be set up.
        case invalidRequest = "invalid-request"
        /// The endpoint resolved to an address notices may not go to.
        case refusedAddress = "refused-address"
        case connect
        case timeout
        /// The server's certificate did not verify, or the TLS handshake failed.
        case tls
        /// The response was longer than the limit.
        case responseTooLarge = "response-too-large"
        /// The sender stopped (cancelled) before the answer came: not the partner's failure.
        case cancelled
        case other
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { "\(kind.rawValue): \(message)" }
}

/// What came back.
public struct OutboundResponse: Sendable, Equatable {
    /// The HTTP status, or the failure when there was none.
    public var result: Result<Int, TransportFailure>
    /// `retry-after` of the response, in seconds, if it had one.
    public var retryAfterSeconds: Int64?
    public var latencyMilliseconds: Int64
    /// "1.1" or "2", when a response came.
    public var httpVersion: String?

    public init(result: Result<Int, TransportFailure>, retryAfterSeconds: Int64? = nil, latencyMilliseconds: Int64, httpVersion: String? = nil) {
        self.result = result
        self.retryAfterSeconds = retryAfterSeconds
        self.latencyMilliseconds = latencyMilliseconds
        self.httpVersion = httpVersion
    }

    public var status: Int? { try? result.get() }
}

/// Sends requests, several at once; the answers come back in the order of the requests.
/// `CurlTransport` is the real one; tests of the delivery schedule use a fake.
public protocol OutboundTransport: Sendable {
    func perform(_ requests: [OutboundRequest]) async -> [OutboundResponse]
}
