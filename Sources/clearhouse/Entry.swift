import ClearhouseCLI

/// A thin entry point; the verbs live in ClearhouseCLI so tests can drive them.
@main
extension Clearhouse {}
