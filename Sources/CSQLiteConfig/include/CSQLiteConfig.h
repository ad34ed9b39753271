// Process-wide SQLite settings for the store, in C: Swift cannot call C variadics
// (sqlite3_config, sqlite3_file_control's arguments) nor implement a VFS comfortably.
#ifndef CLEARHOUSE_CSQLITECONFIG_H
#define CLEARHOUSE_CSQLITECONFIG_H

#include <sqlite3.h>

/// Turns off SQLite's memory statistics (SQLITE_CONFIG_MEMSTATUS), which take one
/// process-wide mutex around every allocation SQLite makes. Only effective before SQLite is
/// initialized (the first connection opened); returns SQLITE_MISUSE after.
int ch_sqlite_disable_memstatus(void);

/// Registers, as SQLite's default VFS, a thin layer over the platform's default VFS ("unix")
/// that can gather a connection's WAL writes into one buffer (see wal_buffer.c). Every
/// connection opened afterwards goes through it; gathering is off until a connection asks
/// for it with ch_wal_buffer_enable. Idempotent; returns SQLITE_OK or SQLite's error.
int ch_wal_buffer_register(void);

/// Asks that the WAL of this connection's main database be written through a buffer of
/// `bytes` (0 turns it off). The buffer is written out before any other use of the file, at
/// every sync, before each commit is published to other connections, and before the WAL's
/// write lock is released; gathering stays off if the file lacks powersafe overwrite. Meant
/// for a connection that syncs every commit (synchronous = FULL): then what a returned
/// commit leaves on disk is exactly what it would be without the layer. Returns SQLITE_OK,
/// or SQLITE_NOTFOUND when the connection was not opened through the layer (opened before
/// ch_wal_buffer_register).
int ch_wal_buffer_enable(sqlite3 *db, int bytes);

/// Statistics of this connection's WAL gathering since it opened: writes gathered, and the
/// writes of the buffer to the file (flushes). SQLITE_NOTFOUND if not opened through the layer.
int ch_wal_buffer_stats(sqlite3 *db, long long *gathered, long long *flushes);

/// For tests: the next `count` writes of this connection's WAL buffer fail as an I/O error
/// would (the buffer is dropped, nothing written), to show that the commit then fails.
int ch_wal_buffer_fail_flushes(sqlite3 *db, int count);

/// Writes out what stdio still holds for standard output; nonzero if that, or any earlier
/// write to it, failed (a full disk, a closed pipe). Here because Swift 6 refuses to touch
/// the C global `stdout`.
int ch_stdout_failed(void);

#endif
