/*
 * Compressed clusters in the worker threads (inflate.h): the bounded
 * decoders, each thread's buffers, and the decompressed-cluster cache.
 *
 * The decoders accept a subset of what JavaScript's (src/block/format/qcow2/
 * decompress.ts) accept, with the same output: whatever is refused here is
 * read again by JavaScript, which serves it or reports IMAGE_CORRUPT (EIO).
 *   zlib: raw deflate, window 2^12; accepted only when the stream ends
 *         (Z_STREAM_END) having given exactly one cluster. The output buffer
 *         is the cluster, so a longer stream stops there and is refused;
 *         bytes after the stream's end (the descriptor's sector rounding) are
 *         ignored.
 *   zlib format (vmdk grains, src/block/format/vmdk/stream.ts): the same rule
 *         with the zlib header and its Adler-32 check (window up to 2^15), on
 *         the grain's bytes, or (with a marker) on exactly the marker's length
 *         of bytes after it: a length of 0 or past the bytes read is refused.
 *         JavaScript also serves a stream that ends short of a grain; here
 *         only whole grains are accepted.
 *   zstd: one frame at the start of the bytes (its length found by
 *         ZSTD_findFrameCompressedSize, so trailing bytes are ignored); no
 *         dictionary, window <= 8 MiB, content size (when stored) equal to the
 *         cluster, decoded in one call into the cluster-sized buffer (no
 *         window buffer is allocated) and accepted only at exactly one cluster.
 *
 * Memory: each worker thread keeps a z_stream, a ZSTD_DCtx, an input buffer
 * (up to two clusters) and an output buffer (one cluster), grown to the
 * largest cluster it has met and freed when the thread leaves; nothing is
 * allocated per request. The cache holds at most its bound of decompressed
 * bytes; a cluster enters it without a copy (the worker's output buffer
 * becomes the entry's, and the worker takes the evicted entry's buffer).
 */
#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_getFrameHeader (exported by libzstd 1.5) */
#include "inflate.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#define ZSTD_MAX_WINDOW (8u << 20)
#define VMDK_MARKER_BYTES 12
#define DEFAULT_CACHE_MIB 64
#define BUCKETS 4096

/* ---- settings --------------------------------------------------------------------- */

static pthread_once_t settings_once = PTHREAD_ONCE_INIT;
static int native_on = 1;
static uint64_t cache_limit = (uint64_t)DEFAULT_CACHE_MIB << 20;

static void read_settings(void) {
  const char *s = getenv("BLKEXPORT_NATIVE_INFLATE");
  if (s && strcmp(s, "0") == 0) native_on = 0;
  s = getenv("BLKEXPORT_INFLATE_CACHE_MIB");
  if (s && *s) {
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (end && *end == '\0' && v <= (1ULL << 20)) cache_limit = (uint64_t)v << 20;
  }
}

int inflate_enabled(void) {
  pthread_once(&settings_once, read_settings);
  return native_on;
}

/* ---- each thread's decoders and buffers ------------------------------------------ */

typedef struct {
  z_stream z;
  int zready;
  ZSTD_DCtx *zd;
  char *in, *out;
  size_t incap, outcap;
} thread_bufs;

static pthread_key_t bufs_key;
static pthread_once_t bufs_once = PTHREAD_ONCE_INIT;

static void bufs_free(void *p) {
  thread_bufs *b = p;
  if (b->zready) inflateEnd(&b->z);
  ZSTD_freeDCtx(b->zd);
  free(b->in);
  free(b->out);
  free(b);
}

/* No destructor: a thread-exit callback into an addon that Node may have unloaded (a worker_thread's
 * environment closes its addons) would crash; our FUSE workers call inflate_thread_end instead. */
static void bufs_key_init(void) {
  pthread_key_create(&bufs_key, NULL);
}

void inflate_thread_end(void) {
  pthread_once(&bufs_once, bufs_key_init);
  thread_bufs *b = pthread_getspecific(bufs_key);
  if (!b) return;
  pthread_setspecific(bufs_key, NULL);
  bufs_free(b);
}

/* Room for `in` and `out` bytes in `b`; -1 when out of memory. */
static int bufs_grow(thread_bufs *b, size_t in, size_t out) {
  if (b->incap < in) {
    char *p = realloc(b->in, in);
    if (!p) return -1;
    b->in = p;
    b->incap = in;
  }
  if (b->outcap < out) {
    char *p = realloc(b->out, out);
    if (!p) return -1;
    b->out = p;
    b->outcap = out;
  }
  return 0;
}

/* This thread's buffers with room for `in` and `out` bytes, or NULL when out of memory. */
static thread_bufs *bufs_get(size_t in, size_t out) {
  pthread_once(&bufs_once, bufs_key_init);
  thread_bufs *b = pthread_getspecific(bufs_key);
  if (!b) {
    b = calloc(1, sizeof(*b));
    if (!b || pthread_setspecific(bufs_key, b) != 0) {
      free(b);
      return NULL;
    }
  }
  return bufs_grow(b, in, out) == 0 ? b : NULL;
}

/* ---- the decoders ------------------------------------------------------------------ */

/* Inflates n bytes at `in` (raw deflate: wbits -12; zlib format: 15) into exactly cs bytes of b->out. */
static int inflate_zlib(thread_bufs *b, const char *in, size_t n, size_t cs, int wbits) {
  if (!b->zready) {
    memset(&b->z, 0, sizeof(b->z));
    if (inflateInit2(&b->z, wbits) != Z_OK) return -1;
    b->zready = 1;
  } else if (inflateReset2(&b->z, wbits) != Z_OK) { /* frees the window when wbits changed */
    return -1;
  }
  b->z.next_in = (Bytef *)in;
  b->z.avail_in = (uInt)n;
  b->z.next_out = (Bytef *)b->out;
  b->z.avail_out = (uInt)cs;
  int r = inflate(&b->z, Z_FINISH);
  return r == Z_STREAM_END && b->z.avail_out == 0 ? 0 : -1;
}

static int inflate_zstd(thread_bufs *b, size_t n, size_t cs) {
  if (!b->zd && !(b->zd = ZSTD_createDCtx())) return -1;
  ZSTD_frameHeader fh;
  if (ZSTD_getFrameHeader(&fh, b->in, n) != 0) return -1; /* an error, or too few bytes for a header */
  if (fh.frameType != ZSTD_frame || fh.dictID != 0 || fh.windowSize > ZSTD_MAX_WINDOW) return -1;
  if (fh.frameContentSize != ZSTD_CONTENTSIZE_UNKNOWN && fh.frameContentSize != cs) return -1;
  size_t flen = ZSTD_findFrameCompressedSize(b->in, n);
  if (ZSTD_isError(flen) || flen > n) return -1;
  size_t got = ZSTD_decompressDCtx(b->zd, b->out, cs, b->in, flen);
  return !ZSTD_isError(got) && got == cs ? 0 : -1;
}

static atomic_ullong n_inflated, n_hits, n_failed;

/* Reads and inflates `d` with b's decoders into b->out: 0, or -1 (refused, or the read failed). */
static int inflate_with(thread_bufs *b, int fd, const inflate_desc *d) {
  size_t cs = (size_t)1 << d->cbits;
  size_t n = 0;
  while (n < d->clen) {
    ssize_t r = pread(fd, b->in + n, d->clen - n, (off_t)(d->host + n));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) break; /* the last cluster's descriptor may reach past the end of the file */
    n += (size_t)r;
  }
  switch (d->algo) {
  case INFLATE_ZLIB:
    return inflate_zlib(b, b->in, n, cs, -12);
  case INFLATE_ZSTD:
    return inflate_zstd(b, n, cs);
  case INFLATE_ZLIB_WRAPPED:
    return inflate_zlib(b, b->in, n, cs, 15);
  case INFLATE_VMDK_MARKER: {
    if (n < VMDK_MARKER_BYTES) return -1;
    const unsigned char *m = (const unsigned char *)b->in + 8;
    size_t len = (size_t)m[0] | (size_t)m[1] << 8 | (size_t)m[2] << 16 | (size_t)m[3] << 24;
    if (len == 0 || len > n - VMDK_MARKER_BYTES) return -1;
    return inflate_zlib(b, b->in + VMDK_MARKER_BYTES, len, cs, 15);
  }
  default:
    return -1;
  }
}

/* The bounds every caller needs: a cluster size qcow2 allows, at most two clusters of input. */
static int desc_ok(const inflate_desc *d) {
  if (d->cbits < INFLATE_MIN_CLUSTER_BITS || d->cbits > INFLATE_MAX_CLUSTER_BITS) return 0;
  return d->clen > 0 && d->clen <= 2 * ((size_t)1 << d->cbits); /* mapping.ts refuses longer descriptors */
}

int inflate_cluster(int fd, const inflate_desc *d, const char **out) {
  if (!desc_ok(d)) return -1;
  size_t cs = (size_t)1 << d->cbits;
  thread_bufs *b = bufs_get(2 * cs, cs);
  if (!b) return -1;
  if (inflate_with(b, fd, d) != 0) {
    atomic_fetch_add(&n_failed, 1);
    return -1;
  }
  atomic_fetch_add(&n_inflated, 1);
  *out = b->out;
  return 0;
}

int inflate_cluster_once(int fd, const inflate_desc *d, char *dst) {
  if (!desc_ok(d)) return -1;
  size_t cs = (size_t)1 << d->cbits;
  thread_bufs b;
  memset(&b, 0, sizeof(b));
  int r = bufs_grow(&b, 2 * cs, cs) == 0 ? inflate_with(&b, fd, d) : -1;
  if (r == 0) memcpy(dst, b.out, cs);
  if (b.zready) inflateEnd(&b.z);
  ZSTD_freeDCtx(b.zd);
  free(b.in);
  free(b.out);
  return r;
}

/* ---- the cache ---------------------------------------------------------------------- */

struct inflate_entry {
  const void *owner;
  int slot;
  uint64_t host;
  size_t size;
  char *data;
  int pins;
  int dead; /* dropped while pinned: freed by the last unpin */
  inflate_entry *next;             /* bucket chain */
  inflate_entry *older, *newer;    /* recency list */
};

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static inflate_entry *buckets[BUCKETS];
static inflate_entry *oldest, *newest;
static uint64_t cache_bytes, cache_entries;

static uint32_t bucket_of(const void *owner, int slot, uint64_t host) {
  uint64_t k = host ^ ((uint64_t)(uintptr_t)owner * 0x9e3779b97f4a7c15ULL) ^ ((uint64_t)(uint32_t)slot << 48);
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (uint32_t)(k % BUCKETS);
}

static void lru_unlink(inflate_entry *e) {
  if (e->older) e->older->newer = e->newer;
  else oldest = e->newer;
  if (e->newer) e->newer->older = e->older;
  else newest = e->older;
  e->older = e->newer = NULL;
}

static void lru_push(inflate_entry *e) {
  e->older = newest;
  e->newer = NULL;
  if (newest) newest->newer = e;
  else oldest = e;
  newest = e;
}

/* Takes e out of the table and the recency list; caller holds cache_lock. Returns e when nobody pins it. */
static inflate_entry *unlink_entry(inflate_entry *e) {
  inflate_entry **p = &buckets[bucket_of(e->owner, e->slot, e->host)];
  while (*p && *p != e) p = &(*p)->next;
  if (*p) *p = e->next;
  lru_unlink(e);
  cache_bytes -= e->size;
  cache_entries--;
  if (e->pins > 0) {
    e->dead = 1;
    return NULL;
  }
  return e;
}

static void free_entry(inflate_entry *e) {
  free(e->data);
  free(e);
}

static inflate_entry *find(const void *owner, int slot, uint64_t host) {
  for (inflate_entry *e = buckets[bucket_of(owner, slot, host)]; e; e = e->next)
    if (e->owner == owner && e->slot == slot && e->host == host) return e;
  return NULL;
}

inflate_entry *inflate_cache_get(const void *owner, int slot, const inflate_desc *d) {
  pthread_mutex_lock(&cache_lock);
  inflate_entry *e = find(owner, slot, d->host);
  if (e && e->size == ((size_t)1 << d->cbits)) {
    e->pins++;
    lru_unlink(e);
    lru_push(e);
    atomic_fetch_add(&n_hits, 1);
  } else {
    e = NULL;
  }
  pthread_mutex_unlock(&cache_lock);
  return e;
}

const char *inflate_entry_data(const inflate_entry *e) {
  return e->data;
}

void inflate_cache_unpin(inflate_entry *e) {
  pthread_mutex_lock(&cache_lock);
  int gone = --e->pins == 0 && e->dead;
  pthread_mutex_unlock(&cache_lock);
  if (gone) free_entry(e);
}

/* The cluster this thread inflated last (its output buffer) goes into the cache without a copy: the
 * entry takes the buffer, and the thread takes the evicted entry's buffer of the same size, or none
 * (it allocates a new one on its next inflation; that happens only while the cache grows). */
void inflate_cache_put(const void *owner, int slot, const inflate_desc *d, const char *data) {
  pthread_once(&settings_once, read_settings);
  size_t size = (size_t)1 << d->cbits;
  thread_bufs *b = pthread_getspecific(bufs_key);
  if (size > cache_limit || !b || b->out != data) return;
  int swap = b->outcap == size; /* else (the thread met larger clusters) the cluster is copied */
  inflate_entry *reuse = NULL;
  inflate_entry *victims = NULL; /* freed after the lock */
  pthread_mutex_lock(&cache_lock);
  if (find(owner, slot, d->host)) { /* another worker inflated it meanwhile */
    pthread_mutex_unlock(&cache_lock);
    return;
  }
  for (inflate_entry *e = oldest; e && cache_bytes + size > cache_limit;) {
    inflate_entry *next = e->newer;
    if (e->pins == 0) {
      unlink_entry(e);
      if (!reuse && e->size == size) {
        reuse = e;
      } else {
        e->next = victims;
        victims = e;
      }
    }
    e = next;
  }
  inflate_entry *e = reuse;
  if (!e && (e = malloc(sizeof(*e)))) e->data = NULL;
  if (e && !swap && !e->data) e->data = malloc(size);
  if (e && e->data && !swap) memcpy(e->data, data, size);
  if (e && (swap || e->data) && cache_bytes + size <= cache_limit) {
    if (swap) {
      char *spare = reuse ? reuse->data : NULL;
      e->data = b->out; /* the entry takes the inflated cluster */
      b->out = spare;   /* the thread takes the evicted buffer, or allocates on its next inflation */
      if (!spare) b->outcap = 0;
    }
    e->owner = owner;
    e->slot = slot;
    e->host = d->host;
    e->size = size;
    e->pins = 0;
    e->dead = 0;
    uint32_t h = bucket_of(owner, slot, d->host);
    e->next = buckets[h];
    buckets[h] = e;
    lru_push(e);
    cache_bytes += size;
    cache_entries++;
    e = NULL;
  }
  pthread_mutex_unlock(&cache_lock);
  if (e) free_entry(e); /* everything left is pinned: no room this time */
  while (victims) {
    inflate_entry *v = victims;
    victims = v->next;
    free_entry(v);
  }
}

void inflate_cache_drop(const void *owner, int slot, uint64_t host) {
  pthread_mutex_lock(&cache_lock);
  inflate_entry *e = find(owner, slot, host);
  if (e) e = unlink_entry(e);
  pthread_mutex_unlock(&cache_lock);
  if (e) free_entry(e);
}

void inflate_cache_drop_owner(const void *owner) {
  inflate_entry *victims = NULL;
  pthread_mutex_lock(&cache_lock);
  for (inflate_entry *e = oldest; e;) {
    inflate_entry *next = e->newer;
    if (e->owner == owner && unlink_entry(e)) {
      e->next = victims;
      victims = e;
    }
    e = next;
  }
  pthread_mutex_unlock(&cache_lock);
  while (victims) {
    inflate_entry *v = victims;
    victims = v->next;
    free_entry(v);
  }
}

inflate_stats inflate_get_stats(void) {
  pthread_once(&settings_once, read_settings);
  inflate_stats s;
  s.enabled = native_on;
  pthread_mutex_lock(&cache_lock);
  s.cache_bytes = (double)cache_bytes;
  s.entries = (double)cache_entries;
  pthread_mutex_unlock(&cache_lock);
  s.cache_limit = (double)cache_limit;
  s.inflated = (double)atomic_load(&n_inflated);
  s.hits = (double)atomic_load(&n_hits);
  s.failed = (double)atomic_load(&n_failed);
  return s;
}
