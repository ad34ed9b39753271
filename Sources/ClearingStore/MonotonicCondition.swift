import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A lock with a condition whose timed waits run on the monotonic clock.
///
/// `NSCondition.wait(until:)` takes a wall-clock `Date`; on Linux it becomes a futex wait on
/// `CLOCK_REALTIME` with an absolute deadline, so a step of the wall clock back by Δ (an NTP
/// step, a VM resumed, an operator setting the time) during the wait makes it last Δ longer.
/// The writer's group-commit gather waits that way for 2 ms; stretched to Δ, every posting
/// queued meanwhile would hang and new ones be shed. Here the condition is created with
/// `CLOCK_MONOTONIC`, which never steps.
final class MonotonicCondition: @unchecked Sendable {
    // @unchecked: the pthread objects are used only through pthread calls, which are
    // thread-safe; they live from init to deinit.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        precondition(pthread_mutex_init(mutex, nil) == 0, "pthread_mutex_init")
        var attributes = pthread_condattr_t()
        precondition(pthread_condattr_init(&attributes) == 0, "pthread_condattr_init")
        precondition(pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC) == 0, "pthread_condattr_setclock")
        precondition(pthread_cond_init(cond, &attributes) == 0, "pthread_cond_init")
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    func signal() { pthread_cond_signal(cond) }
    func broadcast() { pthread_cond_broadcast(cond) }

    /// Waits for a signal (the lock held, as for any condition; wake-ups may be spurious).
    func wait() { pthread_cond_wait(cond, mutex) }

    /// The monotonic instant `duration` from now, for `wait(until:)`.
    static func deadline(after duration: Duration) -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let (seconds, attoseconds) = duration.components
        var nanoseconds = Int(now.tv_nsec) + Int(attoseconds / 1_000_000_000)
        var wholeSeconds = Int(now.tv_sec) + Int(seconds)
        wholeSeconds += nanoseconds / 1_000_000_000
        nanoseconds %= 1_000_000_000
        return timespec(tv_sec: wholeSeconds, tv_nsec: nanoseconds)
    }

    /// Waits for a signal until the monotonic `deadline`; false once it has passed.
    func wait(until deadline: timespec) -> Bool {
        var deadline = deadline
        return pthread_cond_timedwait(cond, mutex, &deadline) != ETIMEDOUT
    }
}
