import ClearingDomain
import Foundation
import GRDB
import GRDBSQLite
import Logging
import Synchronization

/// Copies the coalition's WAL into `coalition.sqlite` on its own connection, off the writer's
/// thread.
///
/// SQLite's default (`wal_autocheckpoint`, 1,000 pages) checkpoints inside the COMMIT of the
/// connection that crossed the threshold: for the journal that is the decider, and since one
/// batch writes far more than 1,000 pages it paid a checkpoint (page copies and an fsync of
/// the database file) after nearly every batch, 7 to 8 % of its time (docs/BENCHMARKS.md). With
/// this, the decider's WAL hook only schedules a PASSIVE checkpoint here, which runs on the
/// other core while the next batch is decided (a PASSIVE checkpoint never blocks the writer or
/// readers). Durability is unchanged: a commit is fsynced to the WAL before it returns, and
/// SQLite marks frames as copied only after fsyncing the database file.
///
/// The WAL file can only start over when a write transaction begins with every frame copied,
/// which a background checkpoint, racing a busy writer, never sees. So once the WAL holds
/// `Limits.coalitionWALFramesMax` frames, the writer's hook checkpoints synchronously (by then
/// little is left to copy), and the next transaction rewinds the WAL: its size stays bounded.
final class Checkpointer: Sendable {
    private let connection: DatabaseQueue
    private let queue = DispatchQueue(label: "clearhouse.checkpoint")
    private let state = Mutex(State())
    private let logger: Logger
    /// `Limits.coalitionWALFramesMax` (tests lower it).
    private let framesMax: Int32

    private struct State {
        /// The WAL's frames the last checkpoint found copied (0 after the WAL started over).
        var copied: Int32 = 0
        /// The WAL's frames at the last commit.
        var lastSeen: Int32 = 0
        /// Frames (pages) the writer's commits have appended to the WAL (statistics).
        var framesWritten = 0
        var scheduled = false
        var stopped = false
        /// Checkpoints run here, and by the writer past the frame limit (statistics for benchmarks).
        var background = 0
        var synchronous = 0
        /// The address of the context given to `sqlite3_wal_hook` (one retain of this object),
        /// until `uninstall`; 0 when none.
        var installed: UInt = 0
    }

    init(_ url: URL, framesMax: Int32, logger: Logger) throws {
        precondition(framesMax >= 1)
        self.framesMax = framesMax
        var c = GRDB.Configuration()
        c.label = "checkpoint"
        // FULL: the database file is fsynced before frames count as copied (SQLite's rule for
        // any synchronous level but OFF; stated, not left to the default).
        c.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
        connection = try DatabaseQueue(path: url.path, configuration: c)
        self.logger = logger
    }

    /// Installs the WAL hook on the writer connection (replacing SQLite's autocheckpoint).
    /// The hook holds this object until `uninstall`.
    func install(on db: Database) {
        let context = Unmanaged.passRetained(self).toOpaque()
        // The hook replaced is SQLite's autocheckpoint, whose context is not ours: nothing to release.
        _ = sqlite3_wal_hook(db.sqliteConnection, { context, connection, name, frames in
            guard let context else { return SQLITE_OK }
            let me = Unmanaged<Checkpointer>.fromOpaque(context).takeUnretainedValue()
            me.committed(connection, name, walFrames: frames)
            return SQLITE_OK
        }, context)
        state.withLock { $0.installed = UInt(bitPattern: context) }
    }

    /// Removes the hook (SQLite's default autocheckpoint does not come back: `close` truncates).
    /// Releases this object only if the hook SQLite removes is the one installed here.
    func uninstall(from db: Database) {
        let previous = sqlite3_wal_hook(db.sqliteConnection, nil, nil)
        let installed = state.withLock { s -> UInt in
            defer { s.installed = 0 }
            return s.installed
        }
        if let previous, installed != 0, UInt(bitPattern: previous) == installed {
            Unmanaged<Checkpointer>.fromOpaque(previous).release()
        }
    }

    /// Called by SQLite on the writer's thread after each commit, with the WAL's size in frames.
    private func committed(_ writer: OpaquePointer?, _ name: UnsafePointer<CChar>?, walFrames: Int32) {
        let start = state.withLock { s -> Bool in
            // Within one WAL the frame count only grows with each commit: if it did not,
            // the WAL started over, and nothing of the new one is copied yet.
            let restarted = walFrames <= s.lastSeen
            if restarted { s.copied = 0 }
            s.framesWritten += Int(restarted ? walFrames : walFrames - s.lastSeen)
            s.lastSeen = walFrames
            // Past the frame limit the writer checkpoints itself (below); otherwise as often
            // as SQLite's own autocheckpoint would: every `walCheckpointFramesFrom` new frames
            // (a checkpoint costs an fsync of the database file; small batches under light
            // load must not pay one each).
            if walFrames >= framesMax || s.scheduled || s.stopped || walFrames - s.copied < Limits.walCheckpointFramesFrom {
                return false
            }
            s.scheduled = true
            return true
        }
        if walFrames >= framesMax {
            // Busy (the background one is running) is fine: the next commit tries again.
            if sqlite3_wal_checkpoint_v2(writer, name, SQLITE_CHECKPOINT_PASSIVE, nil, nil) == SQLITE_OK {
                state.withLock { $0.synchronous += 1 }
            }
        } else if start {
            queue.async { self.run() }
        }
    }

    private func run() {
        // Cleared first, so that a commit during this checkpoint schedules the next one.
        let stopped = state.withLock { s -> Bool in
            s.scheduled = false
            return s.stopped
        }
        if stopped { return }
        do {
            let result = try connection.writeWithoutTransaction { try $0.checkpoint(.passive) }
            state.withLock {
                $0.background += 1
                $0.copied = Int32(clamping: result.checkpointedFrameCount)
            }
        } catch {
            // Harmless: the frames stay in the WAL (still durable) for the next checkpoint.
            logger.warning("background checkpoint failed", metadata: ["error": "\(error)"])
        }
    }

    /// Checkpoints run so far: in the background, and by the writer at the frame limit.
    var counts: (background: Int, synchronous: Int) {
        state.withLock { ($0.background, $0.synchronous) }
    }

    /// WAL frames (pages) appended by the writer's commits since it was installed.
    var framesWritten: Int { state.withLock { $0.framesWritten } }

    /// Waits for a running checkpoint, then closes the connection. Call after `uninstall`.
    func stop() throws {
        state.withLock { $0.stopped = true }
        queue.sync {}
        try connection.close()
    }
}
