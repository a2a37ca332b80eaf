/*
 * blkexport's own FUSE binding: a filesystem whose root node is one regular
 * file, mounted on a regular file, served by our own request loop on the FUSE
 * kernel protocol (<linux/fuse.h>). This header holds what its parts share:
 * the op codes, the request record, the negotiated INIT and the per-mount state.
 *
 * Why our own loop: a FUSE connection lives as long as any descriptor of its
 * /dev/fuse session is open, so a successor process holding a dup can go on
 * serving it. But the kernel sends INIT once, to the first server, and libfuse
 * (3.14) cannot serve a connection whose INIT it did not answer, nor ask the
 * kernel to requeue what a dead server had read (FUSE_NOTIFY_RESEND). And
 * why not fuse-native: libfuse 2.9 speaks protocol 7.19 (128 KiB requests, no
 * asynchronous direct I/O).
 *
 * How:
 *   - mount: libfuse mounts and nothing else (fuse_session_new +
 *     fuse_session_mount: option parsing, mount(2) as root, fusermount3
 *     otherwise); we keep a dup of the session's /dev/fuse descriptor and
 *     destroy the session at once. adopt: a descriptor another process kept.
 *   - One process-wide pool of worker threads (fuse_loop.c) waits on an
 *     epoll set of every connection's one descriptor (no clone_fd: a cloned
 *     descriptor's unanswered requests are aborted when it closes, a shared
 *     one's stay for a successor) and reads requests, each worker into its
 *     own resident buffer of max_write (or max_pages pages) + 4 KiB; the
 *     workers block every signal. They
 *     answer INIT, lookup, statfs, release, unlink, destroy, fast-path
 *     reads and in-place writes themselves (fuse3_ops.c, fast_map.c) and turn the rest into a
 *     small heap record queued to the JavaScript thread (a threadsafe
 *     function) without waiting; forget and interrupt get no answer.
 *   - JavaScript does the block-layer work and answers through reply_*
 *     (napi_requests.c), which write fuse_out_header + payload with writev and
 *     free the record. A read's buffer is allocated here and lent to
 *     JavaScript as an external Buffer until the reply; a write's data is
 *     copied out of the worker's buffer, which the worker reuses at once.
 *   - connection() gives a new dup of the descriptor and the INIT that was
 *     negotiated; a successor's adopt() takes both, writes FUSE_NOTIFY_RESEND
 *     (the kernel requeues every request the dead server had read but not
 *     answered, marked FUSE_UNIQUE_RESEND) and serves without INIT.
 *   - The loop ends when reading /dev/fuse says the connection is gone
 *     (ENODEV: unmounted, or aborted); the last worker out queues OP_ENDED.
 *
 * The parts:
 *   fuse_abi.h       the protocol: <linux/fuse.h>, constants it lacks, what INIT answers
 *   fuse_loop.c      the worker threads, sending replies, the resend notification
 *   fuse3_ops.c      one request: INIT, the ops, queueing to JavaScript
 *   fast_map.c       the fast path: reads served in the workers from an
 *                    extent map, without JavaScript (fast_map.h)
 *   passthrough.c    FUSE passthrough: the backing file registered after INIT,
 *                    so the kernel serves reads and writes without us
 *   fast_write.c     the write fast path: writes to granules installed
 *                    writable, pwritten in the workers
 *   fuse_mount.c     mounting through libfuse (its only use)
 *   napi_glue.c      JavaScript's side: mount, unref, the fast path, the module's exports
 *   napi_handover.c  connection() and adopt(): the descriptor and the INIT, out and back in
 *   napi_requests.c  JavaScript's side of a request: dispatch(op, req, ...) and the replies
 */
#ifndef BLKEXPORT_BLK_FS_H
#define BLKEXPORT_BLK_FS_H

#include "fast_map.h"
#include "fuse_abi.h"
#include "fuse_mount.h"

#include <node_api.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/*
 * The op codes: the first argument of JavaScript's dispatch(op, req, ...).
 * Defined only here: this list makes the C enum (OP_GETATTR, ...) and the
 * addon's frozen `ops` object ({ GETATTR: 1, ... }), which
 * src/export/fuse/fuse3.ts reads once when it loads the addon.
 */
#define BLK_OPS(X) \
  X(GETATTR, 1)    \
  X(SETATTR, 2)    \
  X(OPEN, 3)       \
  X(READ, 4)       \
  X(WRITE, 5)      \
  X(FLUSH, 6)      \
  X(FSYNC, 7)      \
  X(FALLOCATE, 8)  \
  X(LSEEK, 9)      \
  X(ENDED, 100) /* not a request: the loop has ended */

#define BLK_OP_ENUM(name, code) OP_##name = code,
enum { BLK_OPS(BLK_OP_ENUM) };
#undef BLK_OP_ENUM

typedef struct blk_fs blk_fs;

#define BLK_SPARE_BUFFERS 4 /* process-wide (fuse_loop.c) */

/* A request queued to JavaScript: answered exactly once by a reply_* function, then freed. */
typedef struct {
  blk_fs *fs;
  uint64_t unique; /* echoed in the reply (FUSE_UNIQUE_RESEND included) */
  int op;
  uint64_t off;
  size_t size;
  char *buf;
  int flags;                     /* open flags, fallocate mode, lseek whence, setattr valid */
  uint32_t mode, uid, gid;       /* setattr */
  uint64_t attr_size;            /* setattr */
  int answered;
} blk_req;

/* What INIT negotiated: enough for a successor to serve what the kernel agreed to. */
typedef struct {
  uint32_t major, minor;       /* the protocol the connection speaks (the minor we answered) */
  uint32_t kernel_minor;       /* what the kernel offered */
  uint64_t kernel_flags;       /* flags | flags2 << 32, offered */
  uint64_t flags;              /* flags | flags2 << 32, answered */
  uint32_t max_write, max_readahead, time_gran;
  uint16_t max_pages, max_background, congestion_threshold;
  int resend; /* the kernel offered FUSE_HAS_RESEND */
  /* Passthrough (passthrough.c): the connection's backing file, registered once, right after INIT. */
  int32_t backing_id; /* > 0: registered (a successor answers OPEN with it); 0: none */
} blk_init;

struct blk_fs {
  int fd; /* the /dev/fuse descriptor; closed when the loop has ended */
  size_t bufsize; /* each worker's read buffer */
  blk_init init;  /* under lock */
  atomic_int got_init;
  atomic_uint minor; /* init.minor, read by the workers without the lock */
  /*
   * Passthrough (passthrough.c). pt_fd: a descriptor of the image file to
   * register after INIT (-1: do not ask for passthrough), closed once tried.
   * pt_errno: why there is no backing id (0 while there is one or it is not
   * tried yet). pt_done: INIT is answered and the registration was tried
   * (or not wanted); init.backing_id is final from then on.
   */
  int pt_fd;
  int pt_errno;
  atomic_int pt_done;
  fast_map fast;
  napi_threadsafe_function tsfn;
  /* Under lock: the references that keep fs's loop going (its epoll token, the requests workers are
   * handling; see fuse_loop.c), and how the loop ended. */
  pthread_mutex_t lock;
  int refs;
  int stopping, loop_errno;
  /* The JavaScript thread's own. */
  int ended; /* the loop finished and fd is closed (fs itself stays allocated: JS may hold it) */
  int unrefd;
};

/* fuse_loop.c */
blk_fs *blk_fs_new(void); /* defaults from the environment; NULL when out of memory */
int blk_start(blk_fs *fs); /* joins the process's worker pool (fuse_loop.c); 0 or an errno */
void blk_fs_ended(blk_fs *fs); /* on the JS thread, after OP_ENDED: closes fd, frees the fast map */
int blk_send(blk_fs *fs, uint64_t unique, int error, struct iovec *iov, int n); /* iov[0] is ours */
int blk_notify_resend(int fd); /* 0 or an errno (EINVAL: the kernel has no FUSE_NOTIFY_RESEND) */

/* fuse3_ops.c */
void blk_handle(blk_fs *fs, char *buf, size_t n); /* one request read into buf (the worker's) */
void blk_reply_err(blk_req *r, int err);
void blk_reply_attr(blk_req *r, uint32_t mode, uint32_t uid, uint32_t gid, uint64_t size, uint64_t blocks,
                    double timeout);
void blk_reply_open(blk_req *r, int direct_io, int keep_cache, int32_t backing_id); /* backing_id > 0: passthrough */

/* passthrough.c */
uint64_t blk_passthrough_want(blk_fs *fs, uint64_t offered, struct fuse_init_out *out); /* INIT flags to add */
void blk_passthrough_after_init(blk_fs *fs); /* in the worker, once INIT's answer is written */
int blk_backing_close(blk_fs *fs); /* 0 or an errno */
void blk_reply_data(blk_req *r, size_t n);
void blk_reply_write(blk_req *r, size_t n);
void blk_reply_lseek(blk_req *r, uint64_t off);

#endif
