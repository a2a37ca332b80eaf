/**
 * Hostile qcow2 images (docs/security.md): each mutation of a real
 * image is refused at open, or answers an error for the bad range only, with
 * an asserted error code, quickly and without large allocations.
 */
import assert from 'node:assert/strict';
import { closeSync, copyFileSync, openSync, readFileSync, readSync, symlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { isBlkError } from '../../src/errors.js';
import { missingTools, qemuImg, randomBytes, run, runOk, seededRandom, tempDir } from '../helpers/tools.js';
import { applyWrites, createQcow2, K, M } from './images.js';

const TIME_BOUND_MS = 3000;
const MEMORY_BOUND = 256 * M;

function pread(path: string, off: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b;
  } finally {
    closeSync(fd);
  }
}

function pwrite(path: string, off: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, off);
  } finally {
    closeSync(fd);
  }
}

const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u64 = (v: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};

interface Layout {
  cluster: number;
  l1: number;
  refcountTable: number;
  l2: number;
  data0: number;
  headerLength: number;
  size: number;
}

function layout(path: string): Layout {
  const h = pread(path, 0, 112);
  const cluster = 2 ** h.readUInt32BE(20);
  const l1 = Number(h.readBigUInt64BE(40));
  const l2 = Number(pread(path, l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
  const data0 = Number(pread(path, l2, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
  return {
    cluster,
    l1,
    refcountTable: Number(h.readBigUInt64BE(48)),
    l2,
    data0,
    headerLength: h.readUInt32BE(100),
    size: Number(h.readBigUInt64BE(24)),
  };
}

/** Appends a header extension at the end of the extension area (after the existing ones). */
function extensionsEnd(path: string, L: Layout): number {
  const head = pread(path, 0, L.cluster);
  let at = L.headerLength;
  while (head.readUInt32BE(at) !== 0) at += 8 + Math.ceil(head.readUInt32BE(at + 4) / 8) * 8;
  return at;
}

/** Sets the backing file name (in cluster 0, after the extensions) and optionally a backing-format extension. */
function setBacking(path: string, name: string, format?: string): void {
  const L = layout(path);
  let at = extensionsEnd(path, L);
  if (format !== undefined) {
    const f = Buffer.from(format);
    const ext = Buffer.alloc(8 + Math.ceil(f.length / 8) * 8);
    ext.writeUInt32BE(0xe2792aca, 0);
    ext.writeUInt32BE(f.length, 4);
    f.copy(ext, 8);
    pwrite(path, at, ext);
    at += ext.length;
    pwrite(path, at, Buffer.alloc(8));
  }
  const nameOff = at + 8;
  pwrite(path, nameOff, Buffer.from(name));
  pwrite(path, 8, Buffer.concat([u64(nameOff), u32(Buffer.byteLength(name))]));
}

type Expect = { open: string } | { read: string; at: number; len?: number; goodAt?: number };

interface Mutation {
  name: string;
  /** Returns the image to open (usually the mutated copy) and the allowed roots. */
  make(dir: string, base: string, compressed: string): string | { image: string; roots: string[] };
  expect: Expect;
}

const M_: Mutation[] = [
  {
    name: 'cluster_bits below 9',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 20, u32(8))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'cluster_bits above 21',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 20, u32(22))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'version 4',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 4, u32(4))),
    expect: { open: 'IMAGE_UNSUPPORTED' },
  },
  {
    name: 'huge l1_size',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 36, u32(0x7fffffff))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'l1_size too small for the virtual size',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 24, u64(64n * 1024n * 1024n * 1024n))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'virtual size needing an L1 table above 32 MiB',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 24, u64(1n << 52n))),
    expect: { open: 'IMAGE_TOO_LARGE' },
  },
  {
    name: 'L1 table beyond the end of the file',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 40, u64(1n << 40n))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'L1 table unaligned',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, 40, u64(L.l1 + 512))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'L1 table overlapping the refcount table',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, 40, u64(L.refcountTable))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'L1 table on the header',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 40, u64(0))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'refcount table beyond the end of the file',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 48, u64(1n << 36n))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'refcount_table_clusters = 0',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 56, u32(0))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'huge refcount table',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 56, u32(0xffffff))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'unknown incompatible feature bit',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 72, u64(1n << 40n))),
    expect: { open: 'IMAGE_UNSUPPORTED' },
  },
  {
    name: 'AES encryption (crypt_method 1)',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 32, u32(1))),
    expect: { open: 'IMAGE_ENCRYPTED' },
  },
  {
    name: 'header_length beyond the cluster',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, 100, u32(L.cluster + 8))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'compression type byte without the feature bit',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 104, Buffer.from([1]))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'header extension overrunning cluster 0',
    make: (d, b) =>
      mutate(d, b, (p, L) =>
        pwrite(p, extensionsEnd(p, L), Buffer.concat([u32(0x12345678), u32(0x7fffffff)])),
      ),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'backing name longer than 1023 bytes',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 8, Buffer.concat([u64(512), u32(4000)]))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'nb_snapshots above 65536',
    make: (d, b) => mutate(d, b, (p) => pwrite(p, 60, Buffer.concat([u32(70000), u64(0)]))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'huge snapshot table running past the end of the file',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, 60, Buffer.concat([u32(65536), u64(L.data0)]))),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'snapshot with more than 1 KiB of extra data',
    make: (d, b) =>
      mutate(d, b, (p, L) => {
        const e = Buffer.alloc(40);
        e.writeUInt32BE(5000, 36);
        pwrite(p, L.data0, e);
        pwrite(p, 60, Buffer.concat([u32(1), u64(L.data0)]));
      }),
    expect: { open: 'IMAGE_INVALID' },
  },
  {
    name: 'L1 entry pointing beyond the end of the file',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l1, u64((1n << 63n) | (1n << 40n)))),
    expect: { read: 'IMAGE_CORRUPT', at: 0 },
  },
  {
    name: 'L1 entry unaligned',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l1, u64(L.l2 + 512))),
    expect: { read: 'IMAGE_CORRUPT', at: 0 },
  },
  {
    name: 'L1 entry with reserved bits',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l1, u64(BigInt(L.l2) | (1n << 58n)))),
    expect: { read: 'IMAGE_CORRUPT', at: 0 },
  },
  {
    name: 'L2 table overlapping the refcount table',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l1, u64(L.refcountTable))),
    expect: { read: 'IMAGE_CORRUPT', at: 0 },
  },
  {
    name: 'L2 entry pointing beyond the end of the file (only that cluster fails)',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l2, u64((1n << 63n) | (1n << 36n)))),
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
  {
    name: 'L2 entry pointing at the header cluster',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l2, u64(1n << 63n))),
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
  {
    name: 'L2 entry unaligned',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l2, u64(L.data0 + 4096))),
    expect: { read: 'IMAGE_CORRUPT', at: 5, len: 10, goodAt: 64 * K },
  },
  {
    name: 'L2 entry with reserved bits',
    make: (d, b) => mutate(d, b, (p, L) => pwrite(p, L.l2, u64(BigInt(L.data0) | 0x1e0n))),
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
  {
    name: 'oversized compressed descriptor running far past the end of the file',
    make: (d, _b, c) =>
      mutate(d, c, (p, L) => {
        const size = readFileSync(p).length;
        // offset near EOF, maximal sector count (clusterBits 16: x = 54, 8 sector bits)
        const desc = (1n << 62n) | (255n << 54n) | BigInt(size - 100);
        pwrite(p, L.l2, u64(desc));
      }),
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
  {
    name: 'compressed descriptor pointing at data that does not inflate to a cluster',
    make: (d, _b, c) =>
      mutate(d, c, (p, L) => {
        const desc = (1n << 62n) | (3n << 54n) | BigInt(L.refcountTable);
        pwrite(p, L.l2, u64(desc));
      }),
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
  {
    name: 'backing file naming /etc/passwd',
    make: (d, b) => mutate(d, b, (p) => setBacking(p, '/etc/passwd', 'raw')),
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'backing file escaping through ..',
    make: (d, b) => mutate(d, b, (p) => setBacking(p, '../../../../../../etc/passwd', 'raw')),
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'backing file through a symlink out of the allowed root',
    make: (d, b) =>
      mutate(d, b, (p) => {
        symlinkSync('/etc/passwd', join(d, 'innocent.raw'));
        setBacking(p, 'innocent.raw', 'raw');
      }),
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'json: backing specification',
    make: (d, b) =>
      mutate(d, b, (p) => setBacking(p, 'json:{"driver":"file","filename":"/etc/shadow"}', 'raw')),
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'protocol-prefixed backing name',
    make: (d, b) => mutate(d, b, (p) => setBacking(p, 'nbd:localhost:10809', 'raw')),
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'backing file without a recorded format (never probed)',
    make: (d, b) =>
      mutate(d, b, (p) => {
        copyFileSync(b, join(d, 'plain.qcow2'));
        setBacking(p, 'plain.qcow2');
      }),
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'backing cycle (a -> b -> a)',
    make: (d, b) => {
      const a = join(d, 'a.qcow2');
      const bb = join(d, 'b.qcow2');
      copyFileSync(b, a);
      copyFileSync(b, bb);
      setBacking(a, 'b.qcow2', 'qcow2');
      setBacking(bb, 'a.qcow2', 'qcow2');
      return a;
    },
    expect: { open: 'BACKING_CHAIN' },
  },
  {
    name: 'image backed by itself',
    make: (d, b) => mutate(d, b, (p) => setBacking(p, 'hostile.qcow2', 'qcow2')),
    expect: { open: 'BACKING_CHAIN' },
  },
  {
    name: 'backing chain deeper than 16',
    make: (d, b) => {
      for (let i = 0; i < 20; i++) {
        const p = join(d, `c${i}.qcow2`);
        copyFileSync(b, p);
        if (i < 19) setBacking(p, `c${i + 1}.qcow2`, 'qcow2');
      }
      return join(d, 'c0.qcow2');
    },
    expect: { open: 'BACKING_CHAIN' },
  },
  {
    name: 'external data file outside the allowed roots',
    make: (d) => {
      const img = createQcow2(join(d, 'img.qcow2'), 4 * M, { data_file: join(d, 'img.data') });
      return { image: img, roots: [join(d, 'elsewhere')] };
    },
    expect: { open: 'BACKING_POLICY' },
  },
  {
    name: 'LUKS-encrypted image made by qemu-img',
    make: (d) => {
      const img = join(d, 'enc.qcow2');
      const args = ['create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=secret', '-o'];
      args.push('encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', img, '4M');
      // qemu-img times PBKDF2 with getrusage; on a loaded machine the measurement can fail
      // ("Unable to get accurate CPU usage"): that is the tool, not the image, so try again.
      for (let attempt = 1; ; attempt++) {
        const r = run('qemu-img', args);
        if (r.status === 0) break;
        if (attempt === 5 || !/accurate CPU usage/.test(r.stderr))
          throw new Error(`qemu-img ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
      }
      return img;
    },
    expect: { open: 'IMAGE_ENCRYPTED' },
  },
  {
    name: 'zero flag in a version 2 image',
    make: (d) => {
      const img = createQcow2(join(d, 'v2.qcow2'), 4 * M, { compat: '0.10' });
      applyWrites(d, img, 'qcow2', [{ off: 0, len: 192 * K, kind: 'data' }], 5);
      const L = layout(img);
      pwrite(img, L.l2, u64(BigInt(L.data0) | 1n));
      return img;
    },
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
  {
    name: 'extended L2 subcluster both allocated and zero',
    make: (d) => {
      const img = createQcow2(join(d, 'ext.qcow2'), 4 * M, { extended_l2: 'on' });
      applyWrites(d, img, 'qcow2', [{ off: 0, len: 192 * K, kind: 'data' }], 6);
      const L = layout(img);
      pwrite(img, L.l2 + 8, u64(0x0000000100000001n));
      return img;
    },
    expect: { read: 'IMAGE_CORRUPT', at: 0, goodAt: 64 * K },
  },
];

function mutate(dir: string, base: string, fn: (path: string, L: Layout) => void): string {
  const p = join(dir, 'hostile.qcow2');
  copyFileSync(base, p);
  fn(p, layout(p));
  return p;
}

function codeOf(e: unknown): string {
  return isBlkError(e) ? e.code : `not a BlkError: ${String(e)}`;
}

describe('hostile qcow2 images are refused or fail only the bad range', () => {
  const missing = missingTools('qemu-img', 'qemu-io');
  const skip = missing.length ? `missing: ${missing.join(', ')}` : false;
  let base = '';
  let compressed = '';

  test('corpus has at least 20 mutations', () => {
    assert.ok(M_.length >= 20);
  });

  for (const m of M_) {
    test(m.name, { skip, timeout: 30_000 }, async (t) => {
      const dir = tempDir(t);
      if (!base) {
        const shared = tempDir({ after: (fn) => process.on('exit', fn) });
        base = createQcow2(join(shared, 'base.qcow2'), 4 * M, {});
        applyWrites(shared, base, 'qcow2', [{ off: 0, len: 192 * K, kind: 'data' }], 1);
        const src = join(shared, 'src.raw');
        runOk('truncate', ['-s', `${4 * M}`, src]);
        pwrite(src, 0, randomBytes(seededRandom(2), 256 * K));
        compressed = join(shared, 'compressed.qcow2');
        qemuImg('convert', '-c', '-O', 'qcow2', src, compressed);
      }
      const made = m.make(dir, base, compressed);
      const image = typeof made === 'string' ? made : made.image;
      const roots = typeof made === 'string' ? [dir] : made.roots;
      const rss0 = process.memoryUsage().rss;
      const t0 = Date.now();
      if ('open' in m.expect) {
        const want = m.expect.open;
        await assert.rejects(
          (async () => {
            const img = await openImage({ filename: image, readOnly: true, allowedRoots: roots });
            await img.close();
          })(),
          (e) => {
            assert.equal(codeOf(e), want, (e as Error).message);
            assert.ok(isBlkError(e) && e.place.file !== undefined, 'the error names the file');
            return true;
          },
        );
      } else {
        const { read, at, len, goodAt } = m.expect;
        const img = await openImage({ filename: image, readOnly: true, allowedRoots: roots });
        try {
          await assert.rejects(img.node.read(at, Buffer.alloc(len ?? 4096)), (e) => {
            assert.equal(codeOf(e), read, (e as Error).message);
            assert.equal((e as { errno?: number }).errno, 5, 'answered as EIO');
            return true;
          });
          if (goodAt !== undefined) await img.node.read(goodAt, Buffer.alloc(4096));
        } finally {
          await img.close();
        }
      }
      assert.ok(Date.now() - t0 < TIME_BOUND_MS, `took ${Date.now() - t0} ms`);
      assert.ok(process.memoryUsage().rss - rss0 < MEMORY_BOUND, 'memory stayed bounded');
    });
  }
});
