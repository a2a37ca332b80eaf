/*
 * The request loop: one process-wide pool of worker threads that wait on an
 * epoll set holding every connection's /dev/fuse descriptor, read requests
 * and hand each to blk_handle (fuse3_ops.c); sending a reply; the
 * FUSE_NOTIFY_RESEND notification a successor sends.
 *
 * Why one pool for all connections: a worker waiting for a request must own
 * a read buffer of max_write + 4 KiB (1 MiB) that is resident (see buf_get),
 * so workers per connection made memory and threads grow with the number of
 * exports (four waiting workers each: 926 MiB RSS for 200 exports). The pool's
 * memory and threads depend on the load instead: max_idle workers wait
 * (BLKEXPORT_FUSE_IDLE_THREADS, default 4); a worker that takes a request
 * while no other waits starts one more, up to max_threads
 * (BLKEXPORT_FUSE_MAX_THREADS, default 64); a worker done with a request
 * while max_idle others wait leaves. Every worker blocks every signal: a
 * worker never needs one, and Node's handlers take a process-wide lock that a
 * thread interrupted in the wrong place would keep (commit 1b2e661).
 *
 * One reader per connection at a time: each descriptor is in the epoll set
 * with EPOLLONESHOT, so the worker woken for it holds its one "token" (no
 * other worker is woken for it until the token goes back), reads one request
 * (the descriptor is O_NONBLOCK), re-arms the descriptor, and only then
 * handles the request; so requests of one connection are still handled by
 * several workers at once, as before. fs->refs counts the token (1 while the
 * descriptor is in the set) and the requests being handled by workers.
 *
 * The end: read(2) answers ENODEV once the connection is gone (unmounted and
 * released, or aborted; ECONNABORTED with FUSE_ABORT_ERROR, which we do not
 * ask for); epoll reports it as EPOLLERR. The token holder takes the
 * descriptor out of the set and drops the token; the last reference out
 * queues OP_ENDED to JavaScript and releases the threadsafe function. The
 * descriptor stays open until JavaScript has seen OP_ENDED (blk_fs_ended),
 * so a late reply never reaches a reused descriptor number.
 */
#include "blk_fs.h"
#include "inflate.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

static int env_int(const char *name, int dflt, int lo, int hi) {
  const char *v = getenv(name);
  if (!v || !*v) return dflt;
  char *end;
  long n = strtol(v, &end, 10);
  if (*end || n < lo) return lo;
  return n > hi ? hi : (int)n;
}

blk_fs *blk_fs_new(void) {
  blk_fs *fs = calloc(1, sizeof(*fs));
  if (!fs) return NULL;
  if (fast_init(&fs->fast) != 0) {
    free(fs);
    return NULL;
  }
  pthread_mutex_init(&fs->lock, NULL);
  fs->fd = -1;
  fs->pt_fd = -1; /* no passthrough unless mount() is given the image's descriptor */
  return fs;
}

/* ---- sending ----------------------------------------------------------------- */

int blk_send(blk_fs *fs, uint64_t unique, int error, struct iovec *iov, int n) {
  if (fs->ended) return ENOTCONN; /* the descriptor is closed; its number may be another file's now */
  struct fuse_out_header oh;
  oh.len = sizeof(oh);
  for (int i = 1; i < n; i++) oh.len += (uint32_t)iov[i].iov_len;
  /* The kernel refuses errors outside (-512, 0] and would leave the request waiting. */
  oh.error = error > 0 || error <= -512 ? -ERANGE : error;
  oh.unique = unique;
  iov[0].iov_base = &oh;
  iov[0].iov_len = sizeof(oh);
  for (;;) {
    if (writev(fs->fd, iov, n) >= 0) return 0;
    if (errno != EINTR) break;
  }
  /* ENOENT: the request is gone (interrupted, aborted, or requeued by a resend and read again). */
  return errno;
}

int blk_notify_resend(int fd) {
  struct fuse_out_header oh = {.len = sizeof(oh), .error = FUSE_NOTIFY_RESEND, .unique = 0};
  for (;;) {
    if (write(fd, &oh, sizeof(oh)) == (ssize_t)sizeof(oh)) return 0;
    if (errno != EINTR) return errno;
  }
}

/* ---- the pool ------------------------------------------------------------------ */

static struct {
  pthread_mutex_t lock;
  int epfd; /* created by the first blk_start */
  int nthreads, idle, max_threads, max_idle;
  size_t bufsize; /* every worker's buffer holds at least this: the largest any connection needs */
  /* Read buffers of workers that left, kept resident for the next ones (see buf_get). */
  char *spare[BLK_SPARE_BUFFERS];
  size_t spare_size[BLK_SPARE_BUFFERS];
  int nspare;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .epfd = -1};

static void *worker(void *arg);

/* Starts one worker with every signal blocked; caller holds pool.lock. */
static int spawn_locked(void) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  pthread_t t;
  int err = pthread_create(&t, &attr, worker, NULL);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  if (err == 0) {
    pool.nthreads++;
    pool.idle++;
  }
  return err;
}

/* Puts fs's descriptor (back) into the set for one event. */
static int arm(blk_fs *fs, int op) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.ptr = fs};
  return epoll_ctl(pool.epfd, op, fs->fd, &ev) == 0 ? 0 : errno;
}

int blk_start(blk_fs *fs) {
  int fl = fcntl(fs->fd, F_GETFL);
  if (fl < 0 || fcntl(fs->fd, F_SETFL, fl | O_NONBLOCK) < 0) return errno;
  pthread_mutex_lock(&pool.lock);
  int err = 0;
  if (pool.epfd < 0) {
    pool.max_threads = env_int("BLKEXPORT_FUSE_MAX_THREADS", 64, 1, 1024);
    pool.max_idle = env_int("BLKEXPORT_FUSE_IDLE_THREADS", 4, 1, pool.max_threads);
    pool.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (pool.epfd < 0) err = errno;
  }
  if (!err && fs->bufsize > pool.bufsize) pool.bufsize = fs->bufsize; /* before the first event for fs */
  while (!err && pool.nthreads < pool.max_idle) err = spawn_locked();
  if (pool.nthreads > 0) err = 0; /* fewer idle workers than wanted still serve */
  pthread_mutex_unlock(&pool.lock);
  if (err) return err;
  fs->refs = 1; /* the token */
  return arm(fs, EPOLL_CTL_ADD);
}

/* The last reference out tells JavaScript; nothing of fs but tsfn is touched after that. */
static void queue_ended(blk_fs *fs) {
  blk_req *r = calloc(1, sizeof(*r));
  if (r) {
    r->fs = fs;
    r->op = OP_ENDED;
    napi_call_threadsafe_function(fs->tsfn, r, napi_tsfn_blocking);
  }
  napi_release_threadsafe_function(fs->tsfn, napi_tsfn_release);
}

/* Drops a reference of fs: a handled request (err 0), or the token, with the errno that ended the
 * connection's loop (ENODEV is the normal end: the connection is gone). */
static void unref_fs(blk_fs *fs, int err) {
  pthread_mutex_lock(&fs->lock);
  if (err) {
    fs->stopping = 1;
    if (!fs->loop_errno && err != ENODEV) fs->loop_errno = err;
  }
  int last = --fs->refs == 0;
  pthread_mutex_unlock(&fs->lock);
  if (last) queue_ended(fs);
}

/* Reads one request without blocking: 0 (*n set), EAGAIN (none after all), or the errno that ends fs. */
static int read_request(blk_fs *fs, char *buf, size_t size, size_t *n) {
  for (;;) {
    ssize_t got = read(fs->fd, buf, size);
    if (got > 0) {
      *n = (size_t)got;
      return 0;
    }
    int e = got == 0 ? ENODEV : errno;
    if (e == EINTR || e == ENOENT) continue; /* ENOENT: the request was interrupted before we got it */
    return e;
  }
}

/*
 * A worker's read buffer, resident before the first read: the kernel copies a
 * request into it by pinning its pages, and when a page is not there yet it
 * must fault it in, which fails while the process is being killed (SIGKILL of
 * the agent). The kernel then ends that request with EIO instead of leaving it
 * for a successor's FUSE_NOTIFY_RESEND. So the pages are populated (and locked
 * where allowed) up front, and a leaving worker's buffer is kept for the next.
 * Caller holds pool.lock; *size becomes the buffer's size.
 */
static char *buf_get_locked(size_t *size) {
  while (pool.nspare > 0) {
    pool.nspare--;
    if (pool.spare_size[pool.nspare] >= pool.bufsize) {
      *size = pool.spare_size[pool.nspare];
      return pool.spare[pool.nspare];
    }
    munmap(pool.spare[pool.nspare], pool.spare_size[pool.nspare]); /* too small since a larger connection came */
  }
  size_t want = pool.bufsize;
  char *b = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (b == MAP_FAILED) return NULL;
  (void)mlock(b, want); /* best effort: without CAP_IPC_LOCK it may exceed RLIMIT_MEMLOCK */
  *size = want;
  return b;
}

/* Keeps a leaving worker's buffer for the next, or unmaps it; caller holds pool.lock. */
static void buf_put_locked(char *b, size_t size) {
  if (pool.nspare < BLK_SPARE_BUFFERS) {
    pool.spare[pool.nspare] = b;
    pool.spare_size[pool.nspare++] = size;
  } else {
    munmap(b, size);
  }
}

/* One event: fs's token is ours. Reads one request, gives the token back, handles the request. */
static void serve_one(blk_fs *fs, char *buf, size_t size) {
  size_t n = 0;
  int err = read_request(fs, buf, size, &n);
  if (err == EAGAIN) { /* woken, but another reader (a predecessor's late worker) took it */
    if ((err = arm(fs, EPOLL_CTL_MOD)) == 0) return;
  }
  if (err) {
    epoll_ctl(pool.epfd, EPOLL_CTL_DEL, fs->fd, NULL);
    unref_fs(fs, err);
    return;
  }
  pthread_mutex_lock(&fs->lock);
  fs->refs++; /* the request, while we handle it */
  pthread_mutex_unlock(&fs->lock);
  if ((err = arm(fs, EPOLL_CTL_MOD)) != 0) { /* cannot happen short of ENOMEM: end the connection's loop */
    epoll_ctl(pool.epfd, EPOLL_CTL_DEL, fs->fd, NULL);
    unref_fs(fs, err);
  }
  blk_handle(fs, buf, n);
  unref_fs(fs, 0);
}

/* A worker's life: wait, serve, until enough others wait. */
static void work(void) {
  pthread_setname_np(pthread_self(), "blk-fuse"); /* how tests and `top -H` tell them from libuv's */
  size_t size = 0;
  pthread_mutex_lock(&pool.lock);
  char *buf = buf_get_locked(&size);
  if (!buf) {
    pool.nthreads--;
    pool.idle--;
    pthread_mutex_unlock(&pool.lock);
    return;
  }
  pthread_mutex_unlock(&pool.lock);
  for (;;) {
    struct epoll_event ev;
    int got = epoll_wait(pool.epfd, &ev, 1, -1);
    if (got <= 0) continue; /* EINTR (signals are blocked, but ptrace and suspend can cause it) */
    pthread_mutex_lock(&pool.lock);
    if (--pool.idle == 0 && pool.nthreads < pool.max_threads) spawn_locked();
    if (size < pool.bufsize) { /* a connection needing a larger buffer joined since */
      munmap(buf, size);
      buf = buf_get_locked(&size);
    }
    pthread_mutex_unlock(&pool.lock);
    blk_fs *fs = ev.data.ptr;
    if (buf) {
      serve_one(fs, buf, size);
    } else { /* out of memory: this connection's loop ends with ENOMEM */
      epoll_ctl(pool.epfd, EPOLL_CTL_DEL, fs->fd, NULL);
      unref_fs(fs, ENOMEM);
    }
    pthread_mutex_lock(&pool.lock);
    if (!buf || pool.idle >= pool.max_idle) { /* enough others wait: leave */
      if (buf) buf_put_locked(buf, size);
      pool.nthreads--;
      pthread_mutex_unlock(&pool.lock);
      return;
    }
    pool.idle++;
    pthread_mutex_unlock(&pool.lock);
  }
}

static void *worker(void *arg) {
  (void)arg;
  work();
  inflate_thread_end(); /* this thread's inflation buffers (inflate.c) */
  return NULL;
}

void blk_fs_ended(blk_fs *fs) {
  fs->ended = 1;
  /* No worker holds fs any more (the last reference queued OP_ENDED), and it left the epoll set. */
  if (fs->fd >= 0) close(fs->fd);
  fs->fd = -1;
  fast_destroy(&fs->fast);
}
