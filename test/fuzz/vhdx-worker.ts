/**
 * Checks fuzzed vhdx images named on stdin (one path a line, `<TAB>full` to
 * read it whole), one at a time,
 * printing one JSON line per image: `start` before it, the result after it,
 * so the parent can name the image a hang or crash happened on. Each image
 * must be refused with a coded BlkError naming the file, or served with every
 * read either the bytes or a coded BlkError. A fully served image of at most
 * 64 MiB also reports the SHA-256 of its bytes for the QEMU oracle.
 */
import { createHash } from 'node:crypto';
import { dirname } from 'node:path';
import { createInterface } from 'node:readline';
import { openImage } from '../../src/block/index.js';
import { isBlkError } from '../../src/errors.js';
import { seededRandom } from '../helpers/tools.js';

function bad(e: unknown, needFile: boolean): string | undefined {
  if (!isBlkError(e)) return `non-BlkError: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`;
  if (!e.code) return `BlkError without a code: ${e.message}`;
  if (needFile && e.place.file === undefined) return `error does not name the file: ${e.code} ${e.message}`;
  return undefined;
}

async function check(path: string, seed: number, full: boolean): Promise<Record<string, unknown>> {
  let img: Awaited<ReturnType<typeof openImage>>;
  try {
    img = await openImage({ filename: path, readOnly: true, allowedRoots: [dirname(path)] });
  } catch (e) {
    const v = bad(e, true);
    return v ? { violation: `open: ${v}` } : { outcome: 'refused', code: (e as { code: string }).code };
  }
  try {
    const size = img.node.length();
    const hash = full && size <= 64 * 1024 * 1024 ? createHash('sha256') : undefined;
    let errors = 0;
    const codes = new Set<string>();
    const read = async (off: number, len: number): Promise<Buffer | undefined> => {
      const b = Buffer.alloc(len);
      try {
        await img.node.read(off, b);
        return b;
      } catch (e) {
        const v = bad(e, false);
        if (v) throw new Error(`read ${off}+${len}: ${v}`);
        errors++;
        codes.add((e as { code: string }).code);
        return undefined;
      }
    };
    // The whole disk when asked (for the oracle), else its first 2 MiB; then random ranges anywhere.
    const whole = hash ? size : Math.min(size, 2 * 1024 * 1024);
    for (let off = 0; off < whole; off += 1024 * 1024) {
      const b = await read(off, Math.min(1024 * 1024, whole - off));
      if (b) hash?.update(b);
    }
    const rand = seededRandom(seed);
    for (let i = 0; i < 24 && size > 0; i++) {
      const off = Math.floor(rand() * size);
      await read(off, Math.min(size - off, 1 + Math.floor(rand() * 300 * 1024)));
      img.node.mapHostCached?.(off, Math.min(size - off, 65536));
    }
    return {
      outcome: 'served',
      size,
      errors,
      codes: [...codes],
      sha256: hash && errors === 0 ? hash.digest('hex') : undefined,
    };
  } catch (e) {
    return { violation: (e as Error).message };
  } finally {
    await img.close().catch(() => undefined);
  }
}

let peak = 0;
let n = 0;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line) continue;
  const [path, mode] = line.split('\t') as [string, string | undefined];
  console.log(JSON.stringify({ start: path }));
  const t0 = Date.now();
  const r = await check(path, n++, mode === 'full');
  peak = Math.max(peak, process.memoryUsage().rss);
  console.log(JSON.stringify({ path, ms: Date.now() - t0, rss: peak, ...r }));
}
