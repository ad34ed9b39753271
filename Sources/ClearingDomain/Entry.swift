/// One accepted ledger entry: the event as the coalition accepted it, with its place in the
/// partner's ledger and in the coalition's global acceptance order.
public struct Entry: Equatable, Sendable {
    public var journalID: Int64
    public var partner: PartnerID
    public var sequence: Int64
    public var webhookID: WebhookID
    public var acceptedAt: Instant
    public var event: Event
    /// The member's spendable balance right after this entry, at its acceptance time.
    public var memberBalance: Points

    public init(
        journalID: Int64, partner: PartnerID, sequence: Int64, webhookID: WebhookID, acceptedAt: Instant,
        event: Event, memberBalance: Points
    ) {
        self.journalID = journalID
        self.partner = partner
        self.sequence = sequence
        self.webhookID = webhookID
        self.acceptedAt = acceptedAt
        self.event = event
        self.memberBalance = memberBalance
    }

    /// The success body of CONTRACT §3, keys in a fixed order so that a replay returns the
    /// original body byte for byte.
    public var responseJSON: String {
        var w = JSONWriter()
        w.string("partner", partner.rawValue)
        w.int("sequence", sequence)
        w.string("type", event.kind.typeName)
        w.string("member", event.member.rawValue)
        w.int("points", event.points.value)
        w.string("reference", event.reference.rawValue)
        if let o = event.originalReference { w.string("original_reference", o.rawValue) }
        w.string("accepted_at", acceptedAt.rfc3339)
        w.int("member_balance", memberBalance.value)
        return w.finish()
    }

    /// The bytes the hash chain covers. Every field, in a fixed order, each as
    /// `name=value\n`; the values' alphabets exclude `\n`, so the encoding is unambiguous.
    public var canonicalBytes: [UInt8] {
        // Built byte by byte (one allocation): the writer hashes every entry it accepts.
        var b: [UInt8] = []
        b.reserveCapacity(512)
        func line(_ name: StaticString, _ value: some StringProtocol) {
            b.append(contentsOf: UnsafeBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
            b.append(contentsOf: value.utf8)
            b.append(0x0A)
        }
        func line(_ name: StaticString, _ value: Int64?) {
            // The decimal digits written in place, as `String(value)` spells them (no string made).
            b.append(contentsOf: UnsafeBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
            if let value {
                if value < 0 { b.append(0x2D) }
                var magnitude = value.magnitude
                var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // room for the 20 digits of UInt64.max
                withUnsafeMutableBytes(of: &digits) { buffer in
                    var i = buffer.count
                    repeat {
                        i -= 1
                        buffer[i] = UInt8(truncatingIfNeeded: magnitude % 10) + 0x30
                        magnitude /= 10
                    } while magnitude > 0
                    b.append(contentsOf: buffer[i...])
                }
            }
            b.append(0x0A)
        }
        line("clearhouse.entry.v1", "")
        line("partner=", partner.rawValue)
        line("sequence=", sequence)
        line("journal_id=", journalID)
        line("webhook_id=", webhookID.rawValue)
        line("accepted_at_ms=", acceptedAt.millisecondsSinceEpoch)
        line("type=", event.kind.typeName)
        line("member=", event.member.rawValue)
        line("points=", event.points.value)
        line("reference=", event.reference.rawValue)
        line("original_reference=", event.originalReference?.rawValue ?? "")
        line("occurred_at_ms=", event.occurredAt?.millisecondsSinceEpoch)
        line("amount_minor=", event.amountMinor?.value)
        line("member_balance=", memberBalance.value)
        return b
    }
}

/// What posting one event came to.
public enum PostingOutcome: Equatable, Sendable {
    /// A new entry, durable in the journal and the partner's ledger (HTTP 201).
    case created(Entry)
    /// The same webhook id, or the same reference with the same content, again: the
    /// original entry, unchanged (HTTP 200).
    case replayed(Entry)
    /// Refused; nothing was written.
    case rejected(Problem)

    public var httpStatus: Int {
        switch self {
        case .created: 201
        case .replayed: 200
        case .rejected(let p): p.status
        }
    }

    /// The response body: the entry or the problem document.
    public var bodyJSON: String {
        switch self {
        case .created(let e), .replayed(let e): e.responseJSON
        case .rejected(let p): p.json
        }
    }
}
