/*
 * blkexport's own FUSE binding on libfuse 3 (low-level API): a filesystem
 * whose root node is one regular file, mounted on a regular file.
 *
 * Why: fuse-native links libfuse 2.9, which speaks FUSE protocol 7.19 — every
 * request is at most 128 KiB and there is no asynchronous direct I/O, so
 * queued reads arrive one at a time. libfuse 3 negotiates 1 MiB requests and
 * async DIO, and its low-level API lets a request be answered later, from
 * any thread.
 *
 * How: libfuse worker threads turn each request into a small heap record and
 * queue it to the JavaScript thread (a threadsafe function) without waiting;
 * JavaScript does the block-layer work and answers through reply_* below,
 * which send the reply and free the record. A read's buffer is allocated here
 * and lent to JavaScript as an external Buffer until the reply; a write's data
 * is copied out of libfuse's per-thread receive buffer (which the thread
 * reuses as soon as the handler returns).
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <node_api.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

enum {
  OP_GETATTR = 1,
  OP_SETATTR = 2,
  OP_OPEN = 3,
  OP_READ = 4,
  OP_WRITE = 5,
  OP_FLUSH = 6,
  OP_FSYNC = 7,
  OP_FALLOCATE = 8,
  OP_LSEEK = 9,
  OP_ENDED = 100,
};

typedef struct {
  fuse_req_t req;
  int op;
  uint64_t off;
  size_t size;
  char *buf;
  int flags;       /* open flags, fallocate mode, setattr to_set */
  struct stat attr; /* setattr */
  int answered;
} blk_req;

/*
 * The read fast path. JavaScript installs what the block layer's caches know
 * about where guest bytes live (host fd + offset, or zeroes) per 64 KiB
 * granule; a read whose granules are all known is served here, in the libfuse
 * worker thread, with preads: no trip to JavaScript. Every write, truncate or
 * fallocate goes through JavaScript, which invalidates the range before and
 * after it (a generation counter drops installs computed meanwhile). Host fds
 * are dup()ed on first use and kept until the mount ends, so a node reopening
 * or closing its own fd never leaves a stale number here.
 */
#define GRANULE_BITS 16
#define MAX_SLOTS 64
#define SLOT_EMPTY (-2)
#define SLOT_TOMB (-3)
#define SLOT_ZERO (-1)

typedef struct {
  uint64_t key;
  int32_t slot;
  uint64_t host;
} map_entry;

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
  atomic_ullong reads, bytes;
} fast_map;

typedef struct {
  struct fuse_session *se;
  fast_map fast;
  napi_threadsafe_function tsfn;
  pthread_t thread;
  char *mountpoint;
  int loop_result;
  int ended; /* the loop finished; the session is destroyed (fs itself stays allocated: JS may hold it) */
  int unrefd;
} blk_fs;

#define NAPI_CALL(env, call)                                    \
  do {                                                          \
    if ((call) != napi_ok) {                                    \
      napi_throw_error((env), NULL, "N-API call failed: " #call); \
      return NULL;                                              \
    }                                                           \
  } while (0)

/* ---- the fast map ------------------------------------------------------------- */

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

static int fast_init(fast_map *m) {
  pthread_rwlock_init(&m->lock, NULL);
  m->cap = 1024;
  m->table = malloc(sizeof(map_entry) * m->cap);
  if (!m->table) return -1;
  fast_clear(m);
  m->enabled = 1;
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
static void fast_put(fast_map *m, uint64_t key, int32_t slot, uint64_t host) {
  map_entry *old = fast_find(m, key);
  if (old) {
    old->slot = slot;
    old->host = host;
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
        if (ot[i].slot != SLOT_EMPTY && ot[i].slot != SLOT_TOMB) fast_put(m, ot[i].key, ot[i].slot, ot[i].host);
      free(ot);
    } else {
      fast_clear(m);
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
      return;
    }
  }
}

/* The slot of a dup of `fd` (same file by dev/ino), or -1. Caller holds the write lock. */
static int fast_slot(fast_map *m, int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return -1;
  for (int i = 0; i < m->nfds; i++)
    if (m->devs[i] == st.st_dev && m->inos[i] == st.st_ino) return i;
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

static void fast_destroy(fast_map *m) {
  for (int i = 0; i < m->nfds; i++) close(m->fds[i]);
  m->nfds = 0;
  free(m->table);
  m->table = NULL;
  pthread_rwlock_destroy(&m->lock);
}

typedef struct {
  int32_t slot;
  uint64_t host;
  size_t len;
  size_t at;
} seg;

/* Serves a read from the fast map; returns 0 when it answered, -1 to let JavaScript serve it. */
static int fast_read(blk_fs *fs, fuse_req_t req, size_t size, uint64_t off) {
  fast_map *m = &fs->fast;
  seg segs[32];
  int nseg = 0;
  size_t n = 0;
  const uint64_t G = 1ULL << GRANULE_BITS;
  pthread_rwlock_rdlock(&m->lock);
  if (!m->enabled) {
    pthread_rwlock_unlock(&m->lock);
    return -1;
  }
  if (off >= m->fsize) {
    pthread_rwlock_unlock(&m->lock);
    fuse_reply_buf(req, NULL, 0);
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
    uint64_t host = e->slot == SLOT_ZERO ? 0 : e->host + (pos & (G - 1));
    seg *last = nseg ? &segs[nseg - 1] : NULL;
    if (last && last->slot == e->slot && (e->slot == SLOT_ZERO || last->host + last->len == host)) {
      last->len += len;
    } else {
      segs[nseg++] = (seg){e->slot, host, len, (size_t)(pos - off)};
    }
    pos += len;
  }
  int fds[32];
  for (int i = 0; i < nseg; i++) fds[i] = segs[i].slot >= 0 ? m->fds[segs[i].slot] : -1;
  pthread_rwlock_unlock(&m->lock);

  char *buf = malloc(n ? n : 1);
  if (!buf) return -1;
  for (int i = 0; i < nseg; i++) {
    if (segs[i].slot == SLOT_ZERO) {
      memset(buf + segs[i].at, 0, segs[i].len);
      continue;
    }
    size_t done = 0;
    while (done < segs[i].len) {
      ssize_t r = pread(fds[i], buf + segs[i].at + done, segs[i].len - done, (off_t)(segs[i].host + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        free(buf);
        return -1; /* let JavaScript serve it (and report the error) */
      }
      if (r == 0) { /* past the end of the host file: zeroes, as the file driver reads them */
        memset(buf + segs[i].at + done, 0, segs[i].len - done);
        break;
      }
      done += (size_t)r;
    }
  }
  fuse_reply_buf(req, buf, n);
  free(buf);
  atomic_fetch_add(&m->reads, 1);
  atomic_fetch_add(&m->bytes, n);
  return 0;
}

/* ---- libfuse side: queue requests to JavaScript -------------------------------- */

static blk_fs *fs_of(fuse_req_t req) { return (blk_fs *)fuse_req_userdata(req); }

static void queue(fuse_req_t req, blk_req *r) {
  blk_fs *fs = fs_of(req);
  if (napi_call_threadsafe_function(fs->tsfn, r, napi_tsfn_nonblocking) != napi_ok) {
    fuse_reply_err(req, EIO);
    free(r->buf);
    free(r);
  }
}

static blk_req *new_req(fuse_req_t req, int op) {
  blk_req *r = calloc(1, sizeof(*r));
  if (!r) {
    fuse_reply_err(req, ENOMEM);
    return NULL;
  }
  r->req = req;
  r->op = op;
  return r;
}

static void ll_init(void *userdata, struct fuse_conn_info *conn) {
  conn->max_write = 1 << 20;
  conn->max_readahead = 1 << 20;
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  conn->max_background = 64;
  conn->congestion_threshold = 48;
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) { fuse_reply_err(req, ENOENT); }

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  blk_req *r = new_req(req, OP_GETATTR);
  if (r) queue(req, r);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_SETATTR);
  if (!r) return;
  r->attr = *attr;
  r->flags = to_set;
  queue(req, r);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_OPEN);
  if (!r) return;
  r->flags = fi->flags;
  queue(req, r);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  if (fast_read(fs_of(req), req, size, (uint64_t)off) == 0) return;
  blk_req *r = new_req(req, OP_READ);
  if (!r) return;
  r->buf = malloc(size ? size : 1);
  if (!r->buf) {
    free(r);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  r->size = size;
  r->off = (uint64_t)off;
  queue(req, r);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_WRITE);
  if (!r) return;
  r->buf = malloc(size ? size : 1);
  if (!r->buf) {
    free(r);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  memcpy(r->buf, buf, size);
  r->size = size;
  r->off = (uint64_t)off;
  queue(req, r);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_FLUSH);
  if (r) queue(req, r);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_FSYNC);
  if (r) queue(req, r);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_FALLOCATE);
  if (!r) return;
  r->flags = mode;
  r->off = (uint64_t)offset;
  r->size = (size_t)length;
  queue(req, r);
}

static void ll_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi) {
  blk_req *r = new_req(req, OP_LSEEK);
  if (!r) return;
  r->off = (uint64_t)off;
  r->flags = whence;
  queue(req, r);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }

static void ll_statfs(fuse_req_t req, fuse_ino_t ino) {
  struct statvfs st;
  memset(&st, 0, sizeof(st));
  st.f_bsize = 512;
  st.f_frsize = 512;
  st.f_files = 1;
  st.f_namemax = 255;
  fuse_reply_statfs(req, &st);
}

static void ll_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) { fuse_reply_err(req, EBUSY); }

static const struct fuse_lowlevel_ops ops = {
    .init = ll_init,
    .lookup = ll_lookup,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .open = ll_open,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_flush,
    .fsync = ll_fsync,
    .fallocate = ll_fallocate,
    .lseek = ll_lseek,
    .release = ll_release,
    .statfs = ll_statfs,
    .unlink = ll_unlink,
};

static void *loop_thread(void *arg) {
  blk_fs *fs = arg;
  struct fuse_loop_config *cfg = fuse_loop_cfg_create();
  const char *idle = getenv("BLKEXPORT_FUSE_IDLE_THREADS");
  const char *clone = getenv("BLKEXPORT_FUSE_CLONE_FD");
  fuse_loop_cfg_set_clone_fd(cfg, clone ? atoi(clone) : 1);
  fuse_loop_cfg_set_idle_threads(cfg, idle ? (unsigned)atoi(idle) : 4);
  fuse_loop_cfg_set_max_threads(cfg, 64);
  fs->loop_result = fuse_session_loop_mt(fs->se, cfg);
  fuse_loop_cfg_destroy(cfg);
  /* The connection is gone (unmounted and released, or aborted): tell JavaScript. */
  blk_req *r = calloc(1, sizeof(*r));
  if (r) {
    r->op = OP_ENDED;
    napi_call_threadsafe_function(fs->tsfn, r, napi_tsfn_blocking);
  }
  napi_release_threadsafe_function(fs->tsfn, napi_tsfn_release);
  return NULL;
}

/* ---- JavaScript side --------------------------------------------------------- */

static void free_req(blk_req *r) {
  free(r->buf);
  free(r);
}

static void noop_finalize(napi_env env, void *data, void *hint) {}

/* Called on the JS thread for each queued request: dispatch(op, req, a, b, c, d, e, buf). */
static void call_js(napi_env env, napi_value js_cb, void *context, void *data) {
  blk_req *r = data;
  blk_fs *fs = context;
  if (env == NULL) { /* the function is being torn down */
    if (r->op != OP_ENDED) fuse_reply_err(r->req, ENOTCONN);
    free_req(r);
    return;
  }
  napi_value argv[8], undef;
  napi_get_undefined(env, &undef);
  for (int i = 0; i < 8; i++) argv[i] = undef;
  napi_create_int32(env, r->op, &argv[0]);
  if (r->op == OP_ENDED) {
    napi_create_int32(env, fs->loop_result, &argv[2]);
    free_req(r);
    napi_call_function(env, undef, js_cb, 8, argv, NULL);
    /* The session can go now: no worker thread is left. */
    pthread_join(fs->thread, NULL);
    fuse_session_destroy(fs->se);
    fs->se = NULL;
    fs->ended = 1;
    fast_destroy(&fs->fast);
    return;
  }
  napi_create_external(env, r, NULL, NULL, &argv[1]);
  switch (r->op) {
    case OP_SETATTR:
      napi_create_int32(env, r->flags, &argv[2]);
      napi_create_uint32(env, r->attr.st_mode, &argv[3]);
      napi_create_uint32(env, r->attr.st_uid, &argv[4]);
      napi_create_uint32(env, r->attr.st_gid, &argv[5]);
      napi_create_double(env, (double)r->attr.st_size, &argv[6]);
      break;
    case OP_OPEN:
      napi_create_int32(env, r->flags, &argv[2]);
      break;
    case OP_READ:
    case OP_WRITE:
      napi_create_double(env, (double)r->size, &argv[2]);
      napi_create_double(env, (double)r->off, &argv[3]);
      napi_create_external_buffer(env, r->size, r->buf, noop_finalize, NULL, &argv[7]);
      break;
    case OP_LSEEK:
      napi_create_double(env, (double)r->off, &argv[2]);
      napi_create_int32(env, r->flags, &argv[3]);
      break;
    case OP_FALLOCATE:
      napi_create_int32(env, r->flags, &argv[2]);
      napi_create_double(env, (double)r->off, &argv[3]);
      napi_create_double(env, (double)r->size, &argv[4]);
      break;
    default:
      break;
  }
  napi_value result;
  if (napi_call_function(env, undef, js_cb, 8, argv, &result) != napi_ok) {
    /* The handler threw synchronously: answer EIO so the request never hangs. */
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    if (!r->answered) {
      r->answered = 1;
      fuse_reply_err(r->req, EIO);
      free_req(r);
    }
  }
}

static blk_req *req_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "expected a request handle");
    return NULL;
  }
  blk_req *r = p;
  if (r->answered) {
    napi_throw_error(env, NULL, "request already answered");
    return NULL;
  }
  r->answered = 1;
  return r;
}

/* mount(mountpoint, options, dispatch) -> handle */
static napi_value js_mount(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  char mnt[4096], opts[4096];
  size_t len;
  NAPI_CALL(env, napi_get_value_string_utf8(env, argv[0], mnt, sizeof(mnt), &len));
  NAPI_CALL(env, napi_get_value_string_utf8(env, argv[1], opts, sizeof(opts), &len));

  blk_fs *fs = calloc(1, sizeof(*fs));
  if (!fs) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  if (fast_init(&fs->fast) != 0) {
    free(fs);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  char *fuse_argv[] = {"blkexport", "-o", opts, NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
  fs->se = fuse_session_new(&args, &ops, sizeof(ops), fs);
  if (!fs->se) {
    free(fs);
    napi_throw_error(env, "EINVAL", "fuse_session_new failed (bad options?)");
    return NULL;
  }
  if (fuse_session_mount(fs->se, mnt) != 0) {
    fuse_session_destroy(fs->se);
    free(fs);
    napi_throw_error(env, "EMOUNT", "fuse_session_mount failed");
    return NULL;
  }
  fs->mountpoint = strdup(mnt);
  napi_value name;
  napi_create_string_utf8(env, "blkexport-fuse3", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, NULL, NULL, fs, call_js, &fs->tsfn) != napi_ok) {
    fuse_session_unmount(fs->se);
    fuse_session_destroy(fs->se);
    free(fs->mountpoint);
    free(fs);
    napi_throw_error(env, NULL, "napi_create_threadsafe_function failed");
    return NULL;
  }
  if (pthread_create(&fs->thread, NULL, loop_thread, fs) != 0) {
    napi_release_threadsafe_function(fs->tsfn, napi_tsfn_abort);
    fuse_session_unmount(fs->se);
    fuse_session_destroy(fs->se);
    free(fs->mountpoint);
    free(fs);
    napi_throw_error(env, NULL, "pthread_create failed");
    return NULL;
  }
  napi_value handle;
  NAPI_CALL(env, napi_create_external(env, fs, NULL, NULL, &handle));
  return handle;
}

/* Reads `n` arguments into argv (missing ones are undefined); the first is a request, claimed for one answer. */
static blk_req *req_args(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  return req_arg(env, argv[0]);
}

/* reply_err(req, errno) */
static napi_value js_reply_err(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  blk_req *r = req_args(env, info, argv, 2);
  if (!r) return NULL;
  int32_t err = EIO;
  napi_get_value_int32(env, argv[1], &err);
  fuse_reply_err(r->req, err < 0 ? -err : err);
  free_req(r);
  return NULL;
}

/* reply_attr(req, mode, uid, gid, size, blocks, timeoutSec) */
static napi_value js_reply_attr(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  blk_req *r = req_args(env, info, argv, 7);
  if (!r) return NULL;
  uint32_t mode = 0, uid = 0, gid = 0;
  double size = 0, blocks = 0, timeout = 1;
  napi_get_value_uint32(env, argv[1], &mode);
  napi_get_value_uint32(env, argv[2], &uid);
  napi_get_value_uint32(env, argv[3], &gid);
  napi_get_value_double(env, argv[4], &size);
  napi_get_value_double(env, argv[5], &blocks);
  napi_get_value_double(env, argv[6], &timeout);
  struct stat st;
  memset(&st, 0, sizeof(st));
  st.st_ino = FUSE_ROOT_ID;
  st.st_mode = mode;
  st.st_nlink = 1;
  st.st_uid = uid;
  st.st_gid = gid;
  st.st_size = (off_t)size;
  st.st_blocks = (blkcnt_t)blocks;
  st.st_blksize = 512;
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  st.st_atim = now;
  st.st_mtim = now;
  st.st_ctim = now;
  fuse_reply_attr(r->req, &st, timeout);
  free_req(r);
  return NULL;
}

/* reply_open(req, directIo, keepCache) */
static napi_value js_reply_open(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  blk_req *r = req_args(env, info, argv, 3);
  if (!r) return NULL;
  bool direct = false, keep = false;
  napi_get_value_bool(env, argv[1], &direct);
  napi_get_value_bool(env, argv[2], &keep);
  struct fuse_file_info fi;
  memset(&fi, 0, sizeof(fi));
  fi.direct_io = direct;
  fi.keep_cache = keep;
  fi.flags = r->flags;
  fuse_reply_open(r->req, &fi);
  free_req(r);
  return NULL;
}

/* The request and byte count of reply_data/reply_write(req, n); n is clamped to the request's size. */
static blk_req *req_and_count(napi_env env, napi_callback_info info, size_t *count) {
  napi_value argv[2];
  blk_req *r = req_args(env, info, argv, 2);
  if (!r) return NULL;
  double n = 0;
  napi_get_value_double(env, argv[1], &n);
  if (n < 0 || n > (double)r->size) n = (double)r->size;
  *count = (size_t)n;
  return r;
}

/* reply_data(req, n): sends the first n bytes of the read buffer. */
static napi_value js_reply_data(napi_env env, napi_callback_info info) {
  size_t n = 0;
  blk_req *r = req_and_count(env, info, &n);
  if (!r) return NULL;
  fuse_reply_buf(r->req, r->buf, n);
  free_req(r);
  return NULL;
}

/* reply_write(req, n) */
static napi_value js_reply_write(napi_env env, napi_callback_info info) {
  size_t n = 0;
  blk_req *r = req_and_count(env, info, &n);
  if (!r) return NULL;
  fuse_reply_write(r->req, n);
  free_req(r);
  return NULL;
}

/* reply_lseek(req, offset) */
static napi_value js_reply_lseek(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  blk_req *r = req_args(env, info, argv, 2);
  if (!r) return NULL;
  double off = 0;
  napi_get_value_double(env, argv[1], &off);
  fuse_reply_lseek(r->req, (off_t)off);
  free_req(r);
  return NULL;
}

static blk_fs *fs_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "expected a mount handle");
    return NULL;
  }
  blk_fs *fs = p;
  return fs->ended ? NULL : fs;
}

/* fastGen(handle) -> generation (a number) */
static napi_value js_fast_gen(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = fs_arg(env, argv[0]);
  double g = -1;
  if (fs) {
    pthread_rwlock_rdlock(&fs->fast.lock);
    g = (double)fs->fast.gen;
    pthread_rwlock_unlock(&fs->fast.lock);
  }
  napi_create_double(env, g, &out);
  return out;
}

/* fastInvalidate(handle, offset, length, size): bumps the generation, forgets the range, sets the size (-1: keep). */
static napi_value js_fast_invalidate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = fs_arg(env, argv[0]);
  if (!fs) return NULL;
  double off = 0, len = 0, size = -1;
  napi_get_value_double(env, argv[1], &off);
  napi_get_value_double(env, argv[2], &len);
  napi_get_value_double(env, argv[3], &size);
  fast_map *m = &fs->fast;
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
  if (size >= 0) m->fsize = (uint64_t)size;
  if (len > 0) {
    if (last - first > 256) {
      fast_clear(m);
    } else {
      for (uint64_t k = first; k <= last; k++) {
        map_entry *e = fast_find(m, k);
        if (e) e->slot = SLOT_TOMB;
      }
    }
  }
  pthread_rwlock_unlock(&m->lock);
  return NULL;
}

/* fastEnable(handle, on): off forgets everything and sends every read to JavaScript. */
static napi_value js_fast_enable(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = fs_arg(env, argv[0]);
  if (!fs) return NULL;
  bool on = false;
  napi_get_value_bool(env, argv[1], &on);
  pthread_rwlock_wrlock(&fs->fast.lock);
  fs->fast.enabled = on;
  fast_record(&fs->fast, 0, UINT64_MAX);
  if (!on) fast_clear(&fs->fast);
  pthread_rwlock_unlock(&fs->fast.lock);
  return NULL;
}

/*
 * fastInstall(handle, gen, offset, extents): extents is a Float64Array of
 * triples [length, fd, host] (fd -1: zeroes) describing guest bytes from
 * `offset`. Whole granules covered by one contiguous piece are remembered;
 * nothing is installed when the generation moved since `gen` was read.
 */
static napi_value js_fast_install(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = fs_arg(env, argv[0]);
  if (!fs) return NULL;
  double gen = -1, off = 0;
  napi_get_value_double(env, argv[1], &gen);
  napi_get_value_double(env, argv[2], &off);
  napi_typedarray_type type;
  size_t count = 0;
  void *data = NULL;
  if (napi_get_typedarray_info(env, argv[3], &type, &count, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || count % 3 != 0)
    return NULL;
  const double *x = data;
  const uint64_t G = 1ULL << GRANULE_BITS;
  fast_map *m = &fs->fast;
  pthread_rwlock_wrlock(&m->lock);
  if (m->enabled && gen >= 0 && (uint64_t)gen <= m->gen && m->gen - (uint64_t)gen < RING) {
    uint64_t since = (uint64_t)gen;
    uint64_t pos = (uint64_t)off;
    for (size_t i = 0; i < count; i += 3) {
      uint64_t len = (uint64_t)x[i];
      int fd = (int)x[i + 1];
      uint64_t host = (uint64_t)x[i + 2];
      uint64_t end = pos + len;
      int slot = fd < 0 ? SLOT_ZERO : -100;
      for (uint64_t g = (pos + G - 1) & ~(G - 1); g + G <= end; g += G) {
        if (slot == -100) {
          slot = fast_slot(m, fd);
          if (slot < 0) break;
        }
        if (changed_since(m, since, g >> GRANULE_BITS)) continue;
        fast_put(m, g >> GRANULE_BITS, slot, fd < 0 ? 0 : host + (g - pos));
      }
      pos = end;
    }
  }
  pthread_rwlock_unlock(&m->lock);
  return NULL;
}

/* fastStats(handle) -> [reads, bytes] served without JavaScript */
static napi_value js_fast_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out, v;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *p = NULL;
  NAPI_CALL(env, napi_get_value_external(env, argv[0], &p));
  blk_fs *fs = p;
  napi_create_array_with_length(env, 2, &out);
  napi_create_double(env, fs->ended ? 0 : (double)atomic_load(&fs->fast.reads), &v);
  napi_set_element(env, out, 0, v);
  napi_create_double(env, fs->ended ? 0 : (double)atomic_load(&fs->fast.bytes), &v);
  napi_set_element(env, out, 1, v);
  return out;
}

/* unref(handle): after an unmount, lets the process exit even if descriptors keep the connection alive. */
static napi_value js_unref(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *p = NULL;
  NAPI_CALL(env, napi_get_value_external(env, argv[0], &p));
  blk_fs *fs = p;
  if (fs && !fs->ended && !fs->unrefd) {
    napi_unref_threadsafe_function(env, fs->tsfn);
    fs->unrefd = 1;
  }
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"mount", NULL, js_mount, NULL, NULL, NULL, napi_default, NULL},
      {"replyErr", NULL, js_reply_err, NULL, NULL, NULL, napi_default, NULL},
      {"replyAttr", NULL, js_reply_attr, NULL, NULL, NULL, napi_default, NULL},
      {"replyOpen", NULL, js_reply_open, NULL, NULL, NULL, napi_default, NULL},
      {"replyData", NULL, js_reply_data, NULL, NULL, NULL, napi_default, NULL},
      {"replyWrite", NULL, js_reply_write, NULL, NULL, NULL, napi_default, NULL},
      {"replyLseek", NULL, js_reply_lseek, NULL, NULL, NULL, napi_default, NULL},
      {"unref", NULL, js_unref, NULL, NULL, NULL, napi_default, NULL},
      {"fastGen", NULL, js_fast_gen, NULL, NULL, NULL, napi_default, NULL},
      {"fastInvalidate", NULL, js_fast_invalidate, NULL, NULL, NULL, napi_default, NULL},
      {"fastEnable", NULL, js_fast_enable, NULL, NULL, NULL, napi_default, NULL},
      {"fastInstall", NULL, js_fast_install, NULL, NULL, NULL, napi_default, NULL},
      {"fastStats", NULL, js_fast_stats, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
