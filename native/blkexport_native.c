/*
 * blkexport's native helper: the few Linux calls Node does not expose.
 *   ofdSetLock(fd, start, len, type)  -> 0 or -errno   fcntl(F_OFD_SETLK)
 *   ofdTestLock(fd, start, len, type) -> l_type of the conflicting lock
 *                                        (F_UNLCK when none) or -errno   fcntl(F_OFD_GETLK)
 *   peerCredentials(fd)               -> { pid, uid, gid }  getsockopt(SO_PEERCRED), throws on error
 *   holderServe(path, idleSeconds)    -> runs the fd holder (fd_holder.c) until it ends; throws on setup failure
 *   holderRequest(path, op, name, mountpoint, meta, fds)
 *                                     -> { ok, text, name, mountpoint, meta, fds }: one request to a holder
 *   closeFd(fd)                       -> 0 or -errno
 *   lazyUnmount(path)                 -> 0 or -errno   umount2(MNT_DETACH | UMOUNT_NOFOLLOW)
 *   lazyUnmountAsync(path)            -> Promise of the same, in libuv's thread pool
 *   F_RDLCK, F_WRLCK, F_UNLCK         -> the platform's values
 * Errors are returned as -errno (never thrown) for the lock calls so the caller
 * can tell "unsupported" (EINVAL) from "conflict" (EAGAIN) and build its own message.
 */
#define _GNU_SOURCE
#include "fd_holder.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/types.h>

#define CHECK(call)                                                              \
  do {                                                                           \
    if ((call) != napi_ok) {                                                     \
      napi_throw_error(env, NULL, "blkexport_native: N-API call failed: " #call); \
      return NULL;                                                               \
    }                                                                            \
  } while (0)

static int get_args(napi_env env, napi_callback_info info, size_t want, int64_t *out) {
  napi_value argv[4];
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "blkexport_native: wrong number of arguments");
    return -1;
  }
  for (size_t i = 0; i < want; i++) {
    napi_valuetype t;
    if (napi_typeof(env, argv[i], &t) != napi_ok || t != napi_number ||
        napi_get_value_int64(env, argv[i], &out[i]) != napi_ok) {
      napi_throw_type_error(env, NULL, "blkexport_native: arguments must be integers");
      return -1;
    }
  }
  return 0;
}

static napi_value make_int(napi_env env, int64_t v) {
  napi_value r;
  if (napi_create_int64(env, v, &r) != napi_ok) return NULL;
  return r;
}

static int fill_flock(struct flock *fl, int64_t start, int64_t len, int64_t type) {
  memset(fl, 0, sizeof *fl);
  if (type != F_RDLCK && type != F_WRLCK && type != F_UNLCK) return -1;
  fl->l_type = (short)type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)len;
  fl->l_pid = 0; /* must be 0 for OFD locks */
  return 0;
}

static napi_value ofd_set_lock(napi_env env, napi_callback_info info) {
  int64_t a[4];
  struct flock fl;
  if (get_args(env, info, 4, a) != 0) return NULL;
  if (fill_flock(&fl, a[1], a[2], a[3]) != 0) return make_int(env, -EINVAL);
  if (fcntl((int)a[0], F_OFD_SETLK, &fl) == -1) return make_int(env, -errno);
  return make_int(env, 0);
}

static napi_value ofd_test_lock(napi_env env, napi_callback_info info) {
  int64_t a[4];
  struct flock fl;
  if (get_args(env, info, 4, a) != 0) return NULL;
  if (fill_flock(&fl, a[1], a[2], a[3]) != 0) return make_int(env, -EINVAL);
  if (fcntl((int)a[0], F_OFD_GETLK, &fl) == -1) return make_int(env, -errno);
  return make_int(env, fl.l_type);
}

static napi_value peer_credentials(napi_env env, napi_callback_info info) {
  int64_t a[1];
  struct ucred cred;
  socklen_t len = sizeof cred;
  napi_value obj;
  if (get_args(env, info, 1, a) != 0) return NULL;
  if (getsockopt((int)a[0], SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1 || len != sizeof cred) {
    char msg[96];
    snprintf(msg, sizeof msg, "getsockopt(SO_PEERCRED) failed: %s", strerror(errno));
    napi_throw_error(env, "EPEERCRED", msg);
    return NULL;
  }
  CHECK(napi_create_object(env, &obj));
  CHECK(napi_set_named_property(env, obj, "pid", make_int(env, cred.pid)));
  CHECK(napi_set_named_property(env, obj, "uid", make_int(env, cred.uid)));
  CHECK(napi_set_named_property(env, obj, "gid", make_int(env, cred.gid)));
  return obj;
}

static char *get_string(napi_env env, napi_value v) {
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return NULL;
  char *s = malloc(len + 1);
  if (s && napi_get_value_string_utf8(env, v, s, len + 1, &len) != napi_ok) {
    free(s);
    return NULL;
  }
  return s;
}

/* holderServe(path, idleSeconds) -> served: blocks this thread until the holder ends; false when another serves path. */
static napi_value holder_serve_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  char *path = argc >= 1 ? get_string(env, argv[0]) : NULL;
  int64_t idle = 30;
  if (argc >= 2) napi_get_value_int64(env, argv[1], &idle);
  if (!path) {
    napi_throw_type_error(env, NULL, "holderServe(path, idleSeconds)");
    return NULL;
  }
  char err[512] = "";
  int r = holder_serve(path, (int)idle, err, sizeof err);
  free(path);
  if (r < 0) {
    napi_throw_error(env, "EHOLDER", err);
    return NULL;
  }
  napi_value served;
  CHECK(napi_get_boolean(env, r == 0, &served));
  return served;
}

/* holderRequest(path, op, name, mountpoint, meta: Buffer, fds: number[]) -> { ok, text, name, mountpoint, meta, fds } */
static napi_value holder_request_js(napi_env env, napi_callback_info info) {
  napi_value argv[6], out, arr, v;
  size_t argc = 6;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 6) {
    napi_throw_type_error(env, NULL, "holderRequest(path, op, name, mountpoint, meta, fds)");
    return NULL;
  }
  char *path = get_string(env, argv[0]), *op = get_string(env, argv[1]);
  char *name = get_string(env, argv[2]), *mp = get_string(env, argv[3]);
  void *meta = NULL;
  size_t meta_len = 0;
  uint32_t nfds = 0;
  int fds[HOLDER_MAX_FDS];
  napi_get_buffer_info(env, argv[4], &meta, &meta_len);
  napi_get_array_length(env, argv[5], &nfds);
  char err[512] = "";
  char *msg = NULL, *in = NULL;
  int sock = -1;
  if (!path || !op || !name || !mp || nfds > HOLDER_MAX_FDS) {
    snprintf(err, sizeof err, "bad arguments");
    goto fail;
  }
  for (uint32_t i = 0; i < nfds; i++) {
    int32_t fd = -1;
    napi_get_element(env, argv[5], i, &v);
    napi_get_value_int32(env, v, &fd);
    fds[i] = fd;
  }
  size_t len = strlen(op) + 1 + strlen(name) + 1 + strlen(mp) + 1 + meta_len;
  msg = malloc(len);
  in = malloc(HOLDER_MAX_MSG);
  if (!msg || !in || len > HOLDER_MAX_MSG) {
    snprintf(err, sizeof err, "request too large");
    goto fail;
  }
  size_t at = 0;
  memcpy(msg + at, op, strlen(op) + 1), at += strlen(op) + 1;
  memcpy(msg + at, name, strlen(name) + 1), at += strlen(name) + 1;
  memcpy(msg + at, mp, strlen(mp) + 1), at += strlen(mp) + 1;
  if (meta_len) memcpy(msg + at, meta, meta_len);
  sock = holder_connect(path, err, sizeof err);
  if (sock < 0) goto fail;
  if (holder_send(sock, msg, len, fds, (int)nfds) != 0) {
    snprintf(err, sizeof err, "send to %s: %s", path, strerror(errno));
    goto fail;
  }
  int rfds[HOLDER_MAX_FDS], rn = 0;
  ssize_t n = holder_recv(sock, in, HOLDER_MAX_MSG, rfds, &rn);
  if (n <= 0) {
    snprintf(err, sizeof err, "no answer from %s: %s", path, n == 0 ? "closed" : strerror(errno));
    goto fail;
  }
  CHECK(napi_create_object(env, &out));
  /* The answer: "OK..." or "ERR ..." up to the first NUL; after OK\0 may come NAME\0MOUNTPOINT\0META. */
  size_t tlen = strnlen(in, (size_t)n);
  CHECK(napi_get_boolean(env, strncmp(in, "OK", 2) == 0, &v));
  CHECK(napi_set_named_property(env, out, "ok", v));
  CHECK(napi_create_string_utf8(env, in, tlen, &v));
  CHECK(napi_set_named_property(env, out, "text", v));
  if (tlen + 1 < (size_t)n) {
    char *p = in + tlen + 1, *end = in + n;
    char *z1 = memchr(p, '\0', (size_t)(end - p));
    char *z2 = z1 ? memchr(z1 + 1, '\0', (size_t)(end - z1 - 1)) : NULL;
    if (z1 && z2) {
      CHECK(napi_create_string_utf8(env, p, (size_t)(z1 - p), &v));
      CHECK(napi_set_named_property(env, out, "name", v));
      CHECK(napi_create_string_utf8(env, z1 + 1, (size_t)(z2 - z1 - 1), &v));
      CHECK(napi_set_named_property(env, out, "mountpoint", v));
      CHECK(napi_create_buffer_copy(env, (size_t)(end - z2 - 1), z2 + 1, NULL, &v));
      CHECK(napi_set_named_property(env, out, "meta", v));
    }
  }
  CHECK(napi_create_array_with_length(env, (size_t)rn, &arr));
  for (int i = 0; i < rn; i++) {
    CHECK(napi_create_int32(env, rfds[i], &v));
    CHECK(napi_set_element(env, arr, (uint32_t)i, v));
  }
  CHECK(napi_set_named_property(env, out, "fds", arr));
  close(sock);
  free(msg), free(in), free(path), free(op), free(name), free(mp);
  return out;

fail:
  if (sock >= 0) close(sock);
  free(msg), free(in), free(path), free(op), free(name), free(mp);
  napi_throw_error(env, "EHOLDER", err);
  return NULL;
}

/* closeFd(fd) -> 0 or -errno: for descriptors that arrived from a holder. */
static napi_value close_fd_js(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (get_args(env, info, 1, a) != 0) return NULL;
  return make_int(env, close((int)a[0]) == 0 ? 0 : -errno);
}

/*
 * lazyUnmount(path) -> 0 or -errno: umount2(MNT_DETACH | UMOUNT_NOFOLLOW), what
 * `umount -l` does, without starting a process (a fork of a large agent is
 * slow and blocks its event loop). Root only; others use fusermount.
 */
static napi_value lazy_unmount_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  char path[4096];
  size_t len = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok || len >= sizeof path - 1)
    return make_int(env, -EINVAL);
  return make_int(env, umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW) == 0 ? 0 : -errno);
}

/*
 * lazyUnmountAsync(path) -> Promise of 0 or -errno: lazyUnmount in libuv's
 * thread pool. A lazy unmount waits for the kernel to retire the mount (an
 * RCU grace period, milliseconds on a busy machine); stopping an agent
 * unmounts every export, and one after another on the event loop a
 * thousand took seconds. Several run at once here.
 */
struct unmount_work {
  napi_async_work work;
  napi_deferred deferred;
  char path[4096];
  /* 0: umount2; 1: the id of the mount on the path (mountIdAsync). */
  int op;
  int result;
};

/*
 * The id of the mount on `path` (the first field of /proc/self/mountinfo),
 * or -errno. statx with AT_STATX_DONT_SYNC: the kernel answers from what it
 * has and asks no FUSE server for attributes (this process may serve the
 * mount; the call runs in the thread pool all the same). Reading the whole
 * mount table instead costs about 20 us per mount on the host, for every
 * export an agent mounts: quadratic over a first pass of thousands.
 */
static int mount_id_of(const char *path) {
  struct statx st;
  if (statx(AT_FDCWD, path, AT_STATX_DONT_SYNC | AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_MNT_ID, &st) != 0)
    return -errno;
  if (!(st.stx_mask & STATX_MNT_ID) || st.stx_mnt_id > INT32_MAX) return -ENOTSUP;
  return (int)st.stx_mnt_id;
}

static void unmount_execute(napi_env env, void *data) {
  (void)env;
  struct unmount_work *w = data;
  if (w->op == 1)
    w->result = mount_id_of(w->path);
  else
    w->result = umount2(w->path, MNT_DETACH | UMOUNT_NOFOLLOW) == 0 ? 0 : -errno;
}

static void unmount_complete(napi_env env, napi_status status, void *data) {
  struct unmount_work *w = data;
  napi_value r = make_int(env, status == napi_ok ? w->result : -EIO);
  if (r != NULL) napi_resolve_deferred(env, w->deferred, r);
  napi_delete_async_work(env, w->work);
  free(w);
}

static napi_value path_work_js(napi_env env, napi_callback_info info, int op) {
  size_t argc = 1;
  napi_value argv[1];
  napi_value promise;
  napi_value name;
  size_t len = 0;
  struct unmount_work *w = calloc(1, sizeof *w);
  if (w == NULL) {
    napi_throw_error(env, NULL, "blkexport_native: out of memory");
    return NULL;
  }
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_string_utf8(env, argv[0], w->path, sizeof w->path, &len) != napi_ok ||
      len >= sizeof w->path - 1) {
    free(w);
    napi_throw_type_error(env, NULL, "blkexport_native: a path shorter than 4095 bytes expected");
    return NULL;
  }
  w->op = op;
  if (napi_create_promise(env, &w->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, op == 1 ? "blkexport.mountId" : "blkexport.lazyUnmount", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, unmount_execute, unmount_complete, w, &w->work) != napi_ok) {
    free(w);
    napi_throw_error(env, NULL, "blkexport_native: cannot start the work");
    return NULL;
  }
  if (napi_queue_async_work(env, w->work) != napi_ok) {
    napi_delete_async_work(env, w->work);
    free(w);
    napi_throw_error(env, NULL, "blkexport_native: cannot queue the work");
    return NULL;
  }
  return promise;
}

static napi_value lazy_unmount_async_js(napi_env env, napi_callback_info info) {
  return path_work_js(env, info, 0);
}

/* mountIdAsync(path) -> Promise of the id of the mount on path, or -errno (in libuv's thread pool). */
static napi_value mount_id_async_js(napi_env env, napi_callback_info info) {
  return path_work_js(env, info, 1);
}

static napi_value init(napi_env env, napi_value exports) {
  struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"ofdSetLock", ofd_set_lock},
      {"ofdTestLock", ofd_test_lock},
      {"peerCredentials", peer_credentials},
      {"holderServe", holder_serve_js},
      {"holderRequest", holder_request_js},
      {"closeFd", close_fd_js},
      {"lazyUnmount", lazy_unmount_js},
      {"lazyUnmountAsync", lazy_unmount_async_js},
      {"mountIdAsync", mount_id_async_js},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    CHECK(napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f));
    CHECK(napi_set_named_property(env, exports, fns[i].name, f));
  }
  CHECK(napi_set_named_property(env, exports, "F_RDLCK", make_int(env, F_RDLCK)));
  CHECK(napi_set_named_property(env, exports, "F_WRLCK", make_int(env, F_WRLCK)));
  CHECK(napi_set_named_property(env, exports, "F_UNLCK", make_int(env, F_UNLCK)));
  return exports;
}

NAPI_MODULE_INIT() { return init(env, exports); }
