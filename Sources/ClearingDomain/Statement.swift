import Foundation

/// Partner statements (CONTRACT §8): what a partner was charged or credited in a run, and why.

/// One partner's statement of one run: the notice's figures, the flows that touch the partner,
/// and where its entries lie in its ledger.
public struct StatementHeader: Equatable, Sendable {
    public var notice: SettlementNotice
    /// The run's flows in which this partner is the issuer or the redeemer.
    public var flows: [Flow]
    public var entryCount: Int64
    /// The ledger sequences of the run's entries (nil when it has none).
    public var firstSequence: Int64?
    public var lastSequence: Int64?
    /// Whether the run recorded which lots it expired (runs closed before `v17-run-expiries`
    /// recorded only `expired_points`).
    public var expiredLotsRecorded: Bool
    /// The run's number, for reading its expired lots.
    public var runNumber: Int64

    public init(
        notice: SettlementNotice, flows: [Flow], entryCount: Int64, firstSequence: Int64?, lastSequence: Int64?,
        expiredLotsRecorded: Bool = true, runNumber: Int64 = 0
    ) {
        self.notice = notice
        self.flows = flows
        self.entryCount = entryCount
        self.firstSequence = firstSequence
        self.lastSequence = lastSequence
        self.expiredLotsRecorded = expiredLotsRecorded
        self.runNumber = runNumber
    }

    public var partner: PartnerID { notice.figures.partner }
    public var run: String { notice.run }
}

/// The two statement documents, written piece by piece so that a large one streams.
public enum StatementFormat: String, Sendable, CaseIterable {
    case csv, json

    public var contentType: String {
        switch self {
        case .csv: "text/csv; charset=utf-8; header=present"
        case .json: "application/json"
        }
    }

    /// Bumped whenever the documents' bytes change (part of the ETag; the signed manifest
    /// names the body's digest, which changes with them).
    /// 3: the JSON document lists the lots the run expired (2: CSV lines end in LF; 1: CRLF).
    public static let version = "3"

    public static let csvHeader = "sequence,accepted_at,occurred_at,type,member,points,reference,original_reference,amount_minor\n"

    /// One CSV row: LF line ends (what `split("\n")`, `wc -l` and most tools expect; RFC 4180
    /// readers take them too), fields quoted as RFC 4180 says when they hold a comma, a quote,
    /// CR or LF, with quotes doubled. Ids are restricted to `[A-Za-z0-9._:-]`, so quoting is a
    /// safeguard rather than a need.
    public static func csvRow(_ e: Entry) -> String {
        var fields: [String] = []
        fields.reserveCapacity(9)
        fields.append(String(e.sequence))
        fields.append(e.acceptedAt.rfc3339)
        fields.append(e.event.occurredAt?.rfc3339 ?? "")
        fields.append(e.event.kind.typeName)
        fields.append(e.event.member.rawValue)
        fields.append(String(e.event.points.value))
        fields.append(e.event.reference.rawValue)
        fields.append(e.event.originalReference?.rawValue ?? "")
        fields.append(e.event.amountMinor.map { String($0.value) } ?? "")
        return fields.map(csvField).joined(separator: ",") + "\n"
    }

    public static func csvField(_ s: String) -> String {
        guard s.utf8.contains(where: { $0 == 0x2C || $0 == 0x22 || $0 == 0x0D || $0 == 0x0A }) else { return s }
        return "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    /// The JSON document is `{<figures>,"flows":[...],"entries":[` + entries +
    /// `],"expired":[` + expired lots + `]}` (`"expired":null` for a run that did not record them).
    public static func jsonOpening(_ h: StatementHeader) -> String {
        var figures = h.notice.figuresJSON
        figures.removeLast()  // the closing brace: flows and entries follow
        return figures + ",\"entry_count\":\(h.entryCount),\"flows\":[" + h.flows.map(\.json).joined(separator: ",") + "],\"entries\":["
    }

    /// Between the entries and the expired lots.
    public static func jsonExpiredOpening(_ h: StatementHeader) -> String {
        h.expiredLotsRecorded ? "],\"expired\":[" : "],\"expired\":null"
    }

    public static func jsonClosing(_ h: StatementHeader) -> String {
        h.expiredLotsRecorded ? "]}" : "}"
    }

    /// One lot of the partner's that the run expired: its earn (the partner's own ledger
    /// sequence, time and reference), the member, and the points it gave up.
    public static func jsonExpired(_ e: ExpiredLot) -> String {
        var w = JSONWriter()
        w.int("sequence", e.sequence)
        w.string("accepted_at", e.acceptedAt.rfc3339)
        w.string("member", e.member.rawValue)
        w.string("reference", e.reference.rawValue)
        w.int("points", e.points.value)
        return w.finish()
    }

    public static func jsonEntry(_ e: Entry) -> String {
        var w = JSONWriter()
        w.int("sequence", e.sequence)
        w.string("accepted_at", e.acceptedAt.rfc3339)
        if let o = e.event.occurredAt { w.string("occurred_at", o.rfc3339) } else { w.null("occurred_at") }
        w.string("type", e.event.kind.typeName)
        w.string("member", e.event.member.rawValue)
        w.int("points", e.event.points.value)
        w.string("reference", e.event.reference.rawValue)
        if let o = e.event.originalReference { w.string("original_reference", o.rawValue) } else { w.null("original_reference") }
        if let a = e.event.amountMinor { w.int("amount_minor", a.value) } else { w.null("amount_minor") }
        return w.finish()
    }
}

/// A lot a run expired, as its issuer's statement shows it.
public struct ExpiredLot: Equatable, Sendable {
    /// The earn's sequence in the issuer's ledger.
    public var sequence: Int64
    public var acceptedAt: Instant
    public var member: MemberID
    public var reference: Reference
    public var points: Points

    public init(sequence: Int64, acceptedAt: Instant, member: MemberID, reference: Reference, points: Points) {
        self.sequence = sequence
        self.acceptedAt = acceptedAt
        self.member = member
        self.reference = reference
        self.points = points
    }
}
