/*
 * JavaScript's side of the binding: the addon's exports. mount() mounts
 * through libfuse and starts our workers on the session's descriptor; unref()
 * lets the process exit while descriptors keep an unmounted connection; the
 * fast* functions unpack their arguments for the fast map (fast_map.c). The
 * op codes are exported as `ops`, generated from BLK_OPS in blk_fs.h.
 * connection() and adopt() are in napi_handover.c, the request dispatch and
 * the replies in napi_requests.c.
 */
#include "napi_glue.h"

#include "inflate.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void blk_free_fs(blk_fs *fs) {
  if (fs->pt_fd >= 0) close(fs->pt_fd);
  fast_destroy(&fs->fast);
  pthread_mutex_destroy(&fs->lock);
  free(fs);
}

const char *blk_serve(napi_env env, blk_fs *fs, napi_value dispatch) {
  napi_value name;
  napi_create_string_utf8(env, "blkexport-fuse3", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, dispatch, NULL, name, 0, 1, NULL, NULL, fs, blk_call_js, &fs->tsfn) !=
      napi_ok)
    return "napi_create_threadsafe_function failed";
  if (blk_start(fs) != 0) {
    napi_release_threadsafe_function(fs->tsfn, napi_tsfn_abort);
    return "pthread_create failed";
  }
  return NULL;
}

/*
 * mount(mountpoint, options, dispatch, { passthroughFd }) -> handle.
 * passthroughFd (optional): a descriptor of the image file, to ask for FUSE
 * passthrough at INIT and register it right after (passthrough.c); it is
 * duplicated here, the caller keeps its own.
 */
static napi_value js_mount(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  char mnt[4096], opts[4096];
  size_t len;
  NAPI_CALL(env, napi_get_value_string_utf8(env, argv[0], mnt, sizeof(mnt), &len));
  NAPI_CALL(env, napi_get_value_string_utf8(env, argv[1], opts, sizeof(opts), &len));
  blk_fs *fs = blk_fs_new();
  if (!fs) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  fs->bufsize = BLK_MAX_WRITE + BLK_HEADER_ROOM; /* INIT is not negotiated yet: room for what we will answer */
  napi_valuetype t = napi_undefined;
  if (argc >= 4) napi_typeof(env, argv[3], &t);
  if (t == napi_object) {
    napi_value v;
    int32_t ptfd = -1;
    if (napi_get_named_property(env, argv[3], "passthroughFd", &v) == napi_ok &&
        napi_get_value_int32(env, v, &ptfd) == napi_ok && ptfd >= 0) {
      fs->pt_fd = fcntl(ptfd, F_DUPFD_CLOEXEC, 3);
      if (fs->pt_fd < 0) {
        int err = errno;
        blk_free_fs(fs);
        napi_throw_error(env, "EBADF", err == EBADF ? "mount: passthroughFd is not open" : strerror(err));
        return NULL;
      }
    }
  }
  const char *msg = NULL;
  void *se = blk_mount(mnt, opts, &fs->fd, &msg);
  if (!se) {
    blk_free_fs(fs);
    napi_throw_error(env, strstr(msg, "options") ? "EINVAL" : "EMOUNT", msg);
    return NULL;
  }
  if ((msg = blk_serve(env, fs, argv[2]))) {
    close(fs->fd);
    blk_mount_done(se, 1);
    blk_free_fs(fs);
    napi_throw_error(env, NULL, msg);
    return NULL;
  }
  blk_mount_done(se, 0); /* libfuse's part is over: our descriptor keeps the connection */
  napi_value handle;
  NAPI_CALL(env, napi_create_external(env, fs, NULL, NULL, &handle));
  return handle;
}

blk_fs *blk_fs_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "expected a mount handle");
    return NULL;
  }
  blk_fs *fs = p;
  return fs->ended ? NULL : fs;
}

blk_fs *blk_live_fs_arg(napi_env env, napi_value v) {
  blk_fs *fs = blk_fs_arg(env, v);
  if (!fs) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (!pending) napi_throw_error(env, "ENOTCONN", "the FUSE connection has ended");
  }
  return fs;
}

/* ---- the fast path ------------------------------------------------------------------- */

/* fastGen(handle) -> generation (a number) */
static napi_value js_fast_gen(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = blk_fs_arg(env, argv[0]);
  double g = -1;
  if (fs) g = (double)fast_gen(&fs->fast);
  napi_create_double(env, g, &out);
  return out;
}

/* fastInvalidate(handle, offset, length, size[, wait]): bumps the generation, forgets the range, sets the size
 * (-1: keep); unless wait is false, returns once no native write can still use what was forgotten. */
static napi_value js_fast_invalidate(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = blk_fs_arg(env, argv[0]);
  if (!fs) return NULL;
  double off = 0, len = 0, size = -1;
  napi_get_value_double(env, argv[1], &off);
  napi_get_value_double(env, argv[2], &len);
  napi_get_value_double(env, argv[3], &size);
  bool wait = true;
  if (argc >= 5) napi_get_value_bool(env, argv[4], &wait); /* undefined leaves it true */
  fast_invalidate(&fs->fast, off, len, size, wait);
  return NULL;
}

/* fastEnable(handle, on): off forgets everything and sends every read to JavaScript. */
/* The (handle, on) pair both switches take: the mount, or NULL (an exception is pending). */
static blk_fs *fs_and_flag(napi_env env, napi_callback_info info, bool *on) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = blk_fs_arg(env, argv[0]);
  *on = false;
  if (fs) napi_get_value_bool(env, argv[1], on);
  return fs;
}

static napi_value js_fast_enable(napi_env env, napi_callback_info info) {
  bool on;
  blk_fs *fs = fs_and_flag(env, info, &on);
  if (fs) fast_enable(&fs->fast, on);
  return NULL;
}

/*
 * fastInstall(handle, gen, offset, extents[, writable]): extents is a Float64Array of
 * triples [length, fd, host] (fd -1: zeroes) describing guest bytes from
 * `offset`; writable (a Uint8Array, one byte per triple) marks the pieces that
 * may be overwritten in place. Whole granules covered by one contiguous piece are remembered,
 * except those invalidated since `gen` was read (fast_install in fast_map.c).
 */
static napi_value js_fast_install(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = blk_fs_arg(env, argv[0]);
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
  const uint8_t *wr = NULL;
  if (argc >= 5) {
    napi_valuetype vt;
    napi_typeof(env, argv[4], &vt);
    if (vt != napi_undefined) {
      size_t wcount = 0;
      void *wdata = NULL;
      if (napi_get_typedarray_info(env, argv[4], &type, &wcount, &wdata, NULL, NULL) != napi_ok ||
          type != napi_uint8_array || wcount != count / 3)
        return NULL;
      wr = wdata;
    }
  }
  fast_install(&fs->fast, gen, off, data, count, wr);
  return NULL;
}

/*
 * fastInstallCompressed(handle, gen, records): records is a Float64Array of
 * [offset, length, fd, host, clen, clusterBits, skip, algorithm] (algorithm 0
 * zlib, 1 zstd, 2 zlib format, 3 vmdk marker + zlib format: inflate.h), each
 * a guest range inside one compressed cluster
 * (fast_install_compressed in fast_map.c).
 */
static napi_value js_fast_install_compressed(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) return NULL;
  blk_fs *fs = blk_fs_arg(env, argv[0]);
  if (!fs) return NULL;
  double gen = -1;
  napi_get_value_double(env, argv[1], &gen);
  napi_typedarray_type type;
  size_t count = 0;
  void *data = NULL;
  if (napi_get_typedarray_info(env, argv[2], &type, &count, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || count % 8 != 0)
    return NULL;
  fast_install_compressed(&fs->fast, gen, data, count);
  return NULL;
}

/* inflateStats() -> the process's native inflation counters and its decompressed-cluster cache (inflate.h) */
static napi_value js_inflate_stats(napi_env env, napi_callback_info info) {
  inflate_stats st = inflate_get_stats();
  napi_value out, v;
  NAPI_CALL(env, napi_create_object(env, &out));
#define STAT(name, field)                                 \
  NAPI_CALL(env, napi_create_double(env, st.field, &v)); \
  NAPI_CALL(env, napi_set_named_property(env, out, name, v));
  STAT("enabled", enabled)
  STAT("inflated", inflated)
  STAT("cacheHits", hits)
  STAT("failed", failed)
  STAT("cacheBytes", cache_bytes)
  STAT("cacheLimit", cache_limit)
  STAT("cacheEntries", entries)
#undef STAT
  return out;
}

/*
 * inflateCluster(fd, host, clen, clusterBits, algorithm) -> Buffer | null: the
 * workers' decoder, on this thread (tests compare it with JavaScript's).
 */
static napi_value js_inflate_cluster(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5], out;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  double v[5] = {0};
  for (size_t i = 0; i < 5 && i < argc; i++) napi_get_value_double(env, argv[i], &v[i]);
  napi_get_null(env, &out);
  if (argc < 5 || v[0] < 0 || v[1] < 0 || v[2] <= 0 || v[2] > UINT32_MAX || v[3] < INFLATE_MIN_CLUSTER_BITS ||
      v[3] > INFLATE_MAX_CLUSTER_BITS)
    return out;
  inflate_desc d = {(uint64_t)v[1], (uint32_t)v[2], (uint8_t)v[3], (uint8_t)v[4]};
  void *data = NULL;
  napi_value buf;
  NAPI_CALL(env, napi_create_buffer(env, (size_t)1 << d.cbits, &data, &buf));
  return inflate_cluster_once((int)v[0], &d, data) == 0 ? buf : out;
}

/* fastAllowWrites(handle, on): whether workers write writable granules themselves; off waits for those in flight. */
static napi_value js_fast_allow_writes(napi_env env, napi_callback_info info) {
  bool on;
  blk_fs *fs = fs_and_flag(env, info, &on);
  if (fs) fast_allow_writes(&fs->fast, on);
  return NULL;
}

/* fastStats(handle) -> [reads, bytes, writes, written bytes] served without JavaScript */
static napi_value js_fast_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out, v;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *p = NULL;
  NAPI_CALL(env, napi_get_value_external(env, argv[0], &p));
  blk_fs *fs = p;
  napi_create_array_with_length(env, 4, &out);
  napi_create_double(env, fs->ended ? 0 : (double)atomic_load(&fs->fast.reads), &v);
  napi_set_element(env, out, 0, v);
  napi_create_double(env, fs->ended ? 0 : (double)atomic_load(&fs->fast.bytes), &v);
  napi_set_element(env, out, 1, v);
  napi_create_double(env, fs->ended ? 0 : (double)atomic_load(&fs->fast.writes), &v);
  napi_set_element(env, out, 2, v);
  napi_create_double(env, fs->ended ? 0 : (double)atomic_load(&fs->fast.wbytes), &v);
  napi_set_element(env, out, 3, v);
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
      {"adopt", NULL, blk_js_adopt, NULL, NULL, NULL, napi_default, NULL},
      {"connection", NULL, blk_js_connection, NULL, NULL, NULL, napi_default, NULL},
      {"replyErr", NULL, blk_js_reply_err, NULL, NULL, NULL, napi_default, NULL},
      {"replyAttr", NULL, blk_js_reply_attr, NULL, NULL, NULL, napi_default, NULL},
      {"replyOpen", NULL, blk_js_reply_open, NULL, NULL, NULL, napi_default, NULL},
      {"replyData", NULL, blk_js_reply_data, NULL, NULL, NULL, napi_default, NULL},
      {"replyWrite", NULL, blk_js_reply_write, NULL, NULL, NULL, napi_default, NULL},
      {"replyLseek", NULL, blk_js_reply_lseek, NULL, NULL, NULL, napi_default, NULL},
      {"unref", NULL, js_unref, NULL, NULL, NULL, napi_default, NULL},
      {"fastGen", NULL, js_fast_gen, NULL, NULL, NULL, napi_default, NULL},
      {"fastInvalidate", NULL, js_fast_invalidate, NULL, NULL, NULL, napi_default, NULL},
      {"fastEnable", NULL, js_fast_enable, NULL, NULL, NULL, napi_default, NULL},
      {"fastInstall", NULL, js_fast_install, NULL, NULL, NULL, napi_default, NULL},
      {"fastStats", NULL, js_fast_stats, NULL, NULL, NULL, napi_default, NULL},
      {"fastInstallCompressed", NULL, js_fast_install_compressed, NULL, NULL, NULL, napi_default, NULL},
      {"inflateStats", NULL, js_inflate_stats, NULL, NULL, NULL, napi_default, NULL},
      {"inflateCluster", NULL, js_inflate_cluster, NULL, NULL, NULL, napi_default, NULL},
      {"passthrough", NULL, blk_js_passthrough, NULL, NULL, NULL, napi_default, NULL},
      {"backingClose", NULL, blk_js_backing_close, NULL, NULL, NULL, napi_default, NULL},
      {"fastAllowWrites", NULL, js_fast_allow_writes, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
