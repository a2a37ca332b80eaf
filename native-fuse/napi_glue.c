/*
 * JavaScript's side of the binding: the addon's exports. mount() creates the
 * session and starts its loop thread; call_js() runs on the JavaScript thread
 * for every request fuse3_ops.c queued and calls dispatch(op, req, ...); the
 * reply functions answer a request exactly once and free it; the fast*
 * functions unpack their arguments for the fast map (fast_map.c). The op
 * codes are exported as `ops`, generated from BLK_OPS in blk_fs.h.
 */
#include "blk_fs.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NAPI_CALL(env, call)                                    \
  do {                                                          \
    if ((call) != napi_ok) {                                    \
      napi_throw_error((env), NULL, "N-API call failed: " #call); \
      return NULL;                                              \
    }                                                           \
  } while (0)

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
  /* One way out for every failure below: undo what was done, in reverse. */
  const char *code = NULL, *msg = NULL;
  int mounted = 0;
  char *fuse_argv[] = {"blkexport", "-o", opts, NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
  fs->se = fuse_session_new(&args, &blk_ll_ops, sizeof(blk_ll_ops), fs);
  if (!fs->se) {
    code = "EINVAL";
    msg = "fuse_session_new failed (bad options?)";
    goto fail;
  }
  if (fuse_session_mount(fs->se, mnt) != 0) {
    code = "EMOUNT";
    msg = "fuse_session_mount failed";
    goto fail;
  }
  mounted = 1;
  fs->mountpoint = strdup(mnt);
  napi_value name;
  napi_create_string_utf8(env, "blkexport-fuse3", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, NULL, NULL, fs, call_js, &fs->tsfn) != napi_ok) {
    msg = "napi_create_threadsafe_function failed";
    goto fail;
  }
  /*
   * The loop thread and the worker threads libfuse starts from it take no
   * signals: Node's handlers (libuv's, SIGCHLD among them) take a process-wide
   * lock, and libfuse cancels its workers (pthread_cancel) when a session ends.
   * A worker cancelled inside a handler would keep that lock forever, and the
   * next child process or signal watcher of the agent would wait for it.
   */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  int started = pthread_create(&fs->thread, NULL, blk_loop_thread, fs);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (started != 0) {
    napi_release_threadsafe_function(fs->tsfn, napi_tsfn_abort);
    msg = "pthread_create failed";
    goto fail;
  }
  napi_value handle;
  NAPI_CALL(env, napi_create_external(env, fs, NULL, NULL, &handle));
  return handle;

fail:
  if (mounted) fuse_session_unmount(fs->se);
  if (fs->se) fuse_session_destroy(fs->se);
  free(fs->mountpoint);
  fast_destroy(&fs->fast);
  free(fs);
  napi_throw_error(env, code, msg);
  return NULL;
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
  if (fs) g = (double)fast_gen(&fs->fast);
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
  fast_invalidate(&fs->fast, off, len, size);
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
  fast_enable(&fs->fast, on);
  return NULL;
}

/*
 * fastInstall(handle, gen, offset, extents): extents is a Float64Array of
 * triples [length, fd, host] (fd -1: zeroes) describing guest bytes from
 * `offset`. Whole granules covered by one contiguous piece are remembered,
 * except those invalidated since `gen` was read (fast_install in fast_map.c).
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
  fast_install(&fs->fast, gen, off, data, count);
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

/* The op codes as a frozen object, { GETATTR: 1, ... }: one property per BLK_OPS entry. */
static napi_value op_codes(napi_env env) {
  napi_value codes, v;
  NAPI_CALL(env, napi_create_object(env, &codes));
#define BLK_OP_PROP(name, code)                          \
  NAPI_CALL(env, napi_create_int32(env, OP_##name, &v)); \
  NAPI_CALL(env, napi_set_named_property(env, codes, #name, v));
  BLK_OPS(BLK_OP_PROP)
#undef BLK_OP_PROP
  NAPI_CALL(env, napi_object_freeze(env, codes));
  return codes;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value codes = op_codes(env);
  if (!codes) return NULL;
  napi_property_descriptor props[] = {
      {"ops", NULL, NULL, NULL, NULL, codes, napi_enumerable, NULL},
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
