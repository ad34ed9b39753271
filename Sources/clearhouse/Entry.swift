import ClearhouseCLI

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
    }
}
