/*
 * One request, in the worker thread that read it: INIT, the ops by opcode, and
 * the replies (fuse_out_header + payload, sent with writev by blk_send).
 *
 * Passthrough (passthrough.c) touches INIT (the flag, and registering the
 * backing file after the answer), OPEN (waits for that registration) and the
 * OPEN reply (FOPEN_PASSTHROUGH and the id).
 *
 * Each op either answers at once (INIT, lookup, release, statfs, unlink,
 * destroy; a read the fast map can serve, a write it can do in place) or turns the request into a blk_req
 * and queues it to the JavaScript thread without waiting; napi_requests.c
 * takes it from there and answers with blk_reply_*. Forget, batch forget and
 * interrupt get no answer; any other opcode gets ENOSYS. Nothing here touches
 * JavaScript values: the workers may only queue to the threadsafe function.
 *
 * The answers are the ones libfuse 3.14 gave our old low-level ops, byte for
 * byte (same attribute timeouts, same statfs, same INIT but FUSE_HAS_RESEND).
 */
#include "blk_fs.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void answer(blk_fs *fs, uint64_t unique, int err) {
  struct iovec iov[1];
  blk_send(fs, unique, -err, iov, 1);
}

static void answer_with(blk_fs *fs, uint64_t unique, const void *data, size_t len) {
  struct iovec iov[2] = {{0}, {(void *)data, len}};
  blk_send(fs, unique, 0, iov, len ? 2 : 1);
}

/* ---- INIT -------------------------------------------------------------------- */

static void do_init(blk_fs *fs, uint64_t unique, const char *arg, size_t alen) {
  struct fuse_init_in in;
  memset(&in, 0, sizeof(in));
  memcpy(&in, arg, alen < sizeof(in) ? alen : sizeof(in));
  struct fuse_init_out out;
  memset(&out, 0, sizeof(out));
  out.major = FUSE_KERNEL_VERSION;
  out.minor = BLK_PROTO_MINOR;
  if (alen < 8 || in.major < 7) {
    answer(fs, unique, EPROTO);
    return;
  }
  if (in.major > 7) { /* the kernel sends a second INIT with our major */
    answer_with(fs, unique, &out, sizeof(out));
    return;
  }
  uint64_t offered = 0;
  if (in.minor >= 6) {
    offered = in.flags;
    if ((offered & FUSE_INIT_EXT) && alen >= offsetof(struct fuse_init_in, flags2) + 4)
      offered |= (uint64_t)in.flags2 << 32;
  }
  long page = sysconf(_SC_PAGESIZE);
  uint32_t max_write = BLK_MAX_WRITE;
  if (!(offered & FUSE_MAX_PAGES) && max_write > BLK_DEFAULT_MAX_PAGES * page)
    max_write = (uint32_t)(BLK_DEFAULT_MAX_PAGES * page);
  if (max_write > fs->bufsize - BLK_HEADER_ROOM) max_write = (uint32_t)(fs->bufsize - BLK_HEADER_ROOM);

  uint64_t want = FUSE_BIG_WRITES | (offered & BLK_WANT_IF_OFFERED);
  if (offered & FUSE_MAX_PAGES) {
    want |= FUSE_MAX_PAGES;
    out.max_pages = (uint16_t)((max_write - 1) / page + 1);
  }
  if (offered & FUSE_INIT_EXT) {
    want |= FUSE_INIT_EXT;
    if (offered & FUSE_HAS_RESEND) want |= FUSE_HAS_RESEND;
  }
  want |= blk_passthrough_want(fs, offered, &out); /* passthrough.c: when asked for and offered */
  out.minor = in.minor < BLK_PROTO_MINOR ? in.minor : BLK_PROTO_MINOR;
  out.flags = (uint32_t)want;
  out.flags2 = (uint32_t)(want >> 32);
  out.max_readahead = BLK_MAX_READAHEAD;
  out.max_write = max_write;
  if (in.minor >= 13) {
    out.max_background = BLK_MAX_BACKGROUND;
    out.congestion_threshold = BLK_CONGESTION_THRESHOLD;
  }
  if (in.minor >= 23) out.time_gran = 1;

  pthread_mutex_lock(&fs->lock);
  fs->init = (blk_init){
      .major = out.major,
      .minor = out.minor,
      .kernel_minor = in.minor,
      .kernel_flags = offered,
      .flags = want,
      .max_write = out.max_write,
      .max_readahead = out.max_readahead,
      .time_gran = out.time_gran,
      .max_pages = out.max_pages,
      .max_background = out.max_background,
      .congestion_threshold = out.congestion_threshold,
      .resend = (offered & FUSE_HAS_RESEND) != 0,
  };
  atomic_store(&fs->minor, out.minor);
  atomic_store(&fs->got_init, 1);
  pthread_mutex_unlock(&fs->lock);
  size_t size = in.minor < 5 ? FUSE_COMPAT_INIT_OUT_SIZE : in.minor < 23 ? FUSE_COMPAT_22_INIT_OUT_SIZE : sizeof(out);
  answer_with(fs, unique, &out, size);
  blk_passthrough_after_init(fs); /* the kernel has taken our answer: the backing file can be registered */
}

/* ---- queueing to JavaScript ---------------------------------------------------- */

static blk_req *new_req(blk_fs *fs, uint64_t unique, int op) {
  blk_req *r = calloc(1, sizeof(*r));
  if (!r) {
    answer(fs, unique, ENOMEM);
    return NULL;
  }
  r->fs = fs;
  r->unique = unique;
  r->op = op;
  return r;
}

static void queue(blk_req *r) {
  if (napi_call_threadsafe_function(r->fs->tsfn, r, napi_tsfn_nonblocking) != napi_ok) {
    answer(r->fs, r->unique, EIO);
    free(r->buf);
    free(r);
  }
}

/* A request whose data JavaScript fills (read) or takes (write): r->buf holds size bytes. */
static blk_req *new_req_buf(blk_fs *fs, uint64_t unique, int op, size_t size) {
  blk_req *r = new_req(fs, unique, op);
  if (!r) return NULL;
  r->buf = malloc(size ? size : 1);
  if (!r->buf) {
    free(r);
    answer(fs, unique, ENOMEM);
    return NULL;
  }
  r->size = size;
  return r;
}

/* ---- the ops ------------------------------------------------------------------- */

static void do_read(blk_fs *fs, uint64_t unique, char *buf, const struct fuse_read_in *in) {
  uint64_t off = in->offset;
  size_t size = in->size;
  if (size <= fs->bufsize) { /* the request is no longer needed: its buffer takes the data */
    ssize_t n = fast_read(&fs->fast, buf, size, off);
    if (n >= 0) {
      answer_with(fs, unique, buf, (size_t)n);
      return;
    }
  }
  blk_req *r = new_req_buf(fs, unique, OP_READ, size);
  if (!r) return;
  r->off = off;
  queue(r);
}

static void do_write(blk_fs *fs, uint64_t unique, const char *arg, size_t alen) {
  size_t inlen = atomic_load(&fs->minor) < 9 ? FUSE_COMPAT_WRITE_IN_SIZE : sizeof(struct fuse_write_in);
  const struct fuse_write_in *in = (const void *)arg;
  if (alen < inlen || alen - inlen < in->size) {
    answer(fs, unique, EIO);
    return;
  }
  if (fast_write(&fs->fast, arg + inlen, in->size, in->offset) >= 0) { /* written in place, in this thread */
    struct fuse_write_out out = {.size = in->size, .padding = 0};
    answer_with(fs, unique, &out, sizeof(out));
    return;
  }
  blk_req *r = new_req_buf(fs, unique, OP_WRITE, in->size);
  if (!r) return;
  memcpy(r->buf, arg + inlen, in->size); /* the worker's buffer is reused for its next request */
  r->off = in->offset;
  queue(r);
}

static void do_setattr(blk_fs *fs, uint64_t unique, const struct fuse_setattr_in *in) {
  blk_req *r = new_req(fs, unique, OP_SETATTR);
  if (!r) return;
  /* What libfuse passed its setattr op: the valid bits it knows (the same values as FATTR_*). */
  r->flags = (int)(in->valid & (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME |
                                FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME | FATTR_KILL_SUIDGID));
  r->mode = in->mode;
  r->uid = in->uid;
  r->gid = in->gid;
  r->attr_size = in->size;
  queue(r);
}

static void do_statfs(blk_fs *fs, uint64_t unique) {
  struct fuse_statfs_out out;
  memset(&out, 0, sizeof(out));
  out.st.bsize = 512;
  out.st.frsize = 512;
  out.st.files = 1;
  out.st.namelen = 255;
  answer_with(fs, unique, &out, atomic_load(&fs->minor) < 4 ? FUSE_COMPAT_STATFS_SIZE : sizeof(out));
}

/* The argument each queued op needs, and whether it has it. */
#define NEED(type)             \
  if (alen < sizeof(type)) {   \
    answer(fs, unique, EIO);   \
    return;                    \
  }

void blk_handle(blk_fs *fs, char *buf, size_t n) {
  const struct fuse_in_header *ih = (const void *)buf;
  if (n < sizeof(*ih) || ih->len != n) return; /* the kernel never sends that */
  uint64_t unique = ih->unique;
  const char *arg = buf + sizeof(*ih);
  size_t alen = n - sizeof(*ih);
  if (ih->opcode == FUSE_INIT) {
    do_init(fs, unique, arg, alen);
    return;
  }
  if (!atomic_load(&fs->got_init)) { /* what libfuse answered before INIT */
    if (ih->opcode != FUSE_FORGET && ih->opcode != FUSE_BATCH_FORGET && ih->opcode != FUSE_INTERRUPT)
      answer(fs, unique, EIO);
    return;
  }
  blk_req *r;
  switch (ih->opcode) {
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT: /* the request goes on and is answered; nothing to cancel */
    case FUSE_NOTIFY_REPLY:
      return;
    case FUSE_LOOKUP:
      answer(fs, unique, ENOENT);
      return;
    case FUSE_UNLINK:
      answer(fs, unique, EBUSY);
      return;
    case FUSE_RELEASE:
    case FUSE_DESTROY:
      answer(fs, unique, 0);
      return;
    case FUSE_STATFS:
      do_statfs(fs, unique);
      return;
    case FUSE_GETATTR:
      if (ih->nodeid != FUSE_ROOT_ID) {
        answer(fs, unique, ENOENT);
        return;
      }
      if ((r = new_req(fs, unique, OP_GETATTR))) queue(r);
      return;
    case FUSE_SETATTR:
      NEED(struct fuse_setattr_in);
      do_setattr(fs, unique, (const void *)arg);
      return;
    case FUSE_OPEN:
      NEED(struct fuse_open_in);
      /* The INIT worker registers the backing file just after its answer: OPEN needs to know the outcome. */
      for (int i = 0; i < 20000 && !atomic_load(&fs->pt_done); i++) usleep(50);
      if ((r = new_req(fs, unique, OP_OPEN))) {
        r->flags = (int)((const struct fuse_open_in *)arg)->flags;
        queue(r);
      }
      return;
    case FUSE_READ:
      /* fh, offset, size: before 7.9 fuse_read_in ended soon after them */
      if (alen < offsetof(struct fuse_read_in, read_flags)) {
        answer(fs, unique, EIO);
        return;
      }
      do_read(fs, unique, buf, (const void *)arg);
      return;
    case FUSE_WRITE:
      do_write(fs, unique, arg, alen);
      return;
    case FUSE_FLUSH:
      if ((r = new_req(fs, unique, OP_FLUSH))) queue(r);
      return;
    case FUSE_FSYNC:
      if ((r = new_req(fs, unique, OP_FSYNC))) queue(r);
      return;
    case FUSE_FALLOCATE: {
      NEED(struct fuse_fallocate_in);
      const struct fuse_fallocate_in *in = (const void *)arg;
      if ((r = new_req(fs, unique, OP_FALLOCATE))) {
        r->flags = (int)in->mode;
        r->off = in->offset;
        r->size = (size_t)in->length;
        queue(r);
      }
      return;
    }
    case FUSE_LSEEK: {
      NEED(struct fuse_lseek_in);
      const struct fuse_lseek_in *in = (const void *)arg;
      if ((r = new_req(fs, unique, OP_LSEEK))) {
        r->off = in->offset;
        r->flags = (int)in->whence;
        queue(r);
      }
      return;
    }
    default:
      answer(fs, unique, ENOSYS);
  }
}

/* ---- replies from JavaScript (napi_requests.c), on the JavaScript thread ------- */

void blk_reply_err(blk_req *r, int err) { answer(r->fs, r->unique, err < 0 ? -err : err); }

/* libfuse's calc_timeout_sec / calc_timeout_nsec */
static uint64_t timeout_sec(double t) { return t < 0 ? 0 : t > (double)UINT64_MAX ? UINT64_MAX : (uint64_t)t; }
static uint32_t timeout_nsec(double t) {
  double f = t - (double)timeout_sec(t);
  return f < 0 ? 0 : f >= 0.999999999 ? 999999999 : (uint32_t)(f * 1.0e9);
}

void blk_reply_attr(blk_req *r, uint32_t mode, uint32_t uid, uint32_t gid, uint64_t size, uint64_t blocks,
                    double timeout) {
  struct fuse_attr_out out;
  memset(&out, 0, sizeof(out));
  out.attr_valid = timeout_sec(timeout);
  out.attr_valid_nsec = timeout_nsec(timeout);
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  out.attr.ino = FUSE_ROOT_ID;
  out.attr.mode = mode;
  out.attr.nlink = 1;
  out.attr.uid = uid;
  out.attr.gid = gid;
  out.attr.size = size;
  out.attr.blocks = blocks;
  out.attr.blksize = 512;
  out.attr.atime = out.attr.mtime = out.attr.ctime = (uint64_t)now.tv_sec;
  out.attr.atimensec = out.attr.mtimensec = out.attr.ctimensec = (uint32_t)now.tv_nsec;
  answer_with(r->fs, r->unique, &out, atomic_load(&r->fs->minor) < 9 ? FUSE_COMPAT_ATTR_OUT_SIZE : sizeof(out));
}

void blk_reply_open(blk_req *r, int direct_io, int keep_cache, int32_t backing_id) {
  struct fuse_open_out out;
  memset(&out, 0, sizeof(out));
  if (direct_io) out.open_flags |= FOPEN_DIRECT_IO;
  if (keep_cache) out.open_flags |= FOPEN_KEEP_CACHE;
  if (backing_id > 0) { /* passthrough.c; the kernel refuses it with FOPEN_KEEP_CACHE */
    out.open_flags = (out.open_flags & ~FOPEN_KEEP_CACHE) | FOPEN_PASSTHROUGH;
    memcpy((char *)&out + BLK_OPEN_OUT_BACKING_ID, &backing_id, sizeof(backing_id));
  }
  answer_with(r->fs, r->unique, &out, sizeof(out));
}

void blk_reply_data(blk_req *r, size_t n) { answer_with(r->fs, r->unique, r->buf, n); }

void blk_reply_write(blk_req *r, size_t n) {
  struct fuse_write_out out = {.size = (uint32_t)n, .padding = 0};
  answer_with(r->fs, r->unique, &out, sizeof(out));
}

void blk_reply_lseek(blk_req *r, uint64_t off) {
  struct fuse_lseek_out out = {.offset = off};
  answer_with(r->fs, r->unique, &out, sizeof(out));
}
