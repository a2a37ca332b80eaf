/*
 * blkexport's native helper: the few Linux calls Node does not expose.
 *   ofdSetLock(fd, start, len, type)  -> 0 or -errno   fcntl(F_OFD_SETLK)
 *   ofdTestLock(fd, start, len, type) -> l_type of the conflicting lock
 *                                        (F_UNLCK when none) or -errno   fcntl(F_OFD_GETLK)
 *   peerCredentials(fd)               -> { pid, uid, gid }  getsockopt(SO_PEERCRED), throws on error
 *   F_RDLCK, F_WRLCK, F_UNLCK         -> the platform's values
 * Errors are returned as -errno (never thrown) for the lock calls so the caller
 * can tell "unsupported" (EINVAL) from "conflict" (EAGAIN) and build its own message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdio.h>
#include <string.h>
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

static napi_value init(napi_env env, napi_value exports) {
  struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"ofdSetLock", ofd_set_lock},
      {"ofdTestLock", ofd_test_lock},
      {"peerCredentials", peer_credentials},
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
