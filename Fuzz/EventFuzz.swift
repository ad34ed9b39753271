// libFuzzer harness for what Clearhouse parses from the network (issue 7, point 2): an event
// body (strict JSON shape check, then the event parser), the ids in paths and bodies, and
// RFC 3339 instants. Built by ops/fuzz with `swiftc -sanitize=fuzzer,address` straight from
// Sources/ClearingDomain (Foundation only), so the package build stays as it is.
//
// Properties checked on every input, besides "never crashes, never hangs, never leaks":
// - a body the parser accepts is within the limits (64 KiB, depth 8) and re-parses equal;
// - the fast path (`FastEventParser`) accepts only what the strict path accepts equal;
// - ids accepted are within their length limits and character sets;
// - an instant that parses prints back to a string that parses to the same instant.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let event = try? EventParser.parse(bytes) {
        precondition(bytes.count <= Limits.eventBodyBytesMax, "accepted a body over the limit")
        precondition(event.points.value >= Limits.pointsPerEventMin && event.points.value <= Limits.pointsPerEventMax)
        precondition((try? EventParser.parse(bytes)) == event, "parsing is not deterministic")
    }
    if let fast = FastEventParser.parse(bytes) {
        precondition((try? EventParser.parseStrictly(bytes)) == fast, "the fast path accepted what the strict path answers differently")
    }
    let text = String(decoding: bytes.prefix(256), as: UTF8.self)
    if let p = PartnerID(text) {
        precondition((Limits.partnerIDBytesMin...Limits.partnerIDBytesMax).contains(p.rawValue.utf8.count))
        precondition(!p.rawValue.contains("/") && !p.rawValue.contains(".."), "a partner id that escapes a path")
    }
    if let m = MemberID(text) { precondition(m.rawValue.utf8.count <= Limits.memberIDBytesMax && !m.rawValue.contains("/")) }
    if let r = Reference(text) { precondition(r.rawValue.utf8.count <= Limits.referenceBytesMax) }
    if let w = WebhookID(text) { precondition(w.rawValue.utf8.count <= Limits.webhookIDBytesMax) }
    if let t = Instant(rfc3339: text) {
        precondition(Instant(rfc3339: t.rfc3339) == t, "an instant that does not print back: \(text)")
    }
    return 0
}
