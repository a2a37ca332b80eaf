/* The fd holder (fd_holder.c): server loop and the message helpers its clients use. */
#ifndef BLKEXPORT_FD_HOLDER_H
#define BLKEXPORT_FD_HOLDER_H

#include <stddef.h>
#include <sys/types.h>

#define HOLDER_MAX_FDS 4
#define HOLDER_MAX_MSG (64 * 1024)

/* Serves on `path` until QUIT, SIGTERM/SIGINT, or `idle_seconds` empty and quiet: 0; 1 when another
 * holder already serves `path` (its lock file `path`.lock is taken); -1 with err on setup failure. */
int holder_serve(const char *path, int idle_seconds, char *err, size_t errlen);
/* A connected client socket (5 s timeouts), or -1 with err. */
int holder_connect(const char *path, char *err, size_t errlen);
/* One message with up to HOLDER_MAX_FDS descriptors: 0, or -1 with errno. */
int holder_send(int sock, const char *buf, size_t len, const int *fds, int nfds);
/* One message and its descriptors (received close-on-exec): its length, or -1 with errno. */
ssize_t holder_recv(int sock, char *buf, size_t cap, int *fds, int *nfds);

#endif
