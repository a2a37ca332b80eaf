/*
 * The fast path's extent map: what the block layer's caches know about
 * where guest bytes live, per 64 KiB granule, so a read can be answered in the
 * worker thread that read the request, with preads instead of a trip to
 * JavaScript, and a write to a granule marked writable done there with pwrite
 * (fast_write.c).
 *
 * Kept apart from the rest of the binding because it is the one part with its
 * own locking (a rwlock taken by the worker threads and by the JavaScript thread)
 * and its own invariants (the generation counter and invalidation ring); the
 * N-API functions in napi_glue.c only unpack their arguments and call these.
 *
 * Feature macros (_GNU_SOURCE, _FILE_OFFSET_BITS, and FUSE_USE_VERSION for
 * fuse_mount.c) come from binding.gyp's cflags, so that they precede every
 * system header.
 */
#ifndef BLKEXPORT_FAST_MAP_H
#define BLKEXPORT_FAST_MAP_H

#if !defined(FUSE_USE_VERSION) || !defined(_GNU_SOURCE)
#error "build through binding.gyp: it sets FUSE_USE_VERSION and _GNU_SOURCE"
#endif

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define GRANULE_BITS 16 /* src/export/fuse/export.ts relies on this granule size */
#define MAX_SLOTS 64

typedef struct map_entry map_entry; /* private to fast_map.c */

/* What each recent generation invalidated (granule range), so an install computed
 * at an older generation drops only the granules changed since, not everything:
 * under a mixed read/write load reads keep teaching the map. */
#define RING 256
typedef struct {
  uint64_t gen, first, last;
} inval;

typedef struct {
  pthread_rwlock_t lock;
  int enabled;
  uint64_t gen;
  inval ring[RING];
  uint64_t fsize;
  map_entry *table;
  uint32_t cap; /* power of two */
  uint32_t used; /* live + tombstones */
  int fds[MAX_SLOTS];
  dev_t devs[MAX_SLOTS];
  ino_t inos[MAX_SLOTS];
  int nfds;
  atomic_ullong reads, bytes; /* served without JavaScript; read lock-free */
  /* The write fast path (fast_write.c): on only while JavaScript says the export may write. */
  int writes_on;
  atomic_ullong writes, wbytes; /* written without JavaScript; read lock-free */
  /* Native writes in flight, counted per epoch parity; the epoch moves under the write lock. */
  unsigned wepoch;
  atomic_int winflight[2];
} fast_map;

/* 0, or -1 when out of memory. The map starts enabled and empty. */
int fast_init(fast_map *m);
/* Closes the dup()ed host fds and frees the table; only once no worker thread is left. */
void fast_destroy(fast_map *m);

/* Reads [off, off+size) into out from the map: the byte count (short at the size bound, 0 past it),
 * or -1 to let JavaScript serve the read. */
ssize_t fast_read(fast_map *m, char *out, size_t size, uint64_t off);

/* The JavaScript thread's calls; each takes the lock itself. Numbers arrive as
 * JavaScript doubles and are converted here. */
uint64_t fast_gen(fast_map *m);
/* wait: return only once no native write can still use what was forgotten (fast_drain); a caller
 * whose change moved nothing that was installed writable passes 0. */
void fast_invalidate(fast_map *m, double off, double len, double size, bool wait);
void fast_enable(fast_map *m, bool on);
void fast_install(fast_map *m, double gen, double off, const double *x, size_t count, const uint8_t *wr);
/* Compressed clusters' whole granules, records of 8 doubles (fast_map.c; inflate.c inflates them). */
void fast_install_compressed(fast_map *m, double gen, const double *x, size_t count);
/* Whether workers may write installed writable granules (fast_write.c); off waits for writes in flight. */
void fast_allow_writes(fast_map *m, bool on);

/* For fast_write.c, with m->lock held: granule `key`'s host fd (-1: zeroes) and offset, and whether it
 * may be overwritten in place; 0 when the granule is not in the map. */
int fast_lookup(fast_map *m, uint64_t key, int *fd, uint64_t *host, int *writable);

/* Waits until every native write that looked the map up before epoch `old` ended has returned
 * (fast_write.c). The caller moved the epoch under the write lock and released it. */
void fast_drain(fast_map *m, unsigned old);

/* Writes data[0, size) at guest `off` in place through the map, in the calling worker thread: size, or -1
 * to let JavaScript serve the write (some granule not known writable, past the size, disabled, an error). */
ssize_t fast_write(fast_map *m, const char *data, size_t size, uint64_t off);

#endif
