// A VFS layer that gathers a connection's WAL writes into one buffer.
//
// Why: a WAL commit writes every dirty page as one frame, and SQLite writes each frame with
// two pwrite calls (its 24-byte header, then the page). The clearing writer's group commit
// dirties thousands of pages, so a commit is thousands of system calls, which the profile
// showed as a large part of COMMIT. The frames of one commit are contiguous in the WAL file;
// this layer copies them into one buffer and writes it with one call when the buffer is
// full and, at the latest, when SQLite syncs the WAL.
//
// Why it is safe (the order of bytes on disk and what other connections can see is
// unchanged):
//   - Only contiguous writes are gathered: a write that does not continue the buffer first
//     writes the buffer out, then itself, so bytes reach the file in SQLite's order.
//   - Every other use of the file (read, size, truncate, file control, close, sync) first
//     writes the buffer out, so SQLite itself never sees the file without its own writes.
//   - Other connections read only frames a commit has published in the WAL index. SQLite
//     publishes right after a memory barrier on the database file, and the layer writes the
//     buffer out at that barrier; under FULL the commit's sync, just before, already did.
//     Gathering is off where SQLite would write after that sync (no powersafe overwrite).
//   - Before the WAL's write lock is released, the buffer is written out, so frames of a
//     transaction that rolled back cannot reach the file after another writer's commit.
//   - A failed write of the buffer is returned as SQLITE_IOERR_WRITE (which makes SQLite roll
//     back the whole transaction) by the call that made it; where that call cannot return
//     an error (a barrier, an unlock), by the next sync. So a commit never succeeds over
//     frames that were not written, and an error already reported is not reported again
//     (a later commit whose frames were all written is never failed by it).
// Gathering is off for every file until the connection asks for it; then it applies to the
// WAL of that connection's main database only (never the database file, whose writes are
// random and made by checkpoints).
#include "CSQLiteConfig.h"

#include <string.h>

// The op code of the file control that turns gathering on (SQLite passes codes it does not
// know to the VFS; it reserves the small ones for itself).
#define CH_FCNTL_WAL_BUFFER 0x43480001
#define CH_FCNTL_WAL_BUFFER_STATS 0x43480002
#define CH_FCNTL_WAL_BUFFER_FAIL 0x43480003
// The most one write to the underlying file carries.
#define CH_WRITE_MAX 0x10000

typedef struct WBFile WBFile;
struct WBFile {
    sqlite3_file base;    // pMethods = &wbMethods
    sqlite3_file *real;   // the underlying file, allocated right after this struct
    WBFile *mainDb;       // for a WAL: its main database file (while both are open)
    WBFile *wal;          // for a main database: its open WAL, if any
    int walBufferBytes;   // for a main database: the capacity its WAL should gather into
    long long gathered;   // for a main database: writes its WALs gathered, since open
    long long flushes;    //   and the writes of the buffer to the file
    int failFlushes;      //   and how many of the next such writes fail (tests)
    int isWal;
    int capacity;         // for a WAL: 0 = gathering off
    unsigned char *buffer;
    int used;
    sqlite3_int64 start;  // file offset of buffer[0]
    int deferredError;    // a failed write of the buffer not yet reported by a sync
};

static sqlite3_vfs *root;
static sqlite3_vfs layer;
static sqlite3_io_methods wbMethods;

static int flushBufferAndDefer(WBFile *p, int defer) {
    if (p->used == 0) return SQLITE_OK;
    int n = p->used;
    p->used = 0;
    int rc = SQLITE_OK;
    if (p->mainDb) {
        p->mainDb->flushes++;
        if (p->mainDb->failFlushes > 0) {
            p->mainDb->failFlushes--;
            rc = SQLITE_IOERR_WRITE;  // injected: the buffer is dropped, as a failed write leaves it
        }
    }
    // In pieces: SQLite's unix VFS writes at most 128 KiB per call (it masks the length).
    for (int done = 0; done < n && rc == SQLITE_OK; done += CH_WRITE_MAX) {
        int piece = n - done < CH_WRITE_MAX ? n - done : CH_WRITE_MAX;
        rc = p->real->pMethods->xWrite(p->real, p->buffer + done, piece, p->start + done);
    }
    if (rc == SQLITE_OK) return SQLITE_OK;
    // Reported as an I/O error whatever the cause (a full disk included), because SQLite
    // answers an I/O error by rolling back the whole transaction, where a full disk may
    // roll back only the statement whose call happened to write the buffer out; and
    // remembered, so that the next sync fails even if this call's error went unheeded.
    if (defer && p->deferredError == SQLITE_OK) p->deferredError = SQLITE_IOERR_WRITE;
    return SQLITE_IOERR_WRITE;
}

// From a call that returns its result to SQLite: the error is reported there, not again.
static int flushBuffer(WBFile *p) { return flushBufferAndDefer(p, 0); }
// From a call that cannot report one (a barrier, an unlock): deferred to the next sync.
static int flushDeferred(WBFile *p) { return flushBufferAndDefer(p, 1); }

// When the WAL write lock is released, the buffer can only hold frames no commit published
// (a commit's sync wrote its own out and reported any failure): they are written out, so
// that they cannot land later on frames another writer commits, and a failure to write them
// fails nothing.
static void releaseBuffer(WBFile *wal) {
    if (wal->used == 0) return;
    flushDeferred(wal);
    wal->deferredError = SQLITE_OK;
}

// Gathering needs "powersafe overwrite" (SQLite's default on unix): without it, SQLite pads
// each commit to a sector boundary and writes the end of the padding after the WAL's sync,
// which the buffer would then hold past the commit's publication.
static int gatheringAllowed(WBFile *mainDb) {
    int caps = mainDb->real->pMethods->xDeviceCharacteristics(mainDb->real);
    return (caps & SQLITE_IOCAP_POWERSAFE_OVERWRITE) != 0;
}

static void setCapacity(WBFile *wal, int bytes) {
    if (bytes < 0 || !wal->mainDb || !gatheringAllowed(wal->mainDb)) bytes = 0;
    flushDeferred(wal);
    if (bytes != wal->capacity) {
        sqlite3_free(wal->buffer);
        wal->buffer = NULL;
        wal->capacity = bytes;
    }
}

static int wbClose(sqlite3_file *f) {
    WBFile *p = (WBFile *)f;
    int rc = flushBuffer(p);
    sqlite3_free(p->buffer);
    p->buffer = NULL;
    if (p->isWal && p->mainDb) p->mainDb->wal = NULL;
    if (!p->isWal && p->wal) p->wal->mainDb = NULL;
    int rc2 = p->real->pMethods->xClose(p->real);
    return rc != SQLITE_OK ? rc : rc2;
}

static int wbRead(sqlite3_file *f, void *data, int n, sqlite3_int64 offset) {
    WBFile *p = (WBFile *)f;
    if (p->used > 0 && offset < p->start + p->used && offset + n > p->start) {
        int rc = flushBuffer(p);
        if (rc != SQLITE_OK) return rc;
    }
    return p->real->pMethods->xRead(p->real, data, n, offset);
}

static int wbWrite(sqlite3_file *f, const void *data, int n, sqlite3_int64 offset) {
    WBFile *p = (WBFile *)f;
    if (p->capacity == 0) return p->real->pMethods->xWrite(p->real, data, n, offset);
    if (p->used > 0 && offset == p->start + p->used && n <= p->capacity - p->used) {
        memcpy(p->buffer + p->used, data, (size_t)n);
        p->used += n;
        if (p->mainDb) p->mainDb->gathered++;
        return SQLITE_OK;
    }
    int rc = flushBuffer(p);
    if (rc != SQLITE_OK) {
        // Reported to the pager, which fails the transaction on a write error: not deferred.
        p->deferredError = SQLITE_OK;
        return rc;
    }
    if (n >= p->capacity) return p->real->pMethods->xWrite(p->real, data, n, offset);
    if (p->buffer == NULL) {
        p->buffer = sqlite3_malloc(p->capacity);
        if (p->buffer == NULL) return p->real->pMethods->xWrite(p->real, data, n, offset);
    }
    memcpy(p->buffer, data, (size_t)n);
    p->used = n;
    p->start = offset;
    if (p->mainDb) p->mainDb->gathered++;
    return SQLITE_OK;
}

static int wbTruncate(sqlite3_file *f, sqlite3_int64 size) {
    WBFile *p = (WBFile *)f;
    int rc = flushBuffer(p);
    if (rc != SQLITE_OK) return rc;
    return p->real->pMethods->xTruncate(p->real, size);
}

static int wbSync(sqlite3_file *f, int flags) {
    WBFile *p = (WBFile *)f;
    // This sync's own write-out error, else one deferred from a call that could not report it.
    int rc = flushBuffer(p);
    if (rc == SQLITE_OK) rc = p->deferredError;
    p->deferredError = SQLITE_OK;
    if (rc != SQLITE_OK) return rc;
    return p->real->pMethods->xSync(p->real, flags);
}

static int wbFileSize(sqlite3_file *f, sqlite3_int64 *size) {
    WBFile *p = (WBFile *)f;
    int rc = flushBuffer(p);
    if (rc != SQLITE_OK) return rc;
    return p->real->pMethods->xFileSize(p->real, size);
}

static int wbLock(sqlite3_file *f, int level) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xLock(p->real, level);
}

static int wbUnlock(sqlite3_file *f, int level) {
    WBFile *p = (WBFile *)f;
    // The end of a transaction on the database file; in exclusive locking mode (no shared WAL
    // index, so no xShmLock) the only point before other connections may use the WAL.
    // (Should that ever come mid-transaction, writing frames early is harmless, and a failure
    // stays deferred to the next sync.)
    if (p->wal) flushDeferred(p->wal);
    return p->real->pMethods->xUnlock(p->real, level);
}

static int wbCheckReservedLock(sqlite3_file *f, int *out) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xCheckReservedLock(p->real, out);
}

static int wbFileControl(sqlite3_file *f, int op, void *arg) {
    WBFile *p = (WBFile *)f;
    if (op == CH_FCNTL_WAL_BUFFER) {
        if (p->isWal) return SQLITE_NOTFOUND;
        p->walBufferBytes = *(int *)arg;
        if (p->wal) setCapacity(p->wal, p->walBufferBytes);
        return SQLITE_OK;
    }
    if (op == CH_FCNTL_WAL_BUFFER_STATS) {
        if (p->isWal) return SQLITE_NOTFOUND;
        ((long long *)arg)[0] = p->gathered;
        ((long long *)arg)[1] = p->flushes;
        return SQLITE_OK;
    }
    if (op == CH_FCNTL_WAL_BUFFER_FAIL) {
        if (p->isWal) return SQLITE_NOTFOUND;
        p->failFlushes = *(int *)arg;
        return SQLITE_OK;
    }
    int rc = flushBuffer(p);
    if (rc != SQLITE_OK) return rc;
    return p->real->pMethods->xFileControl(p->real, op, arg);
}

static int wbSectorSize(sqlite3_file *f) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xSectorSize(p->real);
}

static int wbDeviceCharacteristics(sqlite3_file *f) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xDeviceCharacteristics(p->real);
}

static int wbShmMap(sqlite3_file *f, int region, int size, int extend, void volatile **out) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xShmMap(p->real, region, size, extend, out);
}

static int wbShmLock(sqlite3_file *f, int offset, int n, int flags) {
    WBFile *p = (WBFile *)f;
    // Before this connection releases the WAL's write lock (slot 0), nothing it wrote may
    // stay buffered: frames of a transaction rolled back after spilling pages would otherwise
    // be written later, over frames another writer committed meanwhile. (Written out, they
    // lie past the WAL's last valid frame and are ignored or overwritten.)
    if (p->wal && (flags & SQLITE_SHM_UNLOCK) && offset == 0) releaseBuffer(p->wal);
    return p->real->pMethods->xShmLock(p->real, offset, n, flags);
}

static void wbShmBarrier(sqlite3_file *f) {
    WBFile *p = (WBFile *)f;
    // SQLite publishes a commit in the WAL index right after this barrier: whatever the sync
    // level, its frames are in the file first. (Under FULL the commit's sync already wrote
    // them; an error here is deferred to the next sync.)
    if (p->wal) flushDeferred(p->wal);
    p->real->pMethods->xShmBarrier(p->real);
}

static int wbShmUnmap(sqlite3_file *f, int deleteFlag) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xShmUnmap(p->real, deleteFlag);
}

static int wbFetch(sqlite3_file *f, sqlite3_int64 offset, int n, void **out) {
    WBFile *p = (WBFile *)f;
    int rc = flushBuffer(p);
    if (rc != SQLITE_OK) return rc;
    return p->real->pMethods->xFetch(p->real, offset, n, out);
}

static int wbUnfetch(sqlite3_file *f, sqlite3_int64 offset, void *page) {
    WBFile *p = (WBFile *)f;
    return p->real->pMethods->xUnfetch(p->real, offset, page);
}

static int wbOpen(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *f, int flags, int *outFlags) {
    (void)vfs;
    WBFile *p = (WBFile *)f;
    memset(p, 0, sizeof(WBFile));
    p->real = (sqlite3_file *)&p[1];
    int rc = root->xOpen(root, name, p->real, flags, outFlags);
    if (rc != SQLITE_OK || p->real->pMethods == NULL) {
        // SQLite closes only files whose pMethods is set. Close what the root VFS may hold.
        if (p->real->pMethods) p->real->pMethods->xClose(p->real);
        p->base.pMethods = NULL;
        return rc != SQLITE_OK ? rc : SQLITE_CANTOPEN;
    }
    p->base.pMethods = &wbMethods;
    if ((flags & SQLITE_OPEN_WAL) && name) {
        p->isWal = 1;
        sqlite3_file *db = sqlite3_database_file_object(name);
        if (db && db->pMethods == &wbMethods) {
            WBFile *mainDb = (WBFile *)db;
            p->mainDb = mainDb;
            mainDb->wal = p;
            setCapacity(p, mainDb->walBufferBytes);
        }
    }
    return SQLITE_OK;
}

static int wbDelete(sqlite3_vfs *v, const char *name, int syncDir) { (void)v; return root->xDelete(root, name, syncDir); }
static int wbAccess(sqlite3_vfs *v, const char *name, int flags, int *out) { (void)v; return root->xAccess(root, name, flags, out); }
static int wbFullPathname(sqlite3_vfs *v, const char *name, int n, char *out) { (void)v; return root->xFullPathname(root, name, n, out); }
static void *wbDlOpen(sqlite3_vfs *v, const char *name) { (void)v; return root->xDlOpen(root, name); }
static void wbDlError(sqlite3_vfs *v, int n, char *out) { (void)v; root->xDlError(root, n, out); }
static void (*wbDlSym(sqlite3_vfs *v, void *h, const char *sym))(void) { (void)v; return root->xDlSym(root, h, sym); }
static void wbDlClose(sqlite3_vfs *v, void *h) { (void)v; root->xDlClose(root, h); }
static int wbRandomness(sqlite3_vfs *v, int n, char *out) { (void)v; return root->xRandomness(root, n, out); }
static int wbSleep(sqlite3_vfs *v, int us) { (void)v; return root->xSleep(root, us); }
static int wbCurrentTime(sqlite3_vfs *v, double *out) { (void)v; return root->xCurrentTime(root, out); }
static int wbGetLastError(sqlite3_vfs *v, int n, char *out) { (void)v; return root->xGetLastError(root, n, out); }
static int wbCurrentTimeInt64(sqlite3_vfs *v, sqlite3_int64 *out) { (void)v; return root->xCurrentTimeInt64(root, out); }
static int wbSetSystemCall(sqlite3_vfs *v, const char *name, sqlite3_syscall_ptr f) { (void)v; return root->xSetSystemCall(root, name, f); }
static sqlite3_syscall_ptr wbGetSystemCall(sqlite3_vfs *v, const char *name) { (void)v; return root->xGetSystemCall(root, name); }
static const char *wbNextSystemCall(sqlite3_vfs *v, const char *name) { (void)v; return root->xNextSystemCall(root, name); }

int ch_wal_buffer_register(void) {
    static int registered;
    if (registered) return SQLITE_OK;
    int rc = sqlite3_initialize();
    if (rc != SQLITE_OK) return rc;
    sqlite3_vfs *dflt = sqlite3_vfs_find(NULL);
    // The layer forwards every method of the platform's VFS, so it needs all of them.
    if (dflt == NULL || dflt->iVersion < 3 || dflt->xCurrentTimeInt64 == NULL || dflt->xNextSystemCall == NULL) return SQLITE_ERROR;
    root = dflt;
    wbMethods = (sqlite3_io_methods){
        .iVersion = 3,
        .xClose = wbClose, .xRead = wbRead, .xWrite = wbWrite, .xTruncate = wbTruncate, .xSync = wbSync,
        .xFileSize = wbFileSize, .xLock = wbLock, .xUnlock = wbUnlock, .xCheckReservedLock = wbCheckReservedLock,
        .xFileControl = wbFileControl, .xSectorSize = wbSectorSize, .xDeviceCharacteristics = wbDeviceCharacteristics,
        .xShmMap = wbShmMap, .xShmLock = wbShmLock, .xShmBarrier = wbShmBarrier, .xShmUnmap = wbShmUnmap,
        .xFetch = wbFetch, .xUnfetch = wbUnfetch,
    };
    layer = (sqlite3_vfs){
        .iVersion = 3,
        .szOsFile = (int)sizeof(WBFile) + root->szOsFile,
        .mxPathname = root->mxPathname,
        .zName = "clearhouse-wal-buffer",
        .xOpen = wbOpen, .xDelete = wbDelete, .xAccess = wbAccess, .xFullPathname = wbFullPathname,
        .xDlOpen = wbDlOpen, .xDlError = wbDlError, .xDlSym = wbDlSym, .xDlClose = wbDlClose,
        .xRandomness = wbRandomness, .xSleep = wbSleep, .xCurrentTime = wbCurrentTime, .xGetLastError = wbGetLastError,
        .xCurrentTimeInt64 = wbCurrentTimeInt64,
        .xSetSystemCall = wbSetSystemCall, .xGetSystemCall = wbGetSystemCall, .xNextSystemCall = wbNextSystemCall,
    };
    rc = sqlite3_vfs_register(&layer, 1);
    if (rc == SQLITE_OK) registered = 1;
    return rc;
}

int ch_wal_buffer_enable(sqlite3 *db, int bytes) {
    return sqlite3_file_control(db, "main", CH_FCNTL_WAL_BUFFER, &bytes);
}

int ch_wal_buffer_stats(sqlite3 *db, long long *gathered, long long *flushes) {
    long long out[2] = {0, 0};
    int rc = sqlite3_file_control(db, "main", CH_FCNTL_WAL_BUFFER_STATS, out);
    *gathered = out[0];
    *flushes = out[1];
    return rc;
}

int ch_wal_buffer_fail_flushes(sqlite3 *db, int count) {
    return sqlite3_file_control(db, "main", CH_FCNTL_WAL_BUFFER_FAIL, &count);
}
