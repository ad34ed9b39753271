// sqlite3_config for Swift: Swift cannot call C variadics, so each setting the store makes
// gets a small typed wrapper here.
#ifndef CLEARHOUSE_CSQLITECONFIG_SHIM_H
#define CLEARHOUSE_CSQLITECONFIG_SHIM_H

#include <sqlite3.h>

/// Turns off SQLite's memory statistics (SQLITE_CONFIG_MEMSTATUS), which take one
/// process-wide mutex around every allocation SQLite makes. Only effective before SQLite is
/// initialized (the first connection opened); returns SQLITE_MISUSE after.
static inline int ch_sqlite_disable_memstatus(void) { return sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0); }

#endif
