/*
 * Handing a connection over, JavaScript's side: connection() gives a new dup
 * of the /dev/fuse descriptor and the INIT that was negotiated, as a plain
 * object (JSON-able); adopt() takes both in a successor, asks the kernel to
 * resend what the dead server had read but not answered (FUSE_NOTIFY_RESEND),
 * and starts the workers on the descriptor. No INIT comes to an adopted
 * descriptor: the kernel sent it once, to the first server.
 */
#include "napi_glue.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* ---- the negotiated INIT as a plain object ----------------------------------------- */

static void set_num(napi_env env, napi_value obj, const char *key, double v) {
  napi_value x;
  napi_create_double(env, v, &x);
  napi_set_named_property(env, obj, key, x);
}

static napi_value init_to_js(napi_env env, const blk_init *in) {
  napi_value o, b;
  napi_create_object(env, &o);
  set_num(env, o, "major", in->major);
  set_num(env, o, "minor", in->minor);
  set_num(env, o, "kernelMinor", in->kernel_minor);
  set_num(env, o, "kernelFlags", (uint32_t)in->kernel_flags);
  set_num(env, o, "kernelFlags2", (uint32_t)(in->kernel_flags >> 32));
  set_num(env, o, "flags", (uint32_t)in->flags);
  set_num(env, o, "flags2", (uint32_t)(in->flags >> 32));
  set_num(env, o, "maxWrite", in->max_write);
  set_num(env, o, "maxReadahead", in->max_readahead);
  set_num(env, o, "maxPages", in->max_pages);
  set_num(env, o, "maxBackground", in->max_background);
  set_num(env, o, "congestionThreshold", in->congestion_threshold);
  set_num(env, o, "timeGran", in->time_gran);
  napi_get_boolean(env, in->resend, &b);
  napi_set_named_property(env, o, "resend", b);
  set_num(env, o, "backingId", in->backing_id); /* passthrough.c: a successor answers OPEN with it */
  return o;
}

/* obj[key] as a uint32 no larger than max; a missing optional key is 0. False when invalid. */
static bool get_u32(napi_env env, napi_value obj, const char *key, uint32_t max, bool required, uint32_t *out) {
  napi_value v;
  napi_valuetype t;
  double d;
  *out = 0;
  if (napi_get_named_property(env, obj, key, &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return false;
  if (t == napi_undefined) return !required;
  if (t != napi_number || napi_get_value_double(env, v, &d) != napi_ok) return false;
  if (!(d >= 0 && d <= max && d == (double)(uint32_t)d)) return false;
  *out = (uint32_t)d;
  return true;
}

/* The INIT a connection() gave, back from JavaScript; NULL, or the name of the field that is wrong. */
static const char *init_from_js(napi_env env, napi_value o, blk_init *in) {
  uint32_t v[13];
  static const char *keys[] = {"major",        "minor",         "kernelMinor",   "kernelFlags",
                               "kernelFlags2", "flags",         "flags2",        "maxWrite",
                               "maxReadahead", "maxPages",      "maxBackground", "congestionThreshold",
                               "timeGran"};
  static const uint32_t max[] = {UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT32_MAX,
                                 UINT32_MAX, UINT32_MAX, UINT16_MAX, UINT16_MAX, UINT16_MAX, UINT32_MAX};
  for (int i = 0; i < 13; i++)
    if (!get_u32(env, o, keys[i], max[i], i < 2 || i == 5 || i == 7, &v[i])) return keys[i];
  if (v[0] != FUSE_KERNEL_VERSION) return "major";
  if (v[7] < 4096 || v[7] > (64u << 20)) return "maxWrite";
  napi_value r;
  bool resend = false;
  if (napi_get_named_property(env, o, "resend", &r) != napi_ok || napi_get_value_bool(env, r, &resend) != napi_ok)
    return "resend";
  uint32_t backing = 0; /* absent in records from before passthrough: none */
  if (!get_u32(env, o, "backingId", INT32_MAX, false, &backing)) return "backingId";
  if (backing && !((v[5] | (uint64_t)v[6] << 32) & FUSE_PASSTHROUGH)) return "backingId";
  *in = (blk_init){
      .major = v[0],
      .minor = v[1],
      .kernel_minor = v[2],
      .kernel_flags = v[3] | (uint64_t)v[4] << 32,
      .flags = v[5] | (uint64_t)v[6] << 32,
      .max_write = v[7],
      .max_readahead = v[8],
      .max_pages = (uint16_t)v[9],
      .max_background = (uint16_t)v[10],
      .congestion_threshold = (uint16_t)v[11],
      .time_gran = v[12],
      .resend = resend,
      .backing_id = (int32_t)backing,
  };
  return NULL;
}

/* ---- handing a connection over ------------------------------------------------------ */

static void throw_errno(napi_env env, int err, const char *what) {
  char msg[256];
  snprintf(msg, sizeof(msg), "%s: %s", what, strerror(err));
  napi_throw_error(env, err == EINVAL ? "EINVAL" : err == ENODEV ? "ENODEV" : err == EBADF ? "EBADF" : NULL, msg);
}

/*
 * adopt(fd, init, dispatch, { resend }) -> handle: serves a connection whose
 * INIT another process answered. Takes fd over when it succeeds (close-on-exec
 * from then on); on a throw, fd stays the caller's.
 */
napi_value blk_js_adopt(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd = -1;
  blk_init init;
  bool resend = false;
  napi_value v;
  const char *bad;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, NULL, "adopt: fd must be a descriptor number");
    return NULL;
  }
  if ((bad = init_from_js(env, argv[1], &init))) {
    char msg[128];
    snprintf(msg, sizeof(msg), "adopt: init.%s is missing or invalid", bad);
    napi_throw_type_error(env, "EINVAL", msg);
    return NULL;
  }
  if (napi_get_named_property(env, argv[3], "resend", &v) == napi_ok) napi_get_value_bool(env, v, &resend);
  if (resend && !init.resend) {
    napi_throw_error(env, "EINVAL", "adopt: resend asked, but the kernel did not offer FUSE_HAS_RESEND at INIT");
    return NULL;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISCHR(st.st_mode) || major(st.st_rdev) != 10 || minor(st.st_rdev) != 229) {
    throw_errno(env, EBADF, "adopt: not a /dev/fuse descriptor");
    return NULL;
  }
  if (resend) {
    /* Before any worker reads: the requeued requests are the first ones read. */
    int err = blk_notify_resend(fd);
    if (err) {
      throw_errno(env, err, "adopt: FUSE_NOTIFY_RESEND");
      return NULL;
    }
  }
  blk_fs *fs = blk_fs_new();
  if (!fs) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  long page = sysconf(_SC_PAGESIZE);
  size_t data = init.max_write > (size_t)init.max_pages * page ? init.max_write : (size_t)init.max_pages * page;
  fs->bufsize = data + BLK_HEADER_ROOM;
  fs->fd = fd;
  fs->init = init;
  atomic_store(&fs->minor, init.minor);
  atomic_store(&fs->got_init, 1);
  atomic_store(&fs->pt_done, 1); /* the backing id, if any, is the one the first server registered */
  const char *msg = blk_serve(env, fs, argv[2]);
  if (msg) {
    blk_free_fs(fs);
    napi_throw_error(env, NULL, msg);
    return NULL;
  }
  fcntl(fd, F_SETFD, FD_CLOEXEC); /* ours now: no child of ours may keep the connection alive */
  napi_value handle;
  NAPI_CALL(env, napi_create_external(env, fs, NULL, NULL, &handle));
  return handle;
}

/* connection(handle) -> { fd, init }: fd is a new dup of the /dev/fuse descriptor, the caller's to close. */
napi_value blk_js_connection(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out, fdv;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = blk_live_fs_arg(env, argv[0]);
  if (!fs) return NULL;
  pthread_mutex_lock(&fs->lock);
  int got = atomic_load(&fs->got_init) && atomic_load(&fs->pt_done); /* the record carries the backing id */
  blk_init init = fs->init;
  pthread_mutex_unlock(&fs->lock);
  if (!got) {
    napi_throw_error(env, "EAGAIN", "the kernel's FUSE INIT has not been answered yet");
    return NULL;
  }
  int d = fcntl(fs->fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) {
    throw_errno(env, errno, "dup of the /dev/fuse descriptor");
    return NULL;
  }
  napi_create_object(env, &out);
  napi_create_int32(env, d, &fdv);
  napi_set_named_property(env, out, "fd", fdv);
  napi_set_named_property(env, out, "init", init_to_js(env, &init));
  return out;
}
