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
        // Written in place into one allocation of a bound computed from the fields (the writer
        // hashes every entry it accepts, and `verify` every entry twice): the names and line
        // ends are under 256 bytes, each of the seven integers at most 20 characters.
        let original = event.originalReference?.rawValue ?? ""
        let capacity = 256 + 7 * 20 + partner.rawValue.utf8.count + webhookID.rawValue.utf8.count
            + event.member.rawValue.utf8.count + event.reference.rawValue.utf8.count + original.utf8.count
        return [UInt8](unsafeUninitializedCapacity: capacity) { buffer, count in
            var w = CanonicalWriter(buffer: buffer)
            w.line("clearhouse.entry.v1", "")
            w.line("partner=", partner.rawValue)
            w.line("sequence=", sequence)
            w.line("journal_id=", journalID)
            w.line("webhook_id=", webhookID.rawValue)
            w.line("accepted_at_ms=", acceptedAt.millisecondsSinceEpoch)
            w.line("type=", event.kind.typeName)
            w.line("member=", event.member.rawValue)
            w.line("points=", event.points.value)
            w.line("reference=", event.reference.rawValue)
            w.line("original_reference=", original)
            w.line("occurred_at_ms=", event.occurredAt?.millisecondsSinceEpoch)
            w.line("amount_minor=", event.amountMinor?.value)
            w.line("member_balance=", memberBalance.value)
            count = w.count
        }
    }
}

/// Writes `name=value\n` lines into a buffer its caller sized (`Entry.canonicalBytes`); a
/// line past the end is a programming error, and traps.
private struct CanonicalWriter {
    let buffer: UnsafeMutableBufferPointer<UInt8>
    var count = 0

    init(buffer: UnsafeMutableBufferPointer<UInt8>) { self.buffer = buffer }

    private mutating func append(_ bytes: UnsafeRawBufferPointer) {
        precondition(count + bytes.count <= buffer.count, "canonical encoding past its bound")
        if let source = bytes.baseAddress, bytes.count > 0 {
            UnsafeMutableRawPointer(buffer.baseAddress! + count).copyMemory(from: source, byteCount: bytes.count)
        }
        count += bytes.count
    }

    private mutating func append(_ byte: UInt8) {
        precondition(count < buffer.count, "canonical encoding past its bound")
        buffer[count] = byte
        count += 1
    }

    private mutating func append(_ name: StaticString) {
        append(UnsafeRawBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
    }

    mutating func line(_ name: StaticString, _ value: String) {
        append(name)
        var value = value
        value.withUTF8 { append(UnsafeRawBufferPointer($0)) }
        append(0x0A)
    }

    /// The decimal digits written in place, as `String(value)` spells them (no string made).
    mutating func line(_ name: StaticString, _ value: Int64?) {
        append(name)
        if let value {
            if value < 0 { append(0x2D) }
            var magnitude = value.magnitude
            var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // room for the 20 digits of UInt64.max
            withUnsafeMutableBytes(of: &digits) { d in
                var i = d.count
                repeat {
                    i -= 1
                    d[i] = UInt8(truncatingIfNeeded: magnitude % 10) + 0x30
                    magnitude /= 10
                } while magnitude > 0
                append(UnsafeRawBufferPointer(rebasing: d[i...]))
            }
        }
        append(0x0A)
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
