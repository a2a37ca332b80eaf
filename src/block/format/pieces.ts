/**
 * The read path shared by the read-only format drivers (vpc, vdi, qed): a
 * driver answers where the guest bytes at an offset live, one piece at a
 * time (host bytes in the image file, zeroes, or the backing node), and this
 * module reads, maps for the FUSE fast path and reports block status from
 * those pieces. A driver checks every host range against the image file
 * before it hands it out; `hostRange` repeats that check here, once, so no
 * piece can reach past the file whatever the driver got wrong.
 */
import { BlkError, Errno } from '../../errors.js';
import type { ReopenOptions } from '../driver.js';
import type { BlockCapabilities, BlockExtent, BlockNode, HostExtent } from '../types.js';

/** Where guest bytes live: at `host` in the image file, nowhere (zeroes), or in the backing node. */
export type Piece =
  | { length: number; host: number }
  | { length: number; zero: true }
  | { length: number; backing: true };

/** What a read-only format driver provides to the shared read path. */
export interface PieceSource {
  /** The image file (protocol node). */
  readonly file: BlockNode;
  readonly path: string;
  /** The backing node, or null (then backing pieces read as zeroes). */
  backing: BlockNode | null;
  /** The piece at guest `offset`, at most `length` bytes long (and at least one byte). */
  locate(offset: number, length: number): Piece | Promise<Piece>;
  /** Like locate, from what is already in memory only; null when that is not enough. */
  locateCached(offset: number, length: number): Piece | null;
}

/** Throws IMAGE_CORRUPT unless [host, host+length) lies inside the image file. */
export function hostRange(src: PieceSource, host: number, length: number, field: string): void {
  if (!Number.isSafeInteger(host) || host < 0 || host + length > src.file.length()) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `data at host offset ${host} (+${length}) lies past the end of the image file (${src.file.length()} bytes)`,
      { file: src.path, field },
    );
  }
}

/** Reads the backing node's bytes at [offset, offset+buf.length); zeroes past its end. */
async function readBacking(backing: BlockNode | null, offset: number, buf: Buffer): Promise<void> {
  const avail = backing === null ? 0 : Math.max(0, Math.min(buf.length, backing.length() - offset));
  if (avail > 0) await backing!.read(offset, buf.subarray(0, avail));
  buf.fill(0, avail);
}

/** Fills `buf` with guest bytes from `offset`. */
export async function readPieces(src: PieceSource, offset: number, buf: Buffer): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const pos = offset + done;
    const want = buf.length - done;
    const p = await src.locate(pos, want);
    const n = Math.min(p.length, want);
    if (n <= 0) throw new BlkError('INTERNAL', `empty piece at ${pos}`, { file: src.path });
    const part = buf.subarray(done, done + n);
    if ('host' in p) {
      hostRange(src, p.host, n, 'data');
      await src.file.read(p.host, part);
    } else if ('zero' in p) {
      part.fill(0);
    } else {
      await readBacking(src.backing, pos, part);
    }
    done += n;
  }
}

/** Appends host extents, merging neighbours of one kind; false when `more` is null. */
function append(out: HostExtent[], more: HostExtent[] | null | undefined): boolean {
  if (!more) return false;
  for (const y of more) {
    // Read-only drivers: nothing they map may be written in place.
    const x: HostExtent = 'fd' in y ? { length: y.length, fd: y.fd, host: y.host } : y;
    const last = out[out.length - 1];
    if (last && 'zero' in last && 'zero' in x) last.length += x.length;
    else if (last && 'fd' in last && 'fd' in x && last.fd === x.fd && last.host + last.length === x.host)
      last.length += x.length;
    else out.push({ ...x });
  }
  return true;
}

/** Host extents of guest [offset, offset+length) from memory only (FUSE fast path); null when unknown. */
export function mapPieces(src: PieceSource, offset: number, length: number): HostExtent[] | null {
  const out: HostExtent[] = [];
  let done = 0;
  try {
    while (done < length) {
      const pos = offset + done;
      const p = src.locateCached(pos, length - done);
      if (p === null) return null;
      const n = Math.min(p.length, length - done);
      if (n <= 0) return null;
      if ('host' in p) {
        hostRange(src, p.host, n, 'data');
        if (!append(out, src.file.mapHostCached?.(p.host, n))) return null;
      } else if ('zero' in p || src.backing === null) {
        append(out, [{ length: n, zero: true }]);
      } else {
        const b = src.backing;
        const avail = Math.max(0, Math.min(n, b.length() - pos));
        if (avail > 0 && !append(out, b.mapHostCached?.(pos, avail))) return null;
        if (avail < n) append(out, [{ length: n - avail, zero: true }]);
      }
      done += n;
    }
  } catch {
    // A bad entry: the read that reaches it reports it.
    return null;
  }
  return out;
}

/** Allocation status of the piece at `offset` (at most `length` bytes). */
export async function statusPieces(src: PieceSource, offset: number, length: number): Promise<BlockExtent> {
  const p = await src.locate(offset, length);
  const n = Math.min(p.length, length);
  if ('host' in p) return { offset, length: n, data: true, zero: false };
  if ('zero' in p || src.backing === null || offset >= src.backing.length()) {
    return { offset, length: n, data: false, zero: true };
  }
  const b = await src.backing.blockStatus(offset, Math.min(n, src.backing.length() - offset));
  return { offset, length: b.length, data: b.data, zero: b.zero };
}

/** Reads `length` bytes at `offset` of a node into a new buffer. */
export async function readAt(node: BlockNode, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await node.read(offset, b);
  return b;
}

/** The refusal of a writable open (or a reopen read-write) of a read-only format. */
export function readOnlyFormat(format: string, path: string): BlkError {
  return new BlkError(
    'NOT_SUPPORTED',
    `the native ${format} driver reads only: open the image read-only (or use the qemu engine to write it)`,
    { file: path },
    { errno: Errno.EROFS },
  );
}

const NO_WRITES: BlockCapabilities = { write: false, truncate: false, writeZeroes: false, discard: false };

/** The driver members every read-only format shares (spread into its driver object). */
export function readOnlyFormatOps<S extends PieceSource>(format: string) {
  return {
    role: 'format' as const,
    // A reopen read-only is a no-op; read-write is refused (listing it keeps `driver: auto` nodes reopenable).
    mutableOptions: ['read-only'],
    children: (s: S) => (s.backing ? [s.file, s.backing] : [s.file]),
    async reopenPrepare(s: S, opts: ReopenOptions) {
      if (opts.readOnly === false) throw readOnlyFormat(format, s.path);
    },
    read: (s: S, offset: number, buf: Buffer) => readPieces(s, offset, buf),
    mapHostCached: (s: S, offset: number, length: number) => mapPieces(s, offset, length),
    blockStatus: (s: S, offset: number, length: number) => statusPieces(s, offset, length),
    allocatedSize: (s: S) => s.file.allocatedSize(),
    capabilities: () => NO_WRITES,
    isReadOnly: () => true,
    describe: (s: S) => ({ filename: s.file.filename, fileKey: s.file.fileKey }),
  };
}
