/*
 * The fd holder: a tiny server that keeps the /dev/fuse descriptors of the
 * agent's exports (and an image pin where a mount covers its own image), so
 * that a FUSE connection outlives the agent process: the kernel keeps a
 * connection while any descriptor of it is open, and a successor agent asks
 * the holder for them and serves the same mounts.
 *
 * It runs in its own process (`blkexport fdstore`), in C and synchronous on
 * purpose: it must never depend on the agent's event loop, and it has
 * nothing else to do. Protocol: one SOCK_SEQPACKET Unix socket, one message
 * per request and per answer, descriptors as SCM_RIGHTS. A request is
 * "OP\0NAME\0MOUNTPOINT\0META" (META opaque bytes); answers start "OK" or
 * "ERR <why>":
 *   PUT   store (or replace) entry NAME with the 1-2 descriptors sent
 *   DROP  close and forget entry NAME
 *   LIST  "OK <n>": the number of live entries (dead connections are dropped first)
 *   GET   NAME = index: "OK\0NAME\0MOUNTPOINT\0META" with the entry's descriptors
 *   PING  "OK <pid>"
 *   QUIT  close everything, answer, exit
 * SIGTERM/SIGINT: lazily unmount every held mountpoint, close everything, exit
 * (a stop of the whole service leaves nothing mounted). An empty holder exits
 * after `idle` seconds without requests. Only root and the holder's own user
 * may talk to it (SO_PEERCRED).
 */
#define _GNU_SOURCE
#include "fd_holder.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_ENTRIES 4096

typedef struct {
  char *name;
  char *mountpoint;
  char *meta;
  size_t meta_len;
  int fds[HOLDER_MAX_FDS];
  int nfds;
} entry;

static entry entries[MAX_ENTRIES];
static int nentries;
static volatile sig_atomic_t stop_signal;

static void on_stop(int sig) { stop_signal = sig; }

static void entry_free(entry *e) {
  for (int i = 0; i < e->nfds; i++) close(e->fds[i]);
  free(e->name);
  free(e->mountpoint);
  free(e->meta);
  memset(e, 0, sizeof *e);
}

static void entry_remove(int i) {
  entry_free(&entries[i]);
  entries[i] = entries[nentries - 1];
  memset(&entries[nentries - 1], 0, sizeof(entry));
  nentries--;
}

static int find(const char *name) {
  for (int i = 0; i < nentries; i++)
    if (strcmp(entries[i].name, name) == 0) return i;
  return -1;
}

/* A connection whose first descriptor reports an error or hang-up is gone (unmounted, aborted). */
static void drop_dead(void) {
  for (int i = nentries - 1; i >= 0; i--) {
    struct pollfd p = {.fd = entries[i].fds[0], .events = 0};
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLERR | POLLHUP | POLLNVAL))) entry_remove(i);
  }
}

int holder_send(int sock, const char *buf, size_t len, const int *fds, int nfds) {
  struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
  char control[CMSG_SPACE(sizeof(int) * HOLDER_MAX_FDS)];
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    memset(control, 0, sizeof control);
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
  }
  ssize_t n;
  do n = sendmsg(sock, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  return n == (ssize_t)len ? 0 : -1;
}

ssize_t holder_recv(int sock, char *buf, size_t cap, int *fds, int *nfds) {
  struct iovec iov = {.iov_base = buf, .iov_len = cap};
  char control[CMSG_SPACE(sizeof(int) * HOLDER_MAX_FDS)];
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
  ssize_t n;
  do n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  *nfds = 0;
  if (n < 0) return -1;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *in = (int *)CMSG_DATA(c);
    for (int i = 0; i < k; i++) {
      if (*nfds < HOLDER_MAX_FDS) fds[(*nfds)++] = in[i];
      else close(in[i]);
    }
  }
  if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
    for (int i = 0; i < *nfds; i++) close(fds[i]);
    *nfds = 0;
    errno = EMSGSIZE;
    return -1;
  }
  return n;
}

static void reply(int sock, const char *text) { holder_send(sock, text, strlen(text), NULL, 0); }

/* Splits "OP\0NAME\0MOUNTPOINT\0META" into its parts (META may be empty or hold NULs). */
static int parse(char *buf, size_t n, char **op, char **name, char **mp, char **meta, size_t *meta_len) {
  char *end = buf + n, *p = buf;
  char *parts[3];
  for (int i = 0; i < 3; i++) {
    char *z = memchr(p, '\0', (size_t)(end - p));
    if (!z) return -1;
    parts[i] = p;
    p = z + 1;
  }
  *op = parts[0];
  *name = parts[1];
  *mp = parts[2];
  *meta = p;
  *meta_len = (size_t)(end - p);
  return 0;
}

static void handle(int sock, char *buf, size_t n, int *fds, int nfds) {
  char *op, *name, *mp, *meta;
  size_t meta_len;
  char out[64];
  if (parse(buf, n, &op, &name, &mp, &meta, &meta_len) != 0) {
    for (int i = 0; i < nfds; i++) close(fds[i]);
    reply(sock, "ERR malformed request");
    return;
  }
  if (strcmp(op, "PUT") == 0) {
    if (nfds < 1 || name[0] == '\0' || nentries >= MAX_ENTRIES) {
      for (int i = 0; i < nfds; i++) close(fds[i]);
      reply(sock, nfds < 1 ? "ERR PUT needs a descriptor" : "ERR bad name or too many entries");
      return;
    }
    int i = find(name);
    if (i >= 0) entry_remove(i);
    entry *e = &entries[nentries];
    e->name = strdup(name);
    e->mountpoint = strdup(mp);
    e->meta = malloc(meta_len ? meta_len : 1);
    if (!e->name || !e->mountpoint || !e->meta) {
      for (int k = 0; k < nfds; k++) close(fds[k]);
      entry_free(e);
      reply(sock, "ERR out of memory");
      return;
    }
    memcpy(e->meta, meta, meta_len);
    e->meta_len = meta_len;
    memcpy(e->fds, fds, sizeof(int) * (size_t)nfds);
    e->nfds = nfds;
    nentries++;
    reply(sock, "OK");
    return;
  }
  for (int i = 0; i < nfds; i++) close(fds[i]); /* only PUT sends descriptors */
  if (strcmp(op, "DROP") == 0) {
    int i = find(name);
    if (i >= 0) entry_remove(i);
    reply(sock, "OK");
  } else if (strcmp(op, "LIST") == 0) {
    drop_dead();
    snprintf(out, sizeof out, "OK %d", nentries);
    reply(sock, out);
  } else if (strcmp(op, "GET") == 0) {
    int i = atoi(name);
    if (i < 0 || i >= nentries) {
      reply(sock, "ERR no such entry");
      return;
    }
    entry *e = &entries[i];
    size_t len = 3 + strlen(e->name) + 1 + strlen(e->mountpoint) + 1 + e->meta_len;
    char *msg = malloc(len);
    if (!msg) {
      reply(sock, "ERR out of memory");
      return;
    }
    size_t at = 0;
    memcpy(msg, "OK", 3);
    at = 3;
    memcpy(msg + at, e->name, strlen(e->name) + 1);
    at += strlen(e->name) + 1;
    memcpy(msg + at, e->mountpoint, strlen(e->mountpoint) + 1);
    at += strlen(e->mountpoint) + 1;
    memcpy(msg + at, e->meta, e->meta_len);
    holder_send(sock, msg, len, e->fds, e->nfds);
    free(msg);
  } else if (strcmp(op, "PING") == 0) {
    snprintf(out, sizeof out, "OK %d", (int)getpid());
    reply(sock, out);
  } else if (strcmp(op, "QUIT") == 0) {
    while (nentries > 0) entry_remove(nentries - 1);
    reply(sock, "OK");
    stop_signal = -1;
  } else {
    reply(sock, "ERR unknown request");
  }
}

/* Only root and our own user may use the holder. */
static int peer_allowed(int sock) {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return 0;
  return cred.uid == 0 || cred.uid == getuid();
}

int holder_serve(const char *path, int idle_seconds, char *err, size_t errlen) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof addr.sun_path) {
    snprintf(err, errlen, "socket path too long: %s", path);
    return -1;
  }
  strcpy(addr.sun_path, path);
  /* One holder per socket: two agents' start-ups racing would otherwise each
   * bind the path, and the first holder's entries become unreachable. The
   * lock lives as long as this holder; a second one returns 1. */
  char lockpath[sizeof addr.sun_path + 8];
  snprintf(lockpath, sizeof lockpath, "%s.lock", path);
  int lk = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lk < 0) {
    snprintf(err, errlen, "open %s: %s", lockpath, strerror(errno));
    return -1;
  }
  if (flock(lk, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    close(lk);
    if (e == EWOULDBLOCK) {
      snprintf(err, errlen, "another fd holder serves %s", path);
      return 1;
    }
    snprintf(err, errlen, "flock %s: %s", lockpath, strerror(e));
    return -1;
  }
  int ls = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (ls < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    close(lk);
    return -1;
  }
  unlink(path);
  mode_t old = umask(077);
  int b = bind(ls, (struct sockaddr *)&addr, sizeof addr);
  umask(old);
  if (b != 0 || listen(ls, 16) != 0) {
    snprintf(err, errlen, "bind/listen %s: %s", path, strerror(errno));
    close(ls);
    close(lk);
    return -1;
  }
  struct sigaction sa = {.sa_handler = on_stop};
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  time_t last = time(NULL);
  static char buf[HOLDER_MAX_MSG];
  while (!stop_signal) {
    struct pollfd p = {.fd = ls, .events = POLLIN};
    int r = poll(&p, 1, 1000);
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) {
      drop_dead();
      if (nentries == 0 && time(NULL) - last >= idle_seconds) break;
      continue;
    }
    int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (s < 0) continue;
    struct timeval tv = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (peer_allowed(s)) {
      /* One connection may carry several requests; it ends when the client closes it. */
      for (;;) {
        int fds[HOLDER_MAX_FDS], nfds = 0;
        ssize_t n = holder_recv(s, buf, sizeof buf, fds, &nfds);
        if (n <= 0) break;
        handle(s, buf, (size_t)n, fds, nfds);
        last = time(NULL);
        if (stop_signal) break;
      }
    }
    close(s);
  }
  if (stop_signal > 0) {
    /* A stop of the whole service: nothing stays mounted. */
    for (int i = 0; i < nentries; i++)
      if (entries[i].mountpoint[0]) umount2(entries[i].mountpoint, MNT_DETACH);
  }
  while (nentries > 0) entry_remove(nentries - 1);
  close(ls);
  unlink(path); /* while still holding the lock: a successor binds only after */
  close(lk);
  return 0;
}

int holder_connect(const char *path, char *err, size_t errlen) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof addr.sun_path) {
    snprintf(err, errlen, "socket path too long: %s", path);
    return -1;
  }
  strcpy(addr.sun_path, path);
  int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    return -1;
  }
  if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
    snprintf(err, errlen, "connect %s: %s", path, strerror(errno));
    close(s);
    return -1;
  }
  struct timeval tv = {.tv_sec = 5};
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return s;
}
