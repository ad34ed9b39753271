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
/// `bytes` (0 turns it off; the buffer is flushed before any other use of the file and at
/// every sync). ONLY for a connection whose every commit syncs its WAL (synchronous = FULL
/// or EXTRA): the buffer is flushed at that sync, before the commit is published to other
/// connections. Returns SQLITE_OK, or SQLITE_NOTFOUND when the connection was not opened
/// through the layer (opened before ch_wal_buffer_register).
int ch_wal_buffer_enable(sqlite3 *db, int bytes);

/// Statistics of this connection's WAL gathering since it opened: writes gathered, and the
/// writes of the buffer to the file (flushes). SQLITE_NOTFOUND if not opened through the layer.
int ch_wal_buffer_stats(sqlite3 *db, long long *gathered, long long *flushes);

/// For tests: the next `count` writes of this connection's WAL buffer fail as an I/O error
/// would (the buffer is dropped, nothing written), to show that the commit then fails.
int ch_wal_buffer_fail_flushes(sqlite3 *db, int count);

#endif
