/*
 * FUSE passthrough (Linux 6.9+): the kernel does an open file's reads,
 * writes, splice and mmap on a backing file, without a request to us.
 *
 * One backing file per connection: the image file of a raw export, at the
 * same offsets. The JavaScript side decides at mount whether the export
 * qualifies and hands us a descriptor of the image (pt_fd); then:
 *   - INIT: FUSE_PASSTHROUGH is asked for when the kernel offers it, with
 *     max_stack_depth 1 (backing files on a non-stacked filesystem; the
 *     kernel refuses one on overlayfs with ELOOP, and we fall back);
 *   - right after INIT's answer is written (the kernel has processed it by
 *     then: the reply is handled inside our write), the worker registers
 *     pt_fd with FUSE_DEV_IOC_BACKING_OPEN and closes pt_fd: the kernel keeps
 *     its own reference to the open file. The id, or the errno that says why
 *     there is none (EOPNOTSUPP: not offered; EPERM: not CAP_SYS_ADMIN;
 *     ELOOP: stacked filesystem), is what JavaScript's passthrough() reads;
 *   - OPEN replies carry FOPEN_PASSTHROUGH and the id (blk_reply_open);
 *   - the id lives as long as the connection (the kernel frees it with the
 *     connection) or until backingClose(); files opened with it hold their
 *     own reference, so closing it never disturbs them. A successor adopting
 *     the connection gets the id in the INIT record and answers with it: a
 *     new id for the same file would be a different backing object, which
 *     the kernel refuses (EBUSY) while files opened with the old one exist.
 */
#include "napi_glue.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

uint64_t blk_passthrough_want(blk_fs *fs, uint64_t offered, struct fuse_init_out *out) {
  if (fs->pt_fd < 0) return 0;
  if (!(offered & FUSE_INIT_EXT) || !(offered & FUSE_PASSTHROUGH)) return 0;
  uint32_t depth = 1;
  memcpy((char *)out + BLK_INIT_OUT_MAX_STACK_DEPTH, &depth, sizeof(depth));
  return FUSE_PASSTHROUGH;
}

void blk_passthrough_after_init(blk_fs *fs) {
  int32_t id = 0;
  int err = 0;
  if (fs->pt_fd >= 0) {
    pthread_mutex_lock(&fs->lock);
    int negotiated = (fs->init.flags & FUSE_PASSTHROUGH) != 0;
    pthread_mutex_unlock(&fs->lock);
    if (!negotiated) {
      err = EOPNOTSUPP;
    } else {
      struct fuse_backing_map map;
      memset(&map, 0, sizeof(map));
      map.fd = fs->pt_fd;
      int r = ioctl(fs->fd, FUSE_DEV_IOC_BACKING_OPEN, &map);
      if (r > 0)
        id = r;
      else
        err = r < 0 ? errno : EIO;
    }
    close(fs->pt_fd);
    fs->pt_fd = -1;
  }
  pthread_mutex_lock(&fs->lock);
  fs->init.backing_id = id;
  fs->pt_errno = err;
  pthread_mutex_unlock(&fs->lock);
  atomic_store(&fs->pt_done, 1);
}

int blk_backing_close(blk_fs *fs) {
  pthread_mutex_lock(&fs->lock);
  int32_t id = fs->init.backing_id;
  fs->init.backing_id = 0;
  pthread_mutex_unlock(&fs->lock);
  if (id <= 0) return 0;
  uint32_t arg = (uint32_t)id;
  return ioctl(fs->fd, FUSE_DEV_IOC_BACKING_CLOSE, &arg) == 0 ? 0 : errno;
}

/* ---- JavaScript's side ------------------------------------------------------------ */

static void set_prop_num(napi_env env, napi_value o, const char *key, double v) {
  napi_value x;
  napi_create_double(env, v, &x);
  napi_set_named_property(env, o, key, x);
}

/*
 * passthrough(handle) -> undefined while INIT is not answered yet, else
 * { offered, negotiated, backingId, errno }: offered, the kernel offered
 * FUSE_PASSTHROUGH at INIT; negotiated, we took it; backingId > 0, OPEN may
 * answer with it; errno, why not (0 when there is an id or nobody asked).
 */
napi_value blk_js_passthrough(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out, b;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  blk_fs *fs = blk_live_fs_arg(env, argv[0]);
  if (!fs) return NULL;
  if (!atomic_load(&fs->pt_done)) return NULL;
  pthread_mutex_lock(&fs->lock);
  blk_init init = fs->init;
  int err = fs->pt_errno;
  pthread_mutex_unlock(&fs->lock);
  napi_create_object(env, &out);
  napi_get_boolean(env, (init.kernel_flags & FUSE_PASSTHROUGH) != 0, &b);
  napi_set_named_property(env, out, "offered", b);
  napi_get_boolean(env, (init.flags & FUSE_PASSTHROUGH) != 0, &b);
  napi_set_named_property(env, out, "negotiated", b);
  set_prop_num(env, out, "backingId", init.backing_id);
  set_prop_num(env, out, "errno", err);
  return out;
}

/* backingClose(handle) -> 0 or an errno: lets go of the backing id (files opened with it keep working). */
napi_value blk_js_backing_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *p = NULL;
  NAPI_CALL(env, napi_get_value_external(env, argv[0], &p));
  blk_fs *fs = p;
  int err = fs && !fs->ended ? blk_backing_close(fs) : 0;
  napi_create_int32(env, err, &out);
  return out;
}
