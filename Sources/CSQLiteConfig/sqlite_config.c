#include "CSQLiteConfig.h"
#include <stdio.h>

int ch_sqlite_disable_memstatus(void) { return sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0); }

int ch_stdout_failed(void) { return fflush(stdout) != 0 || ferror(stdout) != 0; }
