import ClearingDomain
import Foundation

/// The repository's root, for scripts the tests run (ops/certs, ops/notice-receiver.py).
public let repositoryRoot = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Development TLS material made by `ops/certs` (a CA, a server certificate for localhost and
/// 127.0.0.1, client certificates); each call makes a new, unrelated CA.
public enum TestCertificates {
    public static func make(in directory: URL) throws {
        let p = Process()
        p.executableURL = repositoryRoot.appendingPathComponent("ops/certs")
        p.arguments = [directory.path]
        p.environment = ProcessInfo.processInfo.environment.merging(["PARTNERS": "fuelco"]) { $1 }
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw ReceiverError("ops/certs failed with status \(p.terminationStatus)") }
    }
}

public struct ReceiverError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// A partner's notice endpoint: `ops/notice-receiver.py` (HTTPS on loopback, each notice
/// verified with the official Python `standardwebhooks` package), run as a child process.
public final class NoticeReceiver: @unchecked Sendable {
    public let port: Int
    public let log: URL
    let process: Process

    /// The Python with `standardwebhooks` (ops/test sets CLEARHOUSE_PYTHON to the venv's).
    public static var python: String {
        ProcessInfo.processInfo.environment["CLEARHOUSE_PYTHON"] ?? repositoryRoot.appendingPathComponent(".venv/bin/python").path
    }

    /// - Parameters:
    ///   - partners: a directory of `<id>.toml` files with each partner's `id` and `notice_secret`.
    ///   - anyTime: accept signatures made on a manual clock far from the real one.
    public init(certificate: URL, key: URL, partners: URL, directory: URL, clientCA: URL? = nil, stallSeconds: Double = 10, anyTime: Bool = true) throws {
        log = directory.appendingPathComponent("receiver-\(UUID().uuidString).jsonl")
        guard FileManager.default.createFile(atPath: log.path, contents: nil) else {
            throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: log.path])
        }
        process = Process()
        process.executableURL = URL(fileURLWithPath: NoticeReceiver.python)
        var args = [
            repositoryRoot.appendingPathComponent("ops/notice-receiver.py").path, "--cert", certificate.path, "--key", key.path,
            "--partners", partners.path, "--log", log.path, "--stall-seconds", String(stallSeconds),
        ]
        if let clientCA { args += ["--client-ca", clientCA.path] }
        if anyTime { args.append("--any-time") }
        process.arguments = args
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.standardError
        try process.run()
        // "listening on https://127.0.0.1:PORT", within 20 s.
        var text = ""
        let deadline = Date().addingTimeInterval(20)
        while !text.contains("\n") && Date() < deadline && process.isRunning {
            text += String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        }
        guard let last = text.split(separator: "\n").first?.split(separator: ":").last, let p = Int(last) else {
            process.terminate()
            throw ReceiverError("the notice receiver did not start (\(NoticeReceiver.python)): \(text)")
        }
        port = p
    }

    public func url(_ mode: String, _ partner: String) -> String { "https://localhost:\(port)/\(mode)/\(partner)" }

    /// Every request received so far, one dictionary per JSON line.
    public func records() -> [[String: Any]] {
        guard let data = FileManager.default.contents(atPath: log.path) else { return [] }
        return String(decoding: data, as: UTF8.self).split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    public func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit { stop() }

    /// Writes `<id>.toml` with each partner's id and notice secret, for the receiver.
    public static func writeSecrets(_ configuration: ClearingConfiguration, to directory: URL) throws {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        for (id, terms) in configuration.partners {
            let text = "id = \"\(id)\"\nnotice_secret = \"whsec_\(Data(terms.noticeSecret.bytes).base64EncodedString())\"\n"
            try text.write(to: directory.appendingPathComponent("\(id).toml"), atomically: true, encoding: .utf8)
        }
    }
}

/// A loopback port nothing listens on (bound, read, closed).
public enum LoopbackPort {
    public static func free() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ReceiverError("socket() failed") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        let named = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        guard bound == 0, named == 0 else { throw ReceiverError("could not find a free port") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}
