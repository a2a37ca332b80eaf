/**
 * A seeded, structure-aware mutator for qcow2 images: it parses the seed
 * image's layout once (header fields, header extensions, backing name, L1,
 * L2 tables, refcount table and blocks, snapshot table, data and compressed
 * descriptors) and breaks one to four things in a copy: a field set to an
 * interesting value, table entries pointed at the wrong places, flipped bits
 * in a region, a truncated or extended file, a cluster copied over another.
 * The same (image, seed) always gives the same bytes and the same description.
 */
import { seededRandom } from '../helpers/tools.js';

export interface Region {
  name: string;
  offset: number;
  length: number;
}

interface Field {
  name: string;
  offset: number;
  width: 1 | 2 | 4 | 8;
}

export interface Layout {
  cluster: number;
  fields: Field[];
  regions: Region[];
  /** Offsets of 8-byte table entries, by table kind. */
  entries: { l1: number[]; l2: number[]; refcountTable: number[]; compressed: number[] };
  /** Offsets of header extensions (type field). */
  extensions: number[];
  /** Offsets of snapshot table entries. */
  snapshots: number[];
  l2EntrySize: number;
}

const HEADER_FIELDS: Field[] = [
  { name: 'magic', offset: 0, width: 4 },
  { name: 'version', offset: 4, width: 4 },
  { name: 'backing_file_offset', offset: 8, width: 8 },
  { name: 'backing_file_size', offset: 16, width: 4 },
  { name: 'cluster_bits', offset: 20, width: 4 },
  { name: 'size', offset: 24, width: 8 },
  { name: 'crypt_method', offset: 32, width: 4 },
  { name: 'l1_size', offset: 36, width: 4 },
  { name: 'l1_table_offset', offset: 40, width: 8 },
  { name: 'refcount_table_offset', offset: 48, width: 8 },
  { name: 'refcount_table_clusters', offset: 56, width: 4 },
  { name: 'nb_snapshots', offset: 60, width: 4 },
  { name: 'snapshots_offset', offset: 64, width: 8 },
];
const V3_FIELDS: Field[] = [
  { name: 'incompatible_features', offset: 72, width: 8 },
  { name: 'compatible_features', offset: 80, width: 8 },
  { name: 'autoclear_features', offset: 88, width: 8 },
  { name: 'refcount_order', offset: 96, width: 4 },
  { name: 'header_length', offset: 100, width: 4 },
  { name: 'compression_type', offset: 104, width: 1 },
];
const SNAPSHOT_FIELDS: [string, number, 1 | 2 | 4 | 8][] = [
  ['l1_table_offset', 0, 8],
  ['l1_size', 8, 4],
  ['id_str_size', 12, 2],
  ['name_size', 14, 2],
  ['vm_state_size', 32, 4],
  ['extra_data_size', 36, 4],
  ['vm_state_size_large', 40, 8],
  ['disk_size', 48, 8],
];
const OFFSET_MASK = 0x00fffffffffffe00n;

function u64(b: Buffer, off: number): bigint {
  return off + 8 <= b.length ? b.readBigUInt64BE(off) : 0n;
}
function u32(b: Buffer, off: number): number {
  return off + 4 <= b.length ? b.readUInt32BE(off) : 0;
}

/** Parses the layout of a valid qcow2 image (the seed, never a mutant). */
export function parseLayout(img: Buffer): Layout {
  const version = u32(img, 4);
  const cluster = 2 ** u32(img, 20);
  const headerLength = version >= 3 ? u32(img, 100) : 72;
  const incompat = version >= 3 ? u64(img, 72) : 0n;
  const l2EntrySize = incompat & 16n ? 16 : 8;
  const fields = version >= 3 ? [...HEADER_FIELDS, ...V3_FIELDS] : [...HEADER_FIELDS];
  const regions: Region[] = [{ name: 'header', offset: 0, length: headerLength }];
  const entries: Layout['entries'] = { l1: [], l2: [], refcountTable: [], compressed: [] };
  const inFile = (off: number, len: number) => off >= 0 && len > 0 && off + len <= img.length;

  const extensions: number[] = [];
  const backingOff = Number(u64(img, 8));
  const extEnd = backingOff > 0 ? backingOff : cluster;
  for (let at = headerLength; at + 8 <= extEnd && extensions.length < 64; ) {
    const type = u32(img, at);
    if (type === 0) break;
    extensions.push(at);
    at += 8 + Math.ceil(u32(img, at + 4) / 8) * 8;
  }
  if (extensions.length)
    regions.push({ name: 'extensions', offset: headerLength, length: extEnd - headerLength });
  if (backingOff > 0) regions.push({ name: 'backing_name', offset: backingOff, length: u32(img, 16) });

  const clusterBits = Math.log2(cluster);
  const l1Off = Number(u64(img, 40));
  const l1Size = u32(img, 36);
  if (inFile(l1Off, l1Size * 8)) {
    regions.push({ name: 'l1', offset: l1Off, length: l1Size * 8 });
    for (let i = 0; i < l1Size; i++) {
      entries.l1.push(l1Off + i * 8);
      const l2 = Number(u64(img, l1Off + i * 8) & OFFSET_MASK);
      if (!l2 || !inFile(l2, cluster)) continue;
      regions.push({ name: `l2@${l2}`, offset: l2, length: cluster });
      for (let j = 0; j < cluster; j += l2EntrySize) {
        const e = u64(img, l2 + j);
        if (e === 0n) continue;
        entries.l2.push(l2 + j);
        if (e & (1n << 62n)) {
          entries.compressed.push(l2 + j);
          const x = 62 - (clusterBits - 8);
          const host = Number(e & ((1n << BigInt(x)) - 1n));
          if (inFile(host, 512)) regions.push({ name: `zdata@${host}`, offset: host, length: 512 });
        } else {
          const host = Number(e & OFFSET_MASK);
          if (host && inFile(host, cluster))
            regions.push({ name: `data@${host}`, offset: host, length: cluster });
        }
      }
    }
  }
  const rtOff = Number(u64(img, 48));
  const rtLen = u32(img, 56) * cluster;
  if (inFile(rtOff, Math.min(rtLen, img.length - rtOff))) {
    regions.push({ name: 'refcount_table', offset: rtOff, length: Math.min(rtLen, img.length - rtOff) });
    for (let i = 0; i < rtLen / 8 && rtOff + i * 8 + 8 <= img.length; i++) {
      const e = u64(img, rtOff + i * 8);
      if (e === 0n) continue;
      entries.refcountTable.push(rtOff + i * 8);
      const rb = Number(e & OFFSET_MASK);
      if (inFile(rb, cluster)) regions.push({ name: `refcount_block@${rb}`, offset: rb, length: cluster });
    }
  }
  const snapshots: number[] = [];
  let at = Number(u64(img, 64));
  for (let i = 0; i < u32(img, 60) && inFile(at, 40); i++) {
    snapshots.push(at);
    const extra = u32(img, at + 36);
    const len = 40 + extra + img.readUInt16BE(at + 12) + img.readUInt16BE(at + 14);
    regions.push({ name: `snapshot#${i}`, offset: at, length: Math.min(len, img.length - at) });
    at += Math.ceil(len / 8) * 8;
  }
  return { cluster, fields, regions, entries, extensions, snapshots, l2EntrySize };
}

type Rand = () => number;
const pick = <T>(rand: Rand, xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
const hex = (v: bigint | number) => `0x${v.toString(16)}`;

function interesting(rand: Rand, old: bigint, width: number, L: Layout, fileLen: number): bigint {
  const max = width === 8 ? (1n << 64n) - 1n : (1n << BigInt(width * 8)) - 1n;
  const c = BigInt(L.cluster);
  const options: bigint[] = [
    0n,
    1n,
    max,
    max >> 1n,
    old + 1n,
    old > 0n ? old - 1n : 2n,
    old ^ (1n << BigInt(Math.floor(rand() * width * 8))),
    BigInt(fileLen),
    BigInt(fileLen) + c,
    (BigInt(fileLen) / c) * c,
    c,
    2n * c,
    old + c,
    BigInt(Math.floor(rand() * 64)),
    1n << BigInt(Math.floor(rand() * Math.min(width * 8, 63))),
    BigInt(Math.floor(rand() * 2 ** 32)) * BigInt(Math.floor(rand() * 2 ** 21)),
    0x7fffffffn,
    0x80000000n,
    1n << 53n,
  ];
  return pick(rand, options) & max;
}

function readField(b: Buffer, off: number, width: number): bigint {
  if (off + width > b.length) return 0n;
  if (width === 8) return b.readBigUInt64BE(off);
  if (width === 4) return BigInt(b.readUInt32BE(off));
  if (width === 2) return BigInt(b.readUInt16BE(off));
  return BigInt(b[off]!);
}

function writeField(b: Buffer, off: number, width: number, v: bigint): void {
  if (off + width > b.length) return;
  if (width === 8) b.writeBigUInt64BE(v, off);
  else if (width === 4) b.writeUInt32BE(Number(v & 0xffffffffn), off);
  else if (width === 2) b.writeUInt16BE(Number(v & 0xffffn), off);
  else b[off] = Number(v & 0xffn);
}

/** A 64-bit table entry made hostile: past EOF, unaligned, reserved bits, flags flipped, onto metadata. */
function hostileEntry(rand: Rand, old: bigint, L: Layout, fileLen: number, img: Buffer): [bigint, string] {
  const c = BigInt(L.cluster);
  const off = old & OFFSET_MASK;
  const meta = [0n, u64(img, 40), u64(img, 48), u64(img, 64)];
  const choices: [() => bigint, string][] = [
    [() => 0n, 'zero'],
    [
      () => (old & ~OFFSET_MASK) | ((BigInt(fileLen) / c + 1n + BigInt(Math.floor(rand() * 1000))) * c),
      'past EOF',
    ],
    [() => old | BigInt(1 + Math.floor(rand() * 511)), 'unaligned/low bits'],
    [() => old | (1n << BigInt(56 + Math.floor(rand() * 6))), 'reserved high bits'],
    [() => old ^ (1n << 63n), 'COPIED toggled'],
    [() => old ^ (1n << 62n), 'compressed toggled'],
    [() => old | 1n, 'zero flag'],
    [() => (old & ~OFFSET_MASK) | pick(rand, meta), 'onto metadata'],
    [() => (old & ~OFFSET_MASK) | (off + c), 'shifted one cluster'],
    [() => BigInt(Math.floor(rand() * 2 ** 32)) * BigInt(Math.floor(rand() * 2 ** 32)), 'random'],
    [() => (1n << 64n) - 1n, 'all ones'],
  ];
  const [f, what] = pick(rand, choices);
  return [f() & ((1n << 64n) - 1n), what];
}

/** One mutation step; returns its description, or undefined when the chosen target is absent. */
function step(rand: Rand, b: Buffer, L: Layout, fileLen: number): string | undefined {
  const kind = Math.floor(rand() * 12);
  switch (kind) {
    case 0:
    case 1: {
      const f = pick(rand, L.fields);
      const old = readField(b, f.offset, f.width);
      const v = interesting(rand, old, f.width, L, fileLen);
      writeField(b, f.offset, f.width, v);
      return `header.${f.name} ${hex(old)} -> ${hex(v)}`;
    }
    case 2: {
      const r = pick(rand, L.regions);
      const n = 1 + Math.floor(rand() * 8);
      const where: string[] = [];
      for (let i = 0; i < n; i++) {
        const at = r.offset + Math.floor(rand() * r.length);
        if (at >= b.length) continue;
        const bit = Math.floor(rand() * 8);
        b[at] = b[at]! ^ (1 << bit);
        where.push(`${at}.${bit}`);
      }
      return `flip ${r.name} bits ${where.join(',')}`;
    }
    case 3:
    case 4: {
      const table = pick(rand, ['l1', 'l2', 'l2', 'refcountTable', 'compressed'] as const);
      const list = L.entries[table];
      if (!list.length) return undefined;
      const at = pick(rand, list);
      const old = u64(b, at);
      let v: bigint;
      let what: string;
      if (table === 'compressed' && rand() < 0.6) {
        const x = BigInt(62 - (Math.log2(L.cluster) - 8));
        const sectorsMask = ((1n << 62n) - 1n) & ~((1n << x) - 1n);
        const choice = Math.floor(rand() * 3);
        if (choice === 0) [v, what] = [old | sectorsMask, 'max sectors'];
        else if (choice === 1)
          [v, what] = [(old & ~((1n << x) - 1n)) | BigInt(fileLen + 4096), 'data past EOF'];
        else [v, what] = [(old & ~((1n << x) - 1n)) | BigInt(Math.floor(rand() * 512)), 'data in the header'];
      } else [v, what] = hostileEntry(rand, old, L, fileLen, b);
      writeField(b, at, 8, v);
      return `${table} entry @${at} ${hex(old)} -> ${hex(v)} (${what})`;
    }
    case 5: {
      if (!L.extensions.length) return undefined;
      const at = pick(rand, L.extensions);
      if (rand() < 0.5) {
        const types = [0, 0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77, 0x44415441, 0x12345678];
        const t = pick(rand, types);
        writeField(b, at, 4, BigInt(t));
        return `extension @${at} type -> ${hex(t)}`;
      }
      const len = pick(rand, [0, 1, 7, 8, 4095, L.cluster, 0xffffffff, Math.floor(rand() * 1024)]);
      writeField(b, at + 4, 4, BigInt(len));
      return `extension @${at} length -> ${len}`;
    }
    case 6: {
      if (!L.snapshots.length) return undefined;
      const at = pick(rand, L.snapshots);
      const [name, off, width] = pick(rand, SNAPSHOT_FIELDS);
      const old = readField(b, at + off, width);
      const v =
        rand() < 0.5 ? hostileEntry(rand, old, L, fileLen, b)[0] : interesting(rand, old, width, L, fileLen);
      writeField(b, at + off, width, v & ((1n << BigInt(width * 8)) - 1n));
      return `snapshot @${at} ${name} ${hex(old)} -> ${hex(v & ((1n << BigInt(width * 8)) - 1n))}`;
    }
    case 7: {
      const rbs = L.regions.filter((r) => r.name.startsWith('refcount_block'));
      if (!rbs.length) return undefined;
      const r = pick(rand, rbs);
      const at = r.offset + Math.floor(rand() * (r.length / 2)) * 2;
      const v = pick(rand, [0, 0xffff, 2, 1]);
      writeField(b, at, 2, BigInt(v));
      return `refcount block entry @${at} -> ${v}`;
    }
    case 8: {
      const len =
        rand() < 0.5
          ? Math.floor(rand() * b.length)
          : Math.floor((rand() * b.length) / L.cluster) * L.cluster;
      return `truncate to ${len}`;
    }
    case 9: {
      const from = pick(rand, L.regions);
      const to = pick(rand, L.regions);
      if (from.offset >= b.length || to.offset >= b.length) return undefined;
      b.copy(b, to.offset, from.offset, Math.min(from.offset + from.length, b.length));
      return `copy ${from.name} over ${to.name}`;
    }
    case 10: {
      const n = 1 + Math.floor(rand() * 16);
      const at = Math.floor(rand() * Math.max(1, b.length - n));
      for (let i = 0; i < n && at + i < b.length; i++) b[at + i] = Math.floor(rand() * 256);
      return `splat ${n} bytes @${at}`;
    }
    default: {
      const r = pick(rand, L.regions);
      const v = pick(rand, [0x00, 0xff]);
      if (r.offset >= b.length) return undefined;
      b.fill(v, r.offset, Math.min(r.offset + r.length, b.length));
      return `fill ${r.name} with ${hex(v)}`;
    }
  }
}

/** Mutates a copy of `seed` (whose layout is `L`) with one to four seeded steps. */
export function mutate(seed: Buffer, L: Layout, mutationSeed: number): { image: Buffer; steps: string[] } {
  const rand = seededRandom(mutationSeed);
  let b = Buffer.from(seed);
  const steps: string[] = [];
  const n = 1 + Math.floor(rand() * rand() * 4);
  for (let tries = 0; steps.length < n && tries < 20; tries++) {
    const s = step(rand, b, L, seed.length);
    if (s === undefined) continue;
    const m = /^truncate to (\d+)$/.exec(s);
    if (m) b = b.subarray(0, Number(m[1]));
    steps.push(s);
  }
  if (rand() < 0.05) {
    b = Buffer.concat([b, Buffer.alloc(1 + Math.floor(rand() * 8192), 0xa5)]);
    steps.push('appended garbage');
  }
  return { image: b, steps };
}
