/*
 * Mounting through libfuse (fuse_mount.c), declared apart from blk_fs.h so
 * that fuse_mount.c, which includes <fuse_lowlevel.h>, need not include
 * <linux/fuse.h> as well (libfuse's headers redefine some of its macros).
 */
#ifndef BLKEXPORT_FUSE_MOUNT_H
#define BLKEXPORT_FUSE_MOUNT_H

/* Mounts; returns the libfuse session (opaque) and, in *fd, a dup of its /dev/fuse descriptor that is
 * ours (close-on-exec); NULL with *msg set on failure. */
void *blk_mount(const char *mountpoint, const char *options, int *fd, const char **msg);
/* Destroys the session (closing libfuse's descriptor, not ours), unmounting first when asked. */
void blk_mount_done(void *session, int unmount);

#endif
