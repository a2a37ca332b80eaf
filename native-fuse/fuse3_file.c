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
#include <fuse_lowlevel.h>
#include <node_api.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

typedef struct {
  struct fuse_session *se;
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
    .release = ll_release,
    .statfs = ll_statfs,
    .unlink = ll_unlink,
};

static void *loop_thread(void *arg) {
  blk_fs *fs = arg;
  struct fuse_loop_config *cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  fuse_loop_cfg_set_idle_threads(cfg, 16);
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

/* reply_err(req, errno) */
static napi_value js_reply_err(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_req *r = req_arg(env, argv[0]);
  if (!r) return NULL;
  int32_t err = EIO;
  napi_get_value_int32(env, argv[1], &err);
  fuse_reply_err(r->req, err < 0 ? -err : err);
  free_req(r);
  return NULL;
}

/* reply_attr(req, mode, uid, gid, size, blocks, timeoutSec) */
static napi_value js_reply_attr(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_req *r = req_arg(env, argv[0]);
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
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_req *r = req_arg(env, argv[0]);
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

/* reply_data(req, n): sends the first n bytes of the read buffer. */
static napi_value js_reply_data(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_req *r = req_arg(env, argv[0]);
  if (!r) return NULL;
  double n = 0;
  napi_get_value_double(env, argv[1], &n);
  if (n < 0 || n > (double)r->size) n = (double)r->size;
  fuse_reply_buf(r->req, r->buf, (size_t)n);
  free_req(r);
  return NULL;
}

/* reply_write(req, n) */
static napi_value js_reply_write(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_req *r = req_arg(env, argv[0]);
  if (!r) return NULL;
  double n = 0;
  napi_get_value_double(env, argv[1], &n);
  if (n < 0 || n > (double)r->size) n = (double)r->size;
  fuse_reply_write(r->req, (size_t)n);
  free_req(r);
  return NULL;
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
      {"unref", NULL, js_unref, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
