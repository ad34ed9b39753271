/// The coalition's and partners' terms (CONTRACT §2), as validated values. Loading them from
/// TOML is `ClearingConfig`'s job; everything else reads these.

/// Secret bytes that never print themselves.
public struct SecretBytes: Equatable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var description: String { "<secret \(bytes.count) bytes>" }
}

public struct CoalitionTerms: Equatable, Sendable {
    /// ISO 4217 code, e.g. `EUR`.
    public var currency: String
    /// 0 = points never expire.
    public var pointsExpireAfterDays: Int64
    /// Only when true may a `notice_url` resolve to a loopback or private address.
    public var noticeAllowPrivateNetworks: Bool

    /// The coalition's client certificate and key (PEM paths) presented to partners' notice
    /// endpoints that ask for mutual TLS; nil = none.
    public var noticeClientCertificateFile: String?
    public var noticeClientKeyFile: String?
    /// SHA-256 of the bearer token that lets a scraper off this host read `/metrics`; nil =
    /// `/metrics` answers loopback connections only.
    public var metricsTokenSHA256: [UInt8]?

    public init(
        currency: String, pointsExpireAfterDays: Int64, noticeAllowPrivateNetworks: Bool = false,
        noticeClientCertificateFile: String? = nil, noticeClientKeyFile: String? = nil, metricsTokenSHA256: [UInt8]? = nil
    ) {
        self.currency = currency
        self.pointsExpireAfterDays = pointsExpireAfterDays
        self.noticeAllowPrivateNetworks = noticeAllowPrivateNetworks
        self.noticeClientCertificateFile = noticeClientCertificateFile
        self.noticeClientKeyFile = noticeClientKeyFile
        self.metricsTokenSHA256 = metricsTokenSHA256
    }

    /// When a lot earned at `acceptedAt` expires; nil = never.
    public func lotExpiry(acceptedAt: Instant) throws(ArithmeticOverflow) -> Instant? {
        pointsExpireAfterDays == 0 ? nil : try acceptedAt.adding(days: pointsExpireAfterDays)
    }
}

public struct PartnerTerms: Equatable, Sendable {
    public var id: PartnerID
    public var name: String
    public var issuePricePer1000: MoneyMinor
    public var redeemCreditPer1000: MoneyMinor
    /// Standard Webhooks secrets (the bytes after `whsec_`, base64-decoded); several while rotating.
    public var webhookSecrets: [SecretBytes]
    /// SHA-256 of the partner's bearer token for reads.
    public var apiTokenSHA256: [UInt8]
    public var noticeURL: String
    public var noticeSecret: SecretBytes
    /// When set, this partner must use mutual TLS with the certificate of this SHA-256.
    public var clientCertSHA256: [UInt8]?
    /// A CA (PEM) to trust for the partner's notice endpoint.
    public var noticeCAFile: String?
    /// The partner's sustained request rate; nil = no per-partner limit.
    public var ratePerSecond: Int64?

    public init(
        id: PartnerID, name: String, issuePricePer1000: MoneyMinor, redeemCreditPer1000: MoneyMinor,
        webhookSecrets: [SecretBytes], apiTokenSHA256: [UInt8], noticeURL: String, noticeSecret: SecretBytes,
        clientCertSHA256: [UInt8]? = nil, noticeCAFile: String? = nil, ratePerSecond: Int64? = nil
    ) {
        self.id = id
        self.name = name
        self.issuePricePer1000 = issuePricePer1000
        self.redeemCreditPer1000 = redeemCreditPer1000
        self.webhookSecrets = webhookSecrets
        self.apiTokenSHA256 = apiTokenSHA256
        self.noticeURL = noticeURL
        self.noticeSecret = noticeSecret
        self.clientCertSHA256 = clientCertSHA256
        self.noticeCAFile = noticeCAFile
        self.ratePerSecond = ratePerSecond
    }
}

/// The whole configuration: coalition terms and every partner, by id.
public struct ClearingConfiguration: Equatable, Sendable {
    public var coalition: CoalitionTerms
    public var partners: [PartnerID: PartnerTerms]
    /// What loads but is unwise (a short secret): `partners check` prints it, `serve` logs it.
    public var warnings: [String] = []
    /// The partners directory it was read from, when read from one (to name a file in messages).
    public var directory: String?

    public init(coalition: CoalitionTerms, partners: [PartnerID: PartnerTerms]) {
        self.coalition = coalition
        self.partners = partners
    }

    public var partnerIDs: [PartnerID] { partners.keys.sorted() }
}
