/*
 * Mounting, the binding's only use of libfuse. libfuse parses the mount
 * options (fsname, subtype, default_permissions, ro, allow_other), calls
 * mount(2) as root and fusermount3 otherwise, and mounts on a regular file
 * without `nonempty`. We take a dup of the session's /dev/fuse descriptor and
 * destroy the session: requests are read and answered by our own loop
 * (fuse_loop.c), never by libfuse's, which cannot hand a connection over.
 *
 * Kept apart because it is the one file that includes <fuse_lowlevel.h>; the
 * rest speak the kernel protocol from <linux/fuse.h>, whose macros libfuse's
 * headers partly redefine.
 */
#include "fuse_mount.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <string.h>
#include <unistd.h>

/* No ops: libfuse never reads a request of ours. */
static const struct fuse_lowlevel_ops no_ops;

void *blk_mount(const char *mountpoint, const char *options, int *fd, const char **msg) {
  char *argv[] = {"blkexport", "-o", (char *)options, NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, argv);
  struct fuse_session *se = fuse_session_new(&args, &no_ops, sizeof(no_ops), NULL);
  if (!se) {
    *msg = "fuse_session_new failed (bad options?)";
    return NULL;
  }
  if (fuse_session_mount(se, mountpoint) != 0) {
    fuse_session_destroy(se);
    *msg = "fuse_session_mount failed";
    return NULL;
  }
  *fd = fcntl(fuse_session_fd(se), F_DUPFD_CLOEXEC, 3);
  if (*fd < 0) {
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    *msg = "dup of the /dev/fuse descriptor failed";
    return NULL;
  }
  return se;
}

void blk_mount_done(void *session, int unmount) {
  struct fuse_session *se = session;
  if (unmount) fuse_session_unmount(se);
  /* No INIT reached this session, so no destroy op runs; it closes libfuse's descriptor only. */
  fuse_session_destroy(se);
}
