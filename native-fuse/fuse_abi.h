/*
 * The FUSE kernel protocol as the binding speaks it: <linux/fuse.h> plus what
 * Debian 12's copy (protocol 7.38) lacks, and the values our INIT answers.
 *
 * Missing constants are defined here, guarded, with the values of the kernel's
 * include/uapi/linux/fuse.h (protocol 7.40, Linux 6.9: "add FUSE_NOTIFY_RESEND,
 * add FUSE_HAS_RESEND init flag"). They were checked against the kernel tree
 * (linux-next's include/uapi/linux/fuse.h at 7.45, where they are unchanged)
 * and against the running kernel: its BTF (/sys/kernel/btf/vmlinux) lists
 * enum fuse_notify_code with FUSE_NOTIFY_RESEND = 7, and its INIT request
 * offers flags2 bit 7 (1 << 39) on Linux 6.18.
 */
#ifndef BLKEXPORT_FUSE_ABI_H
#define BLKEXPORT_FUSE_ABI_H

#include <linux/fuse.h>
#include <linux/ioctl.h>
#include <stddef.h>
#include <stdint.h>

#ifndef FUSE_INIT_EXT /* 7.36 */
#error "<linux/fuse.h> older than protocol 7.36 (no FUSE_INIT_EXT, no flags2): install newer linux-libc-dev"
#endif

/* FUSE_HAS_RESEND (7.40): in INIT, the kernel can requeue requests a server read but never answered. */
#ifndef FUSE_HAS_RESEND
#define FUSE_HAS_RESEND (1ULL << 39)
#endif
/* FUSE_UNIQUE_RESEND (7.40): set in fuse_in_header.unique of a requeued request; the reply echoes it. */
#ifndef FUSE_UNIQUE_RESEND
#define FUSE_UNIQUE_RESEND (1ULL << 63)
#endif
/* FUSE_NOTIFY_RESEND (7.40) is a member of enum fuse_notify_code, so #ifndef cannot see it. */
#if FUSE_KERNEL_MINOR_VERSION < 40
enum { FUSE_NOTIFY_RESEND = 7 };
#endif

_Static_assert(FUSE_HAS_RESEND == (1ULL << 39), "FUSE_HAS_RESEND is flags2 bit 7");

/*
 * FUSE passthrough (7.40, Linux 6.9): the server registers a backing file on
 * the connection (ioctl FUSE_DEV_IOC_BACKING_OPEN, CAP_SYS_ADMIN) and answers
 * OPEN with FOPEN_PASSTHROUGH and the backing id; the kernel then does the
 * file's reads, writes, splice and mmap on the backing file. INIT: the flag
 * in flags2 (bit 5) and max_stack_depth, the u32 after flags2 in
 * fuse_init_out (unused[0] in older headers); OPEN: backing_id, the s32 after
 * open_flags in fuse_open_out (padding in older headers).
 */
#ifndef FUSE_PASSTHROUGH
#define FUSE_PASSTHROUGH (1ULL << 37)
#endif
#ifndef FOPEN_PASSTHROUGH
#define FOPEN_PASSTHROUGH (1 << 7)
#endif
#if FUSE_KERNEL_MINOR_VERSION < 40
struct fuse_backing_map {
  int32_t fd;
  uint32_t flags;
  uint64_t padding;
};
#define FUSE_DEV_IOC_BACKING_OPEN _IOW(FUSE_DEV_IOC_MAGIC, 1, struct fuse_backing_map)
#define FUSE_DEV_IOC_BACKING_CLOSE _IOW(FUSE_DEV_IOC_MAGIC, 2, uint32_t)
#endif
#define BLK_INIT_OUT_MAX_STACK_DEPTH 36 /* offsetof(struct fuse_init_out, max_stack_depth) */
#define BLK_OPEN_OUT_BACKING_ID 12      /* offsetof(struct fuse_open_out, backing_id) */
_Static_assert(FUSE_PASSTHROUGH == (1ULL << 37), "FUSE_PASSTHROUGH is flags2 bit 5");
_Static_assert(FOPEN_PASSTHROUGH == (1 << 7), "FOPEN_PASSTHROUGH is open flag bit 7");
_Static_assert(sizeof(struct fuse_backing_map) == 16, "fuse_backing_map");
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out");
_Static_assert(FUSE_NOTIFY_RESEND == 7, "FUSE_NOTIFY_RESEND is notify code 7");
/* The layouts the running kernel's BTF shows (Linux 6.18, protocol 7.45). */
_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct fuse_init_in) == 64, "fuse_init_in");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(offsetof(struct fuse_init_out, flags2) == 32, "fuse_init_out.flags2");

/*
 * What our INIT answers: what libfuse 3.14 answered for our old ll_init
 * (captured with strace on Linux 6.18: minor 31, flags 0x40409029, 1 MiB
 * max_write and max_readahead, max_pages 256, 64/48 background), plus
 * FUSE_HAS_RESEND when the kernel offers it.
 */
#define BLK_PROTO_MINOR 31 /* the minor libfuse 3.14 answered: the kernel keeps the view of us it had */
#define BLK_MAX_WRITE (1u << 20)
#define BLK_MAX_READAHEAD (1u << 20)
#define BLK_MAX_BACKGROUND 64
#define BLK_CONGESTION_THRESHOLD 48
/* Capabilities taken when offered: libfuse's defaults for our ops (no splice, no locks, no readdirplus). */
#define BLK_WANT_IF_OFFERED (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_AUTO_INVAL_DATA | FUSE_ASYNC_DIO)
/* Without FUSE_MAX_PAGES a request carries at most 32 pages (the kernel's FUSE_DEFAULT_MAX_PAGES_PER_REQ). */
#define BLK_DEFAULT_MAX_PAGES 32
/* Room for the headers in front of a write's data (fuse_in_header + fuse_write_in is 80; libfuse keeps a page). */
#define BLK_HEADER_ROOM 4096

#endif
