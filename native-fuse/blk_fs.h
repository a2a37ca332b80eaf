/*
 * blkexport's own FUSE binding on libfuse 3 (low-level API): a filesystem
 * whose root node is one regular file, mounted on a regular file. This header
 * holds what its parts share: the op codes, the request record and the
 * per-mount state.
 *
 * Why: fuse-native links libfuse 2.9, which speaks FUSE protocol 7.19 — every
 * request is at most 128 KiB and there is no asynchronous direct I/O, so
 * queued reads arrive one at a time. libfuse 3 negotiates 1 MiB requests and
 * async DIO, and its low-level API lets a request be answered later, from
 * any thread.
 *
 * How: libfuse worker threads turn each request into a small heap record and
 * queue it to the JavaScript thread (a threadsafe function) without waiting;
 * JavaScript does the block-layer work and answers through reply_*, which
 * send the reply and free the record. A read's buffer is allocated on the
 * libfuse side and lent to JavaScript as an external Buffer until the reply;
 * a write's data is copied out of libfuse's per-thread receive buffer (which
 * the thread reuses as soon as the handler returns).
 *
 * The parts:
 *   fuse3_ops.c   libfuse's side: the low-level ops, the session loop thread,
 *                 queueing requests to JavaScript
 *   fast_map.c    the read fast path: reads served in libfuse's threads from
 *                 an extent map, without JavaScript (fast_map.h)
 *   napi_glue.c   JavaScript's side: mount, dispatching queued requests, the
 *                 reply and fast-path functions, the module's exports
 */
#ifndef BLKEXPORT_BLK_FS_H
#define BLKEXPORT_BLK_FS_H

#include "fast_map.h"

#include <fuse_lowlevel.h>
#include <node_api.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>

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
  X(ENDED, 100) /* not a request: the session loop has ended */

#define BLK_OP_ENUM(name, code) OP_##name = code,
enum { BLK_OPS(BLK_OP_ENUM) };
#undef BLK_OP_ENUM

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

/* fuse3_ops.c: the session's ops (userdata: the blk_fs), and the thread that runs
 * its loop, queues OP_ENDED when it ends and releases the threadsafe function. */
extern const struct fuse_lowlevel_ops blk_ll_ops;
void *blk_loop_thread(void *fs);

#endif
