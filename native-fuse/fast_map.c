/*
 * The read fast path. JavaScript installs what the block layer's caches know
 * about where guest bytes live (host fd + offset, or zeroes) per 64 KiB
 * granule; a read whose granules are all known is served here, in the worker
 * thread that read the request, with preads: no trip to JavaScript. A write
 * to granules installed writable is done in the worker too (fast_write.c);
 * every other write, and every truncate or fallocate, goes through
 * JavaScript, which invalidates whatever it may move before and after the
 * change (a generation counter drops installs computed meanwhile). Host fds
 * are dup()ed on first use and kept until the mount ends, so a node reopening
 * or closing its own fd never leaves a stale number here.
 *
 * This file holds the map itself (an open-addressing hash table of granules,
 * the host fd slots, the invalidation ring) and everything done under its
 * lock, so the locking rules live in one place.
 */
#include "fast_map.h"

#include "inflate.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SLOT_EMPTY (-2)
#define SLOT_TOMB (-3)
#define SLOT_ZERO (-1)
/* Until JavaScript gives a size (fastInvalidate), every read goes to JavaScript: a successor's workers
 * serve requeued reads before its JavaScript has said anything. */
#define FSIZE_UNKNOWN UINT64_MAX

struct map_entry {
  uint64_t key;
  int32_t slot;
  uint8_t wr; /* every byte of the granule may be overwritten in place (fast_write.c) */
  uint64_t host;
  uint64_t comp; /* 0, or a compressed cluster (host: its compressed bytes): see comp_pack */
};

/* ---- compressed granules (inflate.c does the work) ------------------------------- */

/* A compressed granule's entry: clen (23 bits), the granule's offset in the cluster (22), cbits (5), algo (2), set (1). */
static uint64_t comp_pack(uint32_t clen, uint32_t skip, unsigned cbits, unsigned algo) {
  return (uint64_t)clen | (uint64_t)skip << 23 | (uint64_t)cbits << 45 | (uint64_t)algo << 50 | 1ULL << 52;
}
#define COMP_SKIP_BITS (((1ULL << 22) - 1) << 23)
static uint32_t comp_skip(uint64_t c) {
  return (uint32_t)(c >> 23) & ((1u << 22) - 1);
}
static inflate_desc comp_desc(const map_entry *e) {
  return (inflate_desc){e->host, (uint32_t)(e->comp & ((1u << 23) - 1)), (uint8_t)((e->comp >> 45) & 31),
                        (uint8_t)((e->comp >> 50) & 3)};
}
/* An entry leaves the map: a decompressed copy of its cluster must not outlive it. Caller holds the write lock. */
static void comp_forget(fast_map *m, const map_entry *e) {
  if (e->comp) inflate_cache_drop(m, e->slot, e->host);
}

/* ---- the map ------------------------------------------------------------------- */

static uint32_t hash64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (uint32_t)k;
}

static void fast_clear(fast_map *m) {
  for (uint32_t i = 0; i < m->cap; i++) m->table[i].slot = SLOT_EMPTY;
  m->used = 0;
}

/* Forgets every granule, and with them every decompressed cluster they reach. Caller holds the write lock. */
static void fast_forget_all(fast_map *m) {
  fast_clear(m);
  inflate_cache_drop_owner(m);
}

int fast_init(fast_map *m) {
  /* Writers first: the JavaScript thread's changes must not starve behind a stream of worker lookups. */
  pthread_rwlockattr_t attr;
  pthread_rwlockattr_init(&attr);
  pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init(&m->lock, &attr);
  pthread_rwlockattr_destroy(&attr);
  m->cap = 1024;
  m->table = malloc(sizeof(map_entry) * m->cap);
  if (!m->table) return -1;
  fast_clear(m);
  m->enabled = 1;
  m->fsize = FSIZE_UNKNOWN;
  return 0;
}

static map_entry *fast_find(fast_map *m, uint64_t key) {
  uint32_t mask = m->cap - 1;
  for (uint32_t i = hash64(key) & mask, n = 0; n < m->cap; i = (i + 1) & mask, n++) {
    map_entry *e = &m->table[i];
    if (e->slot == SLOT_EMPTY) return NULL;
    if (e->slot != SLOT_TOMB && e->key == key) return e;
  }
  return NULL;
}

/* Caller holds the write lock. Grows up to 1 << 16 entries, then starts over. */
static void fast_put(fast_map *m, uint64_t key, int32_t slot, uint64_t host, uint64_t comp, uint8_t wr) {
  map_entry *old = fast_find(m, key);
  if (old) {
    if (old->comp != comp || old->host != host || old->slot != slot) comp_forget(m, old);
    old->slot = slot;
    old->host = host;
    old->comp = comp;
    old->wr = wr;
    return;
  }
  if ((m->used + 1) * 2 > m->cap) {
    uint32_t ncap = m->cap < (1u << 16) ? m->cap * 2 : m->cap;
    map_entry *nt = ncap == m->cap ? NULL : malloc(sizeof(map_entry) * ncap);
    map_entry *ot = m->table;
    uint32_t ocap = m->cap;
    if (nt) {
      m->table = nt;
      m->cap = ncap;
      fast_clear(m);
      for (uint32_t i = 0; i < ocap; i++)
        if (ot[i].slot != SLOT_EMPTY && ot[i].slot != SLOT_TOMB)
          fast_put(m, ot[i].key, ot[i].slot, ot[i].host, ot[i].comp, ot[i].wr);
      free(ot);
    } else {
      fast_forget_all(m);
    }
  }
  uint32_t mask = m->cap - 1;
  for (uint32_t i = hash64(key) & mask;; i = (i + 1) & mask) {
    map_entry *e = &m->table[i];
    if (e->slot == SLOT_EMPTY || e->slot == SLOT_TOMB) {
      if (e->slot == SLOT_EMPTY) m->used++;
      e->key = key;
      e->slot = slot;
      e->host = host;
      e->comp = comp;
      e->wr = wr;
      return;
    }
  }
}

/* The slot of a dup of `fd` (same file by dev/ino), or -1. Caller holds the write lock. */
static int fast_slot(fast_map *m, int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return -1;
  for (int i = 0; i < m->nfds; i++) {
    if (m->devs[i] != st.st_dev || m->inos[i] != st.st_ino) continue;
    /* The node was reopened read-write since this dup was made read-only: the write fast path needs a
     * writable one. dup3 swaps it atomically, so a worker that copied the number out keeps a valid fd. */
    int had = fcntl(m->fds[i], F_GETFL), has = fcntl(fd, F_GETFL);
    if (had >= 0 && has >= 0 && (had & O_ACCMODE) == O_RDONLY && (has & O_ACCMODE) == O_RDWR)
      dup3(fd, m->fds[i], O_CLOEXEC);
    return i;
  }
  if (m->nfds >= MAX_SLOTS) return -1;
  int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) return -1;
  m->fds[m->nfds] = d;
  m->devs[m->nfds] = st.st_dev;
  m->inos[m->nfds] = st.st_ino;
  return m->nfds++;
}

/* Moves the generation, remembering which granules it invalidated. Caller holds the write lock. */
static void fast_record(fast_map *m, uint64_t first, uint64_t last) {
  m->gen++;
  m->ring[m->gen % RING] = (inval){m->gen, first, last};
}

/* True when granule `k` was invalidated after generation `since`. Caller holds the lock. */
static int changed_since(const fast_map *m, uint64_t since, uint64_t k) {
  for (uint64_t g = since + 1; g <= m->gen; g++) {
    const inval *e = &m->ring[g % RING];
    if (e->gen != g || (k >= e->first && k <= e->last)) return 1; /* overwritten slot: assume changed */
  }
  return 0;
}

void fast_destroy(fast_map *m) {
  inflate_cache_drop_owner(m);
  for (int i = 0; i < m->nfds; i++) close(m->fds[i]);
  m->nfds = 0;
  free(m->table);
  m->table = NULL;
  pthread_rwlock_destroy(&m->lock);
}

/* Caller holds the lock (fast_write.c). */
int fast_lookup(fast_map *m, uint64_t key, int *fd, uint64_t *host, int *writable) {
  map_entry *e = fast_find(m, key);
  if (!e) return 0;
  *fd = e->slot >= 0 ? m->fds[e->slot] : -1;
  *host = e->host;
  *writable = e->wr && e->slot >= 0;
  return 1;
}

/* ---- the worker threads' side: serving a read ----------------------------------- */

typedef struct {
  int32_t slot;
  uint64_t host;
  size_t len;
  size_t at;
  /* A compressed cluster: the first granule (to check before caching), the offset in the cluster, the cache's copy. */
  uint64_t comp, key;
  uint32_t skip;
  inflate_entry *pin;
} seg;

/* The segment for one granule's piece [pos, pos+len), merged into the previous one when contiguous. */
static void add_seg(seg *segs, int *nseg, const map_entry *e, uint64_t pos, size_t len, size_t at) {
  const uint64_t G = 1ULL << GRANULE_BITS;
  seg *last = *nseg ? &segs[*nseg - 1] : NULL;
  if (e->comp) {
    uint32_t skip = comp_skip(e->comp) + (uint32_t)(pos & (G - 1));
    if (last && last->comp == ((e->comp & ~COMP_SKIP_BITS)) && last->slot == e->slot &&
        last->host == e->host && last->skip + last->len == skip) {
      last->len += len;
      return;
    }
    segs[(*nseg)++] = (seg){e->slot, e->host, len, at, (e->comp & ~COMP_SKIP_BITS), pos >> GRANULE_BITS,
                            skip, NULL};
    return;
  }
  uint64_t host = e->slot == SLOT_ZERO ? 0 : e->host + (pos & (G - 1));
  if (last && !last->comp && last->slot == e->slot && (e->slot == SLOT_ZERO || last->host + last->len == host)) {
    last->len += len;
    return;
  }
  segs[(*nseg)++] = (seg){e->slot, host, len, at, 0, 0, 0, NULL};
}

/* Fills one compressed segment: from the cache, or inflated here (then cached if the map still says the same). */
static int read_compressed(fast_map *m, seg *s, int fd, char *out, uint64_t since) {
  map_entry me = {.slot = s->slot, .host = s->host, .comp = s->comp};
  inflate_desc d = comp_desc(&me);
  if (s->pin) {
    memcpy(out, inflate_entry_data(s->pin) + s->skip, s->len);
    inflate_cache_unpin(s->pin);
    s->pin = NULL;
    return 0;
  }
  const char *data = NULL;
  if (inflate_cluster(fd, &d, &data) != 0) return -1;
  memcpy(out, data + s->skip, s->len);
  /* Cache it only while a live entry maps this cluster, untouched since we looked: every
   * invalidation that removes the entry drops the copy (comp_forget), under the write lock. */
  pthread_rwlock_rdlock(&m->lock);
  map_entry *e = fast_find(m, s->key);
  if (e && e->slot == s->slot && e->host == s->host && (e->comp & ~COMP_SKIP_BITS) == s->comp &&
      !changed_since(m, since, s->key))
    inflate_cache_put(m, s->slot, &d, data);
  pthread_rwlock_unlock(&m->lock);
  return 0;
}

/* Reads from the fast map into out (which holds size bytes): the byte count, or -1 to let JavaScript serve it. */
ssize_t fast_read(fast_map *m, char *out, size_t size, uint64_t off) {
  seg segs[32];
  int nseg = 0;
  size_t n = 0;
  pthread_rwlock_rdlock(&m->lock);
  if (!m->enabled) {
    pthread_rwlock_unlock(&m->lock);
    return -1;
  }
  if (m->fsize == FSIZE_UNKNOWN) { /* no size from JavaScript yet: nothing bounds a read */
    pthread_rwlock_unlock(&m->lock);
    return -1;
  }
  if (off >= m->fsize) {
    pthread_rwlock_unlock(&m->lock);
    return 0;
  }
  n = size;
  if (off + n > m->fsize) n = (size_t)(m->fsize - off);
  for (uint64_t pos = off; pos < off + n;) {
    map_entry *e = fast_find(m, pos >> GRANULE_BITS);
    if (!e || nseg == 32) {
      pthread_rwlock_unlock(&m->lock);
      return -1;
    }
    uint64_t gend = ((pos >> GRANULE_BITS) + 1) << GRANULE_BITS;
    size_t len = (size_t)((gend < off + n ? gend : off + n) - pos);
    add_seg(segs, &nseg, e, pos, len, (size_t)(pos - off));
    pos += len;
  }
  int fds[32];
  for (int i = 0; i < nseg; i++) {
    fds[i] = segs[i].slot >= 0 ? m->fds[segs[i].slot] : -1;
    if (segs[i].comp) {
      map_entry me = {.slot = segs[i].slot, .host = segs[i].host, .comp = segs[i].comp};
      inflate_desc d = comp_desc(&me);
      segs[i].pin = inflate_cache_get(m, segs[i].slot, &d);
    }
  }
  uint64_t since = m->gen;
  pthread_rwlock_unlock(&m->lock);

  char *buf = out;
  int failed = 0;
  for (int i = 0; i < nseg; i++) {
    if (failed) { /* only the pins are left to release */
      if (segs[i].pin) inflate_cache_unpin(segs[i].pin);
      continue;
    }
    if (segs[i].comp) {
      if (read_compressed(m, &segs[i], fds[i], buf + segs[i].at, since) != 0) failed = 1;
      continue;
    }
    if (segs[i].slot == SLOT_ZERO) {
      memset(buf + segs[i].at, 0, segs[i].len);
      continue;
    }
    size_t done = 0;
    while (done < segs[i].len) {
      ssize_t r = pread(fds[i], buf + segs[i].at + done, segs[i].len - done, (off_t)(segs[i].host + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) { /* let JavaScript serve it (and report the error) */
        failed = 1;
        break;
      }
      if (r == 0) { /* past the end of the host file: zeroes, as the file driver reads them */
        memset(buf + segs[i].at + done, 0, segs[i].len - done);
        break;
      }
      done += (size_t)r;
    }
  }
  if (failed) return -1;
  atomic_fetch_add(&m->reads, 1);
  atomic_fetch_add(&m->bytes, n);
  return (ssize_t)n;
}

/* ---- the JavaScript thread's side: generation, invalidation, installs ---------- */

/* The current generation; an install passes it back to say what it was computed against. */
uint64_t fast_gen(fast_map *m) {
  pthread_rwlock_rdlock(&m->lock);
  uint64_t g = m->gen;
  pthread_rwlock_unlock(&m->lock);
  return g;
}

/* Bumps the generation, forgets the range, sets the size (-1: keep). */
void fast_invalidate(fast_map *m, double off, double len, double size, bool wait) {
  pthread_rwlock_wrlock(&m->lock);
  uint64_t first = 1, last = 0; /* empty */
  if (len > 0) {
    first = (uint64_t)off >> GRANULE_BITS;
    last = ((uint64_t)off + (uint64_t)len - 1) >> GRANULE_BITS;
  }
  if (size >= 0 && (uint64_t)size != m->fsize) {
    first = 0;
    last = UINT64_MAX;
  }
  fast_record(m, first, last);
  unsigned old = wait ? m->wepoch++ : 0;
  if (size >= 0) m->fsize = (uint64_t)size;
  if (len > 0) {
    if (last - first > 256) {
      fast_forget_all(m);
    } else {
      for (uint64_t k = first; k <= last; k++) {
        map_entry *e = fast_find(m, k);
        if (e) {
          comp_forget(m, e);
          e->slot = SLOT_TOMB;
        }
      }
    }
  }
  pthread_rwlock_unlock(&m->lock);
  if (wait) fast_drain(m, old); /* no native write still uses what was forgotten */
}

/* Off returns once no native write is in flight. */
void fast_allow_writes(fast_map *m, bool on) {
  pthread_rwlock_wrlock(&m->lock);
  m->writes_on = on;
  unsigned old = m->wepoch++;
  pthread_rwlock_unlock(&m->lock);
  fast_drain(m, old);
}

/* Off forgets everything and sends every read to JavaScript. */
void fast_enable(fast_map *m, bool on) {
  pthread_rwlock_wrlock(&m->lock);
  m->enabled = on;
  fast_record(m, 0, UINT64_MAX);
  if (!on) fast_forget_all(m);
  unsigned old = m->wepoch++;
  pthread_rwlock_unlock(&m->lock);
  fast_drain(m, old);
}

/*
 * `x` holds `count` doubles, triples [length, fd, host] (fd -1: zeroes)
 * describing guest bytes from `off`; `wr` (NULL: none) one byte per triple,
 * 1 when every byte of that piece may be overwritten in place. Whole granules
 * covered by one contiguous piece are remembered; granules invalidated since
 * generation `gen` are not.
 */
void fast_install(fast_map *m, double gen, double off, const double *x, size_t count, const uint8_t *wr) {
  const uint64_t G = 1ULL << GRANULE_BITS;
  pthread_rwlock_wrlock(&m->lock);
  if (m->enabled && gen >= 0 && (uint64_t)gen <= m->gen && m->gen - (uint64_t)gen < RING) {
    uint64_t since = (uint64_t)gen;
    uint64_t pos = (uint64_t)off;
    int last_fd = -1, last_slot = -1; /* pieces of one install mostly share one fd: fstat it once */
    for (size_t i = 0; i < count; i += 3) {
      uint64_t len = (uint64_t)x[i];
      int fd = (int)x[i + 1];
      uint64_t host = (uint64_t)x[i + 2];
      uint64_t end = pos + len;
      int slot = fd < 0 ? SLOT_ZERO : -100;
      for (uint64_t g = (pos + G - 1) & ~(G - 1); g + G <= end; g += G) {
        if (slot == -100) {
          slot = fd == last_fd ? last_slot : fast_slot(m, fd);
          last_fd = fd;
          last_slot = slot;
          if (slot < 0) break;
        }
        if (changed_since(m, since, g >> GRANULE_BITS)) continue;
        fast_put(m, g >> GRANULE_BITS, slot, fd < 0 ? 0 : host + (g - pos), 0, wr && fd >= 0 ? wr[i / 3] : 0);
      }
      pos = end;
    }
  }
  pthread_rwlock_unlock(&m->lock);
}

/*
 * `x` holds `count` doubles, records of 8: [offset, length, fd, host, clen,
 * cbits, skip, algo], each a guest range [offset, offset+length) inside one
 * compressed cluster (a qcow2 cluster or a vmdk grain; algo: inflate.h): its
 * compressed bytes at `host` (at most `clen` of them) in `fd`, 1 << cbits
 * bytes decompressed, `skip` the offset in it of guest byte `offset`. Whole granules are installed; a granule must lie inside its
 * cluster (clusters smaller than a granule are left to JavaScript); granules
 * invalidated since `gen` are skipped.
 */
void fast_install_compressed(fast_map *m, double gen, const double *x, size_t count) {
  const uint64_t G = 1ULL << GRANULE_BITS;
  if (!inflate_enabled()) return;
  pthread_rwlock_wrlock(&m->lock);
  if (m->enabled && gen >= 0 && (uint64_t)gen <= m->gen && m->gen - (uint64_t)gen < RING) {
    for (size_t i = 0; i + 8 <= count; i += 8) {
      const double *r = x + i;
      int fd = (int)r[2], cbits = (int)r[5], algo = (int)r[7];
      if (r[0] < 0 || r[1] <= 0 || r[3] < 0 || r[6] < 0 || fd < 0) continue;
      if (cbits < GRANULE_BITS || cbits > INFLATE_MAX_CLUSTER_BITS || algo < 0 || algo >= INFLATE_ALGOS)
        continue;
      uint64_t cs = 1ULL << cbits, pos = (uint64_t)r[0], len = (uint64_t)r[1], host = (uint64_t)r[3];
      uint64_t clen = (uint64_t)r[4], sk = (uint64_t)r[6];
      if (clen == 0 || clen > 2 * cs || sk >= cs || len > cs - sk) continue;
      int slot = -1;
      for (uint64_t g = (pos + G - 1) & ~(G - 1); g + G <= pos + len; g += G) {
        if (slot < 0 && (slot = fast_slot(m, fd)) < 0) break;
        if (changed_since(m, (uint64_t)gen, g >> GRANULE_BITS)) continue;
        fast_put(m, g >> GRANULE_BITS, slot, host, comp_pack((uint32_t)clen, (uint32_t)(sk + (g - pos)), cbits, algo), 0);
      }
    }
  }
  pthread_rwlock_unlock(&m->lock);
}
