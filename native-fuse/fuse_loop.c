/*
 * The request loop: worker threads that read the connection's one /dev/fuse
 * descriptor and hand each request to blk_handle (fuse3_ops.c); sending a
 * reply; the FUSE_NOTIFY_RESEND notification a successor sends.
 *
 * The pool: max_idle workers start (BLKEXPORT_FUSE_IDLE_THREADS, default 4)
 * and wait in read(2). A worker that takes a request while no other waits
 * starts one more, up to max_threads (BLKEXPORT_FUSE_MAX_THREADS, default
 * 64); a worker done with a request while max_idle others wait leaves. Most
 * requests are queued to JavaScript at once, so the pool only grows while
 * fast-path reads wait for the disk. Every worker blocks every signal: a
 * worker never needs one, and Node's handlers take a process-wide lock that a
 * thread interrupted in the wrong place would keep (commit 1b2e661).
 *
 * The end: read(2) answers ENODEV once the connection is gone (unmounted and
 * released, or aborted; ECONNABORTED with FUSE_ABORT_ERROR, which we do not
 * ask for). Every waiting worker gets it; the last one out queues OP_ENDED to
 * JavaScript and releases the threadsafe function. The descriptor stays open
 * until JavaScript has seen OP_ENDED (blk_fs_ended), so a late reply never
 * reaches a reused descriptor number.
 */
#include "blk_fs.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
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
  fs->max_threads = env_int("BLKEXPORT_FUSE_MAX_THREADS", 64, 1, 1024);
  fs->max_idle = env_int("BLKEXPORT_FUSE_IDLE_THREADS", 4, 1, fs->max_threads);
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

/* ---- the workers ------------------------------------------------------------- */

static void *worker(void *arg);

/* Starts one worker with every signal blocked; caller holds fs->lock. */
static int spawn_locked(blk_fs *fs) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  pthread_t t;
  int err = pthread_create(&t, &attr, worker, fs);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  if (err == 0) {
    fs->nthreads++;
    fs->idle++;
  }
  return err;
}

int blk_start(blk_fs *fs) {
  pthread_mutex_lock(&fs->lock);
  int err = 0;
  for (int i = 0; i < fs->max_idle && err == 0; i++) err = spawn_locked(fs);
  int started = fs->nthreads;
  pthread_mutex_unlock(&fs->lock);
  return started > 0 ? 0 : err;
}

/* The last worker out tells JavaScript; nothing of fs but tsfn is touched after that. */
static void queue_ended(blk_fs *fs) {
  blk_req *r = calloc(1, sizeof(*r));
  if (r) {
    r->fs = fs;
    r->op = OP_ENDED;
    napi_call_threadsafe_function(fs->tsfn, r, napi_tsfn_blocking);
  }
  napi_release_threadsafe_function(fs->tsfn, napi_tsfn_release);
}

/* A waiting worker leaves because reading failed: ENODEV is the normal end (the connection is gone);
 * anything else is kept as the loop's error. */
static void leave(blk_fs *fs, int err) {
  pthread_mutex_lock(&fs->lock);
  fs->stopping = 1;
  if (!fs->loop_errno && err != ENODEV) fs->loop_errno = err;
  fs->idle--;
  int last = --fs->nthreads == 0;
  pthread_mutex_unlock(&fs->lock);
  if (last) queue_ended(fs);
}

/* Reads one request; 0 on success (*n set), else the errno that ends this worker. */
static int read_request(blk_fs *fs, char *buf, size_t *n) {
  for (;;) {
    ssize_t got = read(fs->fd, buf, fs->bufsize);
    if (got > 0) {
      *n = (size_t)got;
      return 0;
    }
    int e = got == 0 ? ENODEV : errno;
    if (e == EINTR || e == ENOENT) continue; /* ENOENT: the request was interrupted before we got it */
    if (e == EAGAIN) { /* an adopted descriptor may be O_NONBLOCK (its flags are shared): wait for one */
      struct pollfd p = {.fd = fs->fd, .events = POLLIN};
      poll(&p, 1, -1);
      continue;
    }
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
 */
static char *buf_get(blk_fs *fs) {
  char *b = NULL;
  pthread_mutex_lock(&fs->lock);
  if (fs->nspare > 0) b = fs->spare[--fs->nspare];
  pthread_mutex_unlock(&fs->lock);
  if (b) return b;
  b = mmap(NULL, fs->bufsize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (b == MAP_FAILED) return NULL;
  (void)mlock(b, fs->bufsize); /* best effort: without CAP_IPC_LOCK it may exceed RLIMIT_MEMLOCK */
  return b;
}

static void buf_put(blk_fs *fs, char *b) {
  pthread_mutex_lock(&fs->lock);
  if (fs->nspare < BLK_SPARE_BUFFERS) {
    fs->spare[fs->nspare++] = b;
    b = NULL;
  }
  pthread_mutex_unlock(&fs->lock);
  if (b) munmap(b, fs->bufsize);
}

static void *worker(void *arg) {
  blk_fs *fs = arg;
  char *buf = buf_get(fs);
  if (!buf) {
    leave(fs, ENOMEM);
    return NULL;
  }
  for (;;) {
    size_t n = 0;
    int err = read_request(fs, buf, &n);
    if (err) {
      buf_put(fs, buf);
      leave(fs, err);
      return NULL;
    }
    pthread_mutex_lock(&fs->lock);
    if (--fs->idle == 0 && fs->nthreads < fs->max_threads && !fs->stopping) spawn_locked(fs);
    pthread_mutex_unlock(&fs->lock);

    blk_handle(fs, buf, n);

    pthread_mutex_lock(&fs->lock);
    if (fs->idle >= fs->max_idle) { /* enough others wait: leave (one at least, max_idle >= 1) */
      if (fs->nspare < BLK_SPARE_BUFFERS) { /* before leaving the count: the last worker's end frees spares */
        fs->spare[fs->nspare++] = buf;
        buf = NULL;
      }
      fs->nthreads--;
      pthread_mutex_unlock(&fs->lock);
      if (buf) munmap(buf, fs->bufsize);
      return NULL;
    }
    fs->idle++;
    pthread_mutex_unlock(&fs->lock);
  }
}

void blk_fs_ended(blk_fs *fs) {
  fs->ended = 1;
  /* Every worker has left (the last one queued OP_ENDED): their buffers are all spare. */
  while (fs->nspare > 0) munmap(fs->spare[--fs->nspare], fs->bufsize);
  if (fs->fd >= 0) close(fs->fd);
  fs->fd = -1;
  fast_destroy(&fs->fast);
}
