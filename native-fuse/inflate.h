/*
 * Compressed qcow2 clusters and vmdk grains for the read fast path: inflating
 * one cluster in a worker thread (zlib raw deflate, zstd, or vmdk's zlib
 * format, through the C libraries) into
 * that thread's own buffers, and a process-wide decompressed-cluster cache
 * with a byte bound, shared by every mount's workers.
 *
 * The cache is keyed by (map, host fd slot, host offset of the compressed
 * bytes). It knows nothing of guest offsets or generations: fast_map.c keeps
 * it exact by dropping a host offset whenever an invalidation removes a map
 * entry that points at it (under the map's write lock), and a worker inserts
 * only under the map's read lock after checking that the granule it inflated
 * for still maps the same compressed cluster and was not invalidated since it
 * looked (see fast_read). Lock order: the map's rwlock, then the cache's mutex.
 *
 * Environment (read once, at the first mount):
 *   BLKEXPORT_INFLATE_CACHE_MIB  bound of the cache in MiB (default 64; 0: no cache)
 *   BLKEXPORT_NATIVE_INFLATE     0: compressed granules are never installed, every
 *                                read of them goes to JavaScript (for comparison and tests)
 */
#ifndef BLKEXPORT_INFLATE_H
#define BLKEXPORT_INFLATE_H

#include <stddef.h>
#include <stdint.h>

#define INFLATE_ZLIB 0
#define INFLATE_ZSTD 1
/* vmdk grains (src/block/format/vmdk/stream.ts): zlib format (RFC 1950, header and Adler-32), */
#define INFLATE_ZLIB_WRAPPED 2
/* and the same after a 12-byte grain marker whose little-endian u32 at byte 8 is the data's length. */
#define INFLATE_VMDK_MARKER 3
#define INFLATE_ALGOS 4
#define INFLATE_MIN_CLUSTER_BITS 9
#define INFLATE_MAX_CLUSTER_BITS 21

/* One compressed cluster as a map entry describes it. */
typedef struct {
  uint64_t host;  /* offset of the compressed bytes in the host file */
  uint32_t clen;  /* bytes to read from there (an upper bound of the stream, clipped to the file) */
  uint8_t cbits;  /* cluster size 1 << cbits: exactly what the stream must give */
  uint8_t algo;   /* INFLATE_ZLIB, INFLATE_ZSTD, INFLATE_ZLIB_WRAPPED or INFLATE_VMDK_MARKER */
} inflate_desc;

typedef struct inflate_entry inflate_entry; /* private to inflate.c */

typedef struct {
  double enabled;     /* BLKEXPORT_NATIVE_INFLATE is not 0 */
  double inflated;    /* clusters inflated in C */
  double hits;        /* compressed pieces of reads served from the cache */
  double failed;      /* clusters that would not inflate (the read went to JavaScript) */
  double cache_bytes; /* decompressed bytes held */
  double cache_limit; /* the bound */
  double entries;     /* clusters held */
} inflate_stats;

/* False when BLKEXPORT_NATIVE_INFLATE=0: compressed pieces are not installed. */
int inflate_enabled(void);

/*
 * Inflates the cluster `d` read from `fd` into this thread's buffer; on
 * success *out points at its 1 << cbits bytes (valid until this thread's next
 * call). -1 when the stream is corrupt, does not give exactly one cluster, or
 * the read fails: the caller lets JavaScript serve (and report) it.
 */
int inflate_cluster(int fd, const inflate_desc *d, const char **out);

/* The same with buffers and decoders of its own (freed before it returns), into dst (1 << cbits bytes),
 * for JavaScript's threads (tests compare the decoders); not counted in the stats. */
int inflate_cluster_once(int fd, const inflate_desc *d, char *dst);
/* Frees this thread's buffers and decoders; FUSE workers call it when they leave. */
void inflate_thread_end(void);

/* The cached cluster for (owner, slot, d), pinned (not evicted or freed until unpinned), or NULL. */
inflate_entry *inflate_cache_get(const void *owner, int slot, const inflate_desc *d);
const char *inflate_entry_data(const inflate_entry *e);
void inflate_cache_unpin(inflate_entry *e);
/* Caches the cluster this thread's inflate_cluster just gave (`data`, which the cache takes over
 * without a copy), evicting the least recently used; `data` is invalid afterwards. */
void inflate_cache_put(const void *owner, int slot, const inflate_desc *d, const char *data);
/* Forgets one compressed cluster, or everything `owner` holds (a map cleared or destroyed). */
void inflate_cache_drop(const void *owner, int slot, uint64_t host);
void inflate_cache_drop_owner(const void *owner);

inflate_stats inflate_get_stats(void);

#endif
