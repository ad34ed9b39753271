import ClearhouseCLI
import Foundation

import CSQLiteConfig

#if canImport(Glibc)
import Glibc
#endif

/// A thin entry point; the verbs live in ClearhouseCLI so tests can drive them.
@main
enum Entry {
    static func main() async {
        // Ledgers, journal, keys, backups and exports hold partners' and members' data: owner
        // only, whoever runs the verb (the service's unit sets the same).
        umask(0o077)
        await Clearhouse.main()
        // A verb that succeeded has printed its output into stdio's buffer: written only now, it
        // may fail (a full disk, /dev/full), and an export or a run's figures cut
        // short must not end with exit 0.
        if ch_stdout_failed() != 0 {
            let reason = String(cString: strerror(errno))
            FileHandle.standardError.write(Data("clearhouse: standard output could not be written (\(reason)): the output is incomplete; what the verb did is done\n".utf8))
            exit(1)
        }
    }
}
