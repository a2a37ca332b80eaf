# Reads ranges of a file with O_DIRECT and writes their bytes to stdout, in order.
# Usage: direct-read-client.py FILE OFF:LEN [OFF:LEN ...] (offsets and lengths 4 KiB-aligned).
# A child process, so the FUSE export under test is never read by the process that serves it.
import mmap
import os
import sys

path = sys.argv[1]
ranges = [tuple(int(x) for x in a.split(':')) for a in sys.argv[2:]]
buf = mmap.mmap(-1, max((n for _, n in ranges), default=4096))  # page-aligned, as O_DIRECT wants
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
out = sys.stdout.buffer
try:
    for off, n in ranges:
        got = os.preadv(fd, [memoryview(buf)[:n]], off)
        if got != n:
            sys.exit(f'short read at {off}: {got} of {n}')
        out.write(buf[:n])
finally:
    os.close(fd)
out.flush()
