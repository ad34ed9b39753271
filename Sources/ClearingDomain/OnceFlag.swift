import Synchronization

/// A flag set once, from any thread, and read by others (a transfer told to stop, a server
/// that began to stop).
public final class OnceFlag: Sendable {
    private let value = Atomic<Bool>(false)
    public init() {}
    public func set() { value.store(true, ordering: .relaxed) }
    public var isSet: Bool { value.load(ordering: .relaxed) }
}
