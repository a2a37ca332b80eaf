/*
 * The write fast path: a write whose granules are all installed writable
 * (fast_map.c: JavaScript marks a granule so only when every byte of it can be
 * overwritten in place: a raw file, or qcow2 data clusters with COPIED set,
 * not compressed, not zero-flagged, every subcluster allocated, their entries
 * already in the file) is done here, in the worker thread that read the
 * request, with pwrite to the host file: no trip to JavaScript. Allocation,
 * copy-on-write and metadata stay in JavaScript.
 *
 * Exactness: a worker looks the granules up under the map's read lock and,
 * still under it, counts itself in flight for the current epoch; it counts
 * itself out when its last pwrite has returned. JavaScript changes a
 * granule's mapping only after invalidating it (fast_invalidate), which
 * forgets the granules and moves the epoch under the write lock, then waits
 * for the old epoch's count to reach zero (fast_drain): so the invalidation
 * returns only once every native write that could have used the old mapping
 * has landed, and no native write looks it up afterwards. Installs do not
 * wait: they only add or restate mappings that are true (a mapping changes
 * only after an invalidation), so a write in flight stays right. Two counters
 * suffice because the JavaScript thread drains each epoch before it moves
 * the next; the wait is at most one pwrite per worker, and only changes pay it.
 * (Holding the read lock across the pwrite would be simpler, but every
 * install from JavaScript would then wait for writes in flight: measured, a
 * sixth of the JavaScript thread's time under allocating writes.)
 *
 * Bounds: the write must lie inside the size JavaScript gave (a write past it
 * goes to JavaScript, which refuses, shortens or grows). An error (EBADF on a
 * descriptor dup()ed read-only, ENOSPC, EIO) or a short write hands the whole
 * request to JavaScript, which writes it again (an overwrite in place is
 * idempotent) and reports the error if it persists.
 */
#include "fast_map.h"

#include <errno.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#define MAX_SEGS 32

typedef struct {
  int fd;
  uint64_t host;
  size_t len;
  size_t at;
} wseg;

ssize_t fast_write(fast_map *m, const char *data, size_t size, uint64_t off) {
  const uint64_t G = 1ULL << GRANULE_BITS;
  wseg segs[MAX_SEGS];
  int nseg = 0;
  if (size == 0) return -1;
  pthread_rwlock_rdlock(&m->lock);
  /* fsize is FSIZE_UNKNOWN (UINT64_MAX) until JavaScript sets it: writes_on is off until then too. */
  if (!m->enabled || !m->writes_on || off > m->fsize || size > m->fsize - off) goto slow;
  for (uint64_t pos = off; pos < off + size;) {
    int fd, wr;
    uint64_t host;
    if (!fast_lookup(m, pos >> GRANULE_BITS, &fd, &host, &wr) || !wr) goto slow;
    uint64_t gend = ((pos >> GRANULE_BITS) + 1) << GRANULE_BITS;
    size_t len = (size_t)((gend < off + size ? gend : off + size) - pos);
    host += pos & (G - 1);
    wseg *last = nseg ? &segs[nseg - 1] : NULL;
    if (last && last->fd == fd && last->host + last->len == host) {
      last->len += len;
    } else {
      if (nseg == MAX_SEGS) goto slow;
      segs[nseg++] = (wseg){fd, host, len, (size_t)(pos - off)};
    }
    pos += len;
  }
  atomic_int *inflight = &m->winflight[m->wepoch & 1];
  atomic_fetch_add(inflight, 1);
  pthread_rwlock_unlock(&m->lock);
  for (int i = 0; i < nseg; i++) {
    size_t done = 0;
    while (done < segs[i].len) {
      ssize_t r = pwrite(segs[i].fd, data + segs[i].at + done, segs[i].len - done, (off_t)(segs[i].host + done));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        atomic_fetch_sub(inflight, 1);
        return -1;
      }
      done += (size_t)r;
    }
  }
  atomic_fetch_sub(inflight, 1);
  atomic_fetch_add(&m->writes, 1);
  atomic_fetch_add(&m->wbytes, size);
  return (ssize_t)size;
slow:
  pthread_rwlock_unlock(&m->lock);
  return -1;
}

void fast_drain(fast_map *m, unsigned old) {
  atomic_int *inflight = &m->winflight[old & 1];
  for (int spins = 0; atomic_load(inflight) > 0; spins++) {
    if (spins < 64) {
      sched_yield();
    } else {
      struct timespec ts = {0, 20000}; /* a pwrite that waits for the disk: do not burn the CPU */
      nanosleep(&ts, NULL);
    }
  }
}
