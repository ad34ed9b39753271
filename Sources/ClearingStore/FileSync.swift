import ClearingDomain
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Files that must survive a power loss once a verb says they are written: the statement key,
/// a backup's files. SQLite syncs its own databases; these are the few files written outside
/// it.
public enum FileSync {
    /// The file's permission bits when a group or others may read or write it; nil when only
    /// its owner may (or it cannot be read).
    public static func modeOpenToOthers(_ path: String) -> Int? {
        guard let mode = (try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? Int, mode & 0o077 != 0 else {
            return nil
        }
        return mode
    }

    /// Whether `path` (which need not exist yet) lies in `directory` or below it, links
    /// resolved: the deepest part of `path` that exists is resolved, the rest appended.
    public static func lies(_ path: URL, inside directory: URL) -> Bool {
        guard let dir = realPath(directory.standardizedFileURL.path) else { return false }
        var existing = path.standardizedFileURL
        var rest: [String] = []
        while realPath(existing.path) == nil, existing.path != "/" {
            rest.insert(existing.lastPathComponent, at: 0)
            existing = existing.deletingLastPathComponent()
        }
        guard let base = realPath(existing.path) else { return false }
        let full = ([base == "/" ? "" : base] + rest).joined(separator: "/")
        return full == dir || full.hasPrefix(dir == "/" ? "/" : dir + "/")
    }

    /// `path` with links and `..` resolved by the file system; nil when it does not exist.
    public static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// Makes `directory`'s entries (files created or renamed in it) durable.
    public static func directory(_ directory: URL) throws {
        let fd = open(directory.path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError("cannot open \(directory.path) to sync it (\(String(cString: strerror(errno))))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw StoreError("cannot sync \(directory.path) (\(String(cString: strerror(errno))))") }
    }

    /// Writes `bytes` to `file` only if no file is there, atomically: into a temporary file
    /// beside it (mode `mode`), synced, then linked to its name (so a crash leaves either no
    /// file or the whole one, never a short one), and the directory synced. False when a file
    /// was already there (another process won); that file is left as it is.
    public static func createWhole(_ file: URL, _ bytes: [UInt8], mode: mode_t) throws -> Bool {
        let directory = file.deletingLastPathComponent()
        let temporary = directory.appendingPathComponent(".\(file.lastPathComponent).\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp")
        let fd = open(temporary.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw StoreError("cannot create \(temporary.path) (\(String(cString: strerror(errno))))") }
        defer { unlink(temporary.path) }
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = written == bytes.count && fsync(fd) == 0
        let reason = String(cString: strerror(errno))
        close(fd)
        guard synced else { throw StoreError("cannot write \(temporary.path) (\(reason))") }
        if link(temporary.path, file.path) != 0 {
            if errno == EEXIST { return false }
            throw StoreError("cannot create \(file.path) (\(String(cString: strerror(errno))))")
        }
        try FileSync.directory(directory)
        return true
    }

    /// Copies `source` to `target` (which must not exist), owner-only, and syncs the copy; the
    /// caller syncs the directory once its files are all there.
    public static func copyWhole(_ source: URL, to target: URL) throws {
        let input = open(source.path, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw StoreError("cannot open \(source.path) (\(String(cString: strerror(errno))))") }
        defer { close(input) }
        let output = open(target.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw StoreError("cannot create \(target.path) (\(String(cString: strerror(errno))))") }
        defer { close(output) }
        var buffer = [UInt8](repeating: 0, count: Limits.fileCopyChunkBytes)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if count == 0 { break }
            guard count > 0 else {
                if errno == EINTR { continue }
                throw StoreError("cannot read \(source.path) (\(String(cString: strerror(errno))))")
            }
            var done = 0
            while done < count {
                let wrote = buffer.withUnsafeBytes { write(output, $0.baseAddress! + done, count - done) }
                guard wrote > 0 else {
                    if wrote < 0 && errno == EINTR { continue }
                    throw StoreError("cannot write \(target.path) (\(String(cString: strerror(errno))))")
                }
                done += wrote
            }
        }
        guard fsync(output) == 0 else { throw StoreError("cannot sync \(target.path) (\(String(cString: strerror(errno))))") }
    }
}

extension Store {
    /// What the file system under the data directory says after a storage error, for the log:
    /// SQLite often reports a full disk or a read-only one as "disk I/O error". Asks the file
    /// system (free space), then tries a one-byte write of a probe file (removed again). Nil
    /// when nothing is wrong there.
    public func diskCondition() -> String? {
        let dir = dataDirectory.path
        var st = statvfs()
        if statvfs(dir, &st) == 0 {
            if st.f_flag & UInt(ST_RDONLY) != 0 { return "the file system holding \(dir) is read-only" }
            let free = UInt64(st.f_bavail) * UInt64(st.f_frsize)
            if free < UInt64(Limits.diskFullBytes) { return "the disk holding \(dir) is full (\(free) bytes free)" }
        }
        let probe = dataDirectory.appendingPathComponent(".disk-probe-\(getpid())").path
        let fd = open(probe, O_CREAT | O_WRONLY | O_TRUNC, 0o600)
        var failure = fd < 0 ? errno : 0
        if fd >= 0 {
            var byte: UInt8 = 0
            if write(fd, &byte, 1) != 1 || fsync(fd) != 0 { failure = errno }
            Glibc.close(fd)
            unlink(probe)
        }
        switch failure {
        case 0: return nil
        case EROFS: return "the file system holding \(dir) is read-only"
        case ENOSPC, EDQUOT: return "the disk holding \(dir) is full"
        default: return "a test write into \(dir) fails: \(String(cString: strerror(failure)))"
        }
    }
}
