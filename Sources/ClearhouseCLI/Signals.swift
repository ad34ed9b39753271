import ClearingDomain
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// SIGTERM and SIGINT caught for a verb that must finish or roll back whole (`notices send`,
/// `settle`): each calls `handler` with its number on a dispatch queue, not on Swift's
/// concurrency pool, whose threads the verb's own blocking work may hold. A signal ignored when
/// the process started (SIGINT of a background job) stays ignored, as is the convention.
/// `end()` stops reading them and gives them their default action back.
///
/// (On Linux, libdispatch installs its own handler for a signal it reads; on Darwin the default
/// action is turned off so that kqueue sees it, as swift-service-lifecycle does.)
final class SignalTrap: @unchecked Sendable {
    // @unchecked: `sources` is set in `init` and only read in `end`.
    private var sources: [(Int32, any DispatchSourceSignal)] = []

    init(_ handler: @escaping @Sendable (Int32) -> Void) {
        let registered = DispatchSemaphore(value: 0)
        for number in [SIGTERM, SIGINT] {
            var current = sigaction()
            if sigaction(number, nil, &current) == 0,
                unsafeBitCast(current.__sigaction_handler.sa_handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self)
            {
                continue
            }
            #if canImport(Darwin)
            signal(number, SIG_IGN)
            #endif
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { handler(number) }
            // Registration is asynchronous: a signal sent before it would take its default action.
            source.setRegistrationHandler { registered.signal() }
            source.resume()
            sources.append((number, source))
        }
        for _ in sources { _ = registered.wait(timeout: .now() + .milliseconds(Limits.signalWaitMillisecondsMax)) }
    }

    func end() {
        for (number, source) in sources {
            source.cancel()
            signal(number, SIG_DFL)
        }
    }
}
