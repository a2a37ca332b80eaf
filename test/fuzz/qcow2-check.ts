/**
 * What one fuzzed image must do: open and fail with a BlkError that has a
 * code and names the file, or open and serve, each read either the bytes or
 * a BlkError (EIO to a FUSE reader) — never another exception, never a hang,
 * never unbounded memory. Reads cover the start of the disk in 64 KiB steps
 * and seeded random ranges anywhere in it (the virtual size may be mutated to
 * petabytes: only bounded ranges are read).
 */
import { readSync } from 'node:fs';
import { type BlockNode, openImage } from '../../src/block/index.js';
import { isBlkError } from '../../src/errors.js';
import { ALGORITHM_CODES, loadFuse3 } from '../../src/export/fuse/fuse3.js';
import { inflateJs } from '../block/read-via-map.js';
import { seededRandom } from '../helpers/tools.js';

export interface CheckResult {
  /** 'refused' at open, or 'served' (possibly with read errors). */
  outcome: 'refused' | 'served';
  /** The open error's code, or the read errors' codes. */
  codes: string[];
  reads: number;
  readErrors: number;
  /** Compressed clusters the FUSE binding's native decoder was compared on (0 without the addon). */
  inflateCompared: number;
  /** A broken promise: the reason (a non-BlkError, an error without a code or file, ...). */
  violation?: string;
  /**
   * The oracle on a served read-only image (qemu-oracle.ts): 'compared' once
   * `window` (what blkexport read of guest [0, min(size, ORACLE_BYTES))) is
   * compared with qemu-img convert, which the caller does in batches; or why
   * not: 'blk-read-error' (blkexport answered an error inside the window:
   * refused by blkexport), 'empty' (a window under 512 bytes).
   */
  oracle?: 'compared' | 'blk-read-error' | 'empty';
  window?: Buffer;
  /** With writes and read-back: the written bytes read back and found as written. */
  readBackBytes: number;
}

/** The oracle compares the guest bytes [0, min(size, ORACLE_BYTES)) rounded down to 512 (qemu's sectors). */
export const ORACLE_BYTES = 1 << 20;

function violationOf(e: unknown, what: string, needFile: boolean): string | undefined {
  if (!isBlkError(e))
    return `${what} threw a non-BlkError: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`;
  if (!e.code) return `${what} threw a BlkError without a code: ${e.message}`;
  if (needFile && e.place.file === undefined)
    return `${what} error does not name the file: ${e.code} ${e.message}`;
  return undefined;
}

const compared = new Set<string>();

/**
 * The compressed clusters (or vmdk grains) the node maps in [off, off+len)
 * from its caches, each inflated by the binding's native decoder (what the
 * FUSE workers run) and by JavaScript's: where the native one gives a cluster,
 * JavaScript's must give the same bytes (the native decoder accepts a
 * subset). Each host range once per `seen` set. A violation, or undefined.
 */
export async function compareInflate(
  node: BlockNode,
  off: number,
  len: number,
  r: { inflateCompared: number },
  seen: Set<string> = compared,
): Promise<string | undefined> {
  const addon = loadFuse3();
  if (!addon || len <= 0) return undefined;
  for (const x of node.mapHostCached?.(off, len) ?? []) {
    if (!('compressed' in x)) continue;
    const c = x.compressed;
    const key = `${c.host}:${c.clen}:${c.clusterSize}`;
    if (seen.has(key)) continue;
    seen.add(key);
    r.inflateCompared++;
    const native = addon.inflateCluster(
      c.fd,
      c.host,
      c.clen,
      Math.log2(c.clusterSize),
      ALGORITHM_CODES[c.algorithm],
    );
    if (!native) continue;
    const input = Buffer.alloc(c.clen);
    readSync(c.fd, input, 0, c.clen, c.host);
    const js = await inflateJs(c, input).catch((e: Error) => e);
    if (js instanceof Error)
      return `compressed cluster at ${c.host}: the native decoder accepts what JavaScript refuses (${js.message})`;
    if (!js.equals(native)) return `compressed cluster at ${c.host}: native and JavaScript inflation differ`;
  }
  return undefined;
}

/**
 * Opens `path` (backing and data files only inside `roots`) and reads bounded
 * ranges; with `writes`, opens it read-write and also writes, zeroes and
 * discards seeded ranges, each of which (with `readBack`) must read back as
 * written when it succeeded.
 */
export async function checkImage(
  path: string,
  roots: string[],
  seed: number,
  writes = false,
  readBack = true,
  oracle = false,
): Promise<CheckResult> {
  const r: CheckResult = {
    outcome: 'refused',
    codes: [],
    reads: 0,
    readErrors: 0,
    inflateCompared: 0,
    readBackBytes: 0,
  };
  let img: Awaited<ReturnType<typeof openImage>>;
  try {
    img = await openImage({
      filename: path,
      readOnly: !writes,
      allowedRoots: roots,
      format: 'qcow2',
      locking: 'off',
    });
  } catch (e) {
    r.violation = violationOf(e, 'open', true);
    if (isBlkError(e)) r.codes.push(e.code);
    return r;
  }
  r.outcome = 'served';
  try {
    const size = img.node.length();
    if (!Number.isSafeInteger(size) || size < 0) {
      r.violation = `virtual size ${size} is not a safe integer`;
      return r;
    }
    const ranges: [number, number][] = [];
    // With the oracle the steps cover its window (their bytes are kept for it).
    const window = oracle ? Math.floor(Math.min(size, ORACLE_BYTES) / 512) * 512 : 0;
    const kept = Buffer.alloc(window);
    let windowErrors = 0;
    for (let off = 0; off < Math.max(window, Math.min(size, 1 << 20)); off += 64 << 10)
      ranges.push([off, Math.min(64 << 10, size - off)]);
    const rand = seededRandom(seed ^ 0x5eed);
    for (let i = 0; i < 8 && size > 0; i++) {
      const off = Math.floor(rand() * size);
      ranges.push([off, Math.min(size - off, 1 + Math.floor(rand() * (128 << 10)))]);
    }
    const buf = Buffer.alloc(128 << 10);
    compared.clear();
    for (const [off, len] of ranges) {
      r.reads++;
      // Before the read too: a refused cluster marks the node corrupt, which then maps nothing.
      r.violation = await compareInflate(img.node, off, len, r);
      if (r.violation) return r;
      try {
        await img.node.read(off, buf.subarray(0, len));
        if (off < window) buf.copy(kept, off, 0, Math.min(len, window - off));
        r.violation = await compareInflate(img.node, off, len, r);
        if (r.violation) return r;
      } catch (e) {
        r.readErrors++;
        if (off < window) windowErrors++;
        const v = violationOf(e, `read ${off}+${len}`, false);
        if (v) {
          r.violation = v;
          return r;
        }
        if (isBlkError(e) && !r.codes.includes(e.code)) r.codes.push(e.code);
      }
    }
    if (oracle && !writes) {
      r.oracle = window === 0 ? 'empty' : windowErrors > 0 ? 'blk-read-error' : 'compared';
      if (r.oracle === 'compared') r.window = kept;
    }
    if (writes && size > 0) {
      const v = await writeAndReadBack(img.node, size, seed, r, readBack);
      if (v) {
        r.violation = v;
        return r;
      }
    }
    try {
      await img.node.blockStatus(0, Math.min(size, 1 << 20));
      img.node.imageInfo?.();
    } catch (e) {
      const v = violationOf(e, 'blockStatus/imageInfo', false);
      if (v) r.violation = v;
    }
  } finally {
    try {
      await img.close();
    } catch (e) {
      r.violation ??= violationOf(e, 'close', false);
    }
  }
  return r;
}

/** Seeded writes, zeroes and discards; a write that succeeded must read back (unless a later op failed). */
async function writeAndReadBack(
  node: Awaited<ReturnType<typeof openImage>>['node'],
  size: number,
  seed: number,
  r: CheckResult,
  readBack: boolean,
): Promise<string | undefined> {
  const rand = seededRandom(seed ^ 0x3717e);
  const ops: { off: number; data: Buffer | undefined }[] = [];
  for (let i = 0; i < 4; i++) {
    const off = Math.floor(rand() * Math.min(size, 4 << 20));
    const len = Math.min(size - off, 1 + Math.floor(rand() * (96 << 10)));
    const kind = Math.floor(rand() * 4);
    const data = kind <= 1 ? Buffer.alloc(len, 0x11 + i) : kind === 2 ? Buffer.alloc(len) : undefined;
    try {
      if (kind <= 1) await node.write(off, data!);
      else if (kind === 2) await node.writeZeroes(off, len, { mayUnmap: rand() < 0.5 });
      else await node.discard(off, len);
      ops.push({ off, data });
    } catch (e) {
      const v = violationOf(e, `${['write', 'write', 'writeZeroes', 'discard'][kind]} ${off}+${len}`, false);
      if (v) return v;
      if (isBlkError(e) && !r.codes.includes(e.code)) r.codes.push(e.code);
      return undefined; // a failing image may refuse everything after: no read-back claims
    }
  }
  try {
    await node.flush();
  } catch (e) {
    return violationOf(e, 'flush', false);
  }
  if (!readBack) return undefined;
  // Later ops may overwrite earlier ones: check each byte against the last op that covered it.
  for (let i = 0; i < ops.length; i++) {
    const { off, data } = ops[i]!;
    if (!data) continue;
    const got = Buffer.alloc(data.length);
    try {
      await node.read(off, got);
    } catch (e) {
      return violationOf(e, `read back ${off}+${data.length}`, false) ?? undefined;
    }
    // A later discard may leave anything; bytes a later write or zeroing covered are checked there.
    const later = ops.slice(i + 1);
    if (later.some((o) => !o.data)) continue;
    const mine = Buffer.alloc(data.length, 1);
    for (const o of later) {
      const from = Math.max(o.off, off) - off;
      const to = Math.min(o.off + o.data!.length, off + data.length) - off;
      if (from < to) mine.fill(0, from, to);
    }
    for (let b = 0; b < data.length; b++) {
      if (mine[b] === 0) continue;
      if (got[b] !== data[b]) return `byte ${off + b} reads ${got[b]} after writing ${data[b]}`;
      r.readBackBytes++;
    }
  }
  return undefined;
}
