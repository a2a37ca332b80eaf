/*
 * libfuse's side of the binding: the low-level ops, run in libfuse's worker
 * threads, and the thread that runs the session loop. Each op either answers
 * at once (lookup, release, statfs, unlink; a read the fast map can serve) or
 * turns the request into a blk_req and queues it to the JavaScript thread
 * without waiting; napi_glue.c takes it from there. Nothing here touches
 * JavaScript values: these threads may only queue to the threadsafe function.
 */
#include "blk_fs.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

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

/* ---- the ops, in libfuse's worker threads -------------------------------------- */

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
  if (fast_read(&fs_of(req)->fast, req, size, (uint64_t)off) == 0) return;
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

const struct fuse_lowlevel_ops blk_ll_ops = {
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

/* ---- the session loop --------------------------------------------------------- */

void *blk_loop_thread(void *arg) {
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
