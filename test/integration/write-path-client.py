# A client of an exported file for the write fast path test (fuse-write-path.test.ts).
# Threads, all with O_DIRECT so every request reaches the export:
#   - two overwriting writers, each owning every other "even" unit (a 64 KiB unit
#     that starts allocated): seeded 4 KiB-aligned writes inside their units and,
#     now and then, a hole punched over a whole unit (which the next write
#     allocates again);
#   - one allocating writer owning the "odd" units (unallocated at the start,
#     neighbours of the even ones): seeded writes, so each first write allocates;
#   - two readers reading anywhere while the writers run: every 4 KiB block must
#     read as zeroes or as a stamp written for that very offset (a write that
#     landed at the wrong host offset shows up as a stamp of another offset).
# Each block written is a stamp: its offset and a version, then bytes derived
# from both. At the end: fsync, the whole file read back must equal the model
# (what was written over the initial content), the model is written to OUT_REF
# and a JSON summary is printed. Exit status 1 on any difference or error.
# usage: python3 write-path-client.py PATH SIZE SEED OPS OUT_REF
#        python3 write-path-client.py --init OUT SIZE   (writes the initial content, raw)
import ctypes
import json
import mmap
import os
import random
import struct
import sys
import threading

B = 4096
UNIT = 64 * 1024
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def stamp(off, ver):
    return struct.pack('<QQ', off, ver) + random.Random(off * 1000003 + ver).randbytes(B - 16)


def initial():
    """Even units hold version 0 stamps, odd ones zeroes (the test builds the image so)."""
    m = bytearray(size)
    for u in range(0, units, 2):
        for off in range(u * UNIT, (u + 1) * UNIT, B):
            m[off:off + B] = stamp(off, 0)
    return m


if sys.argv[1] == '--init':
    size = int(sys.argv[3])
    units = size // UNIT
    with open(sys.argv[2], 'wb') as f:
        f.write(initial())
    sys.exit(0)

path, size, seed, ops, out_ref = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
units = size // UNIT
model = initial()
errors = []
counts = {'writes': 0, 'punches': 0, 'reads': 0, 'blocksChecked': 0}
lock = threading.Lock()
done = threading.Event()


def aligned(n):
    return mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants


def writer(owned, rand, n):
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = aligned(16 * B)
    ver = {}
    try:
        for _ in range(n):
            u = rand.choice(owned)
            if rand.random() < 0.02:
                if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, u * UNIT, UNIT) != 0:
                    raise OSError(ctypes.get_errno(), 'fallocate')
                model[u * UNIT:(u + 1) * UNIT] = bytes(UNIT)
                with lock:
                    counts['punches'] += 1
                continue
            first = rand.randrange(UNIT // B)
            nblk = rand.randint(1, UNIT // B - first)
            off = u * UNIT + first * B
            for i in range(nblk):
                o = off + i * B
                ver[o] = ver.get(o, 0) + 1
                buf[i * B:(i + 1) * B] = stamp(o, ver[o])
            if os.pwrite(fd, memoryview(buf)[:nblk * B], off) != nblk * B:
                raise OSError('short write')
            model[off:off + nblk * B] = buf[:nblk * B]
            with lock:
                counts['writes'] += 1
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says it
        errors.append(f'writer: {e!r}')
    finally:
        os.close(fd)


def check_block(b, off):
    if b == bytes(B):
        return True
    o, v = struct.unpack_from('<QQ', b)
    return o == off and b == stamp(off, v)


def reader(rand):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = aligned(256 * 1024)
    try:
        while not done.is_set():
            n = rand.randint(1, 64) * B
            off = rand.randrange((size - n) // B + 1) * B
            got = os.preadv(fd, [memoryview(buf)[:n]], off)
            if got != n:
                raise OSError(f'short read {got} of {n} at {off}')
            for i in range(0, n, B):
                if not check_block(bytes(buf[i:i + B]), off + i):
                    raise AssertionError(f'block at {off + i} holds neither zeroes nor its own stamp')
            with lock:
                counts['reads'] += 1
                counts['blocksChecked'] += n // B
    except Exception as e:  # noqa: BLE001
        errors.append(f'reader: {e!r}')
        done.set()
    finally:
        os.close(fd)


even = list(range(0, units, 2))
odd = list(range(1, units, 2))
writers = [
    threading.Thread(target=writer, args=(even[0::2], random.Random(seed * 10 + 1), ops)),
    threading.Thread(target=writer, args=(even[1::2], random.Random(seed * 10 + 2), ops)),
    threading.Thread(target=writer, args=(odd, random.Random(seed * 10 + 3), ops // 2)),
]
readers = [threading.Thread(target=reader, args=(random.Random(seed * 10 + 4 + i),)) for i in range(2)]
for t in writers + readers:
    t.start()
for t in writers:
    t.join()
done.set()
for t in readers:
    t.join()

fd = os.open(path, os.O_RDWR | os.O_DIRECT)
try:
    os.fsync(fd)
    buf = aligned(1024 * 1024)
    for off in range(0, size, len(buf)):
        n = min(len(buf), size - off)
        if os.preadv(fd, [memoryview(buf)[:n]], off) != n or buf[:n] != model[off:off + n]:
            errors.append(f'the file differs from the model in [{off}, {off + n})')
            break
finally:
    os.close(fd)
with open(out_ref, 'wb') as f:
    f.write(model)
print(json.dumps({**counts, 'errors': errors}))
sys.exit(1 if errors else 0)
