/**
 * The transmission phase: requests in, replies out. Each request is checked
 * (limits.ts) before any buffer is allocated for it; up to maxInFlight run
 * at once; the next header is read only while the client takes its replies
 * (a slow reader holds back its own requests, not our memory). A write is
 * answered once the block layer has it in the image file; with FUA, once
 * it is flushed too.
 */
import { performance } from 'node:perf_hooks';
import type { BlockNode } from '../../block/types.js';
import { Errno } from '../../errors.js';
import type { ExportStats } from '../driver.js';
import {
  CMD_BLOCK_STATUS,
  CMD_CACHE,
  CMD_DISC,
  CMD_FLAG_DF,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_REQ_ONE,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  REQUEST_HEADER_SIZE,
  STATE_ZERO,
} from './constants.js';
import { zeroIsFast } from './flags.js';
import type { Negotiated } from './handshake.js';
import { checkRequest, type RequestContext } from './limits.js';
import { collectAllocation, collectExtents, descriptorsFor } from './meta.js';
import { returnReadBuffer, takeReadBuffer } from './read-buffers.js';
import { Closed, type Transport } from './transport.js';
import type { NbdLimits } from './types.js';
import {
  decodeRequest,
  encodeBlockStatusChunk,
  encodeDataChunkHeader,
  encodeErrorChunk,
  encodeHoleChunk,
  encodeNoneChunk,
  encodeSimpleReply,
  type Request,
} from './wire.js';

/** Descriptors per BLOCK_STATUS reply (the protocol asks for at most 2^20; qemu sends 2^17). */
const MAX_DESCRIPTORS = 1 << 16;
/** Zero runs shorter than this are sent as data: a hole chunk costs 32 bytes and a client round of work. */
const MIN_HOLE = 4096;

/** An error from the block layer as an NBD error value. */
export function nbdErrno(e: unknown): number {
  const errno = (e as { errno?: number }).errno;
  switch (errno) {
    case Errno.EPERM:
    case Errno.EACCES:
    case Errno.EROFS:
      return NBD_EPERM;
    case Errno.ENOSPC:
    case Errno.EFBIG:
      return NBD_ENOSPC;
    case Errno.EINVAL:
    case Errno.ENXIO:
      return NBD_EINVAL;
    case Errno.EOPNOTSUPP:
      return NBD_ENOTSUP;
    default:
      return NBD_EIO;
  }
}

/** One connection in transmission: what every request handler needs. */
interface Session {
  t: Transport;
  neg: Negotiated;
  node: BlockNode;
  stats: ExportStats;
}

function fail(s: Session, req: Request, error: number, message: string): void {
  s.stats.errors++;
  if (s.neg.structured) s.t.write(encodeErrorChunk(req.handle, error, message));
  else s.t.write(encodeSimpleReply(error, req.handle));
}

function ok(s: Session, req: Request): void {
  s.t.write(s.neg.structured ? encodeNoneChunk(req.handle) : encodeSimpleReply(0, req.handle));
}

/** FUA: the reply waits until what the command wrote is flushed. */
async function fua(s: Session, req: Request): Promise<void> {
  if (req.flags & CMD_FLAG_FUA) await s.node.flush();
}

type Handler = (s: Session, req: Request, offset: number, payload: Buffer | undefined) => Promise<void>;

const HANDLERS: ReadonlyMap<number, Handler> = new Map<number, Handler>([
  [CMD_READ, (s, req, offset) => read(s, req, offset)],
  [
    CMD_WRITE,
    async (s, req, offset, payload) => {
      const t0 = performance.now();
      await s.node.write(offset, payload!);
      await fua(s, req);
      s.stats.writes++;
      s.stats.writeBytes += req.length;
      s.stats.writeLatency.observe((performance.now() - t0) / 1000);
      ok(s, req);
    },
  ],
  [
    CMD_WRITE_ZEROES,
    async (s, req, offset) => {
      if (req.flags & CMD_FLAG_FAST_ZERO && !zeroIsFast(s.node)) {
        return fail(s, req, NBD_ENOTSUP, 'zeroing is not faster than writing here');
      }
      await s.node.writeZeroes(offset, req.length, { mayUnmap: (req.flags & CMD_FLAG_NO_HOLE) === 0 });
      await fua(s, req);
      s.stats.writes++;
      ok(s, req);
    },
  ],
  [
    CMD_TRIM,
    async (s, req, offset) => {
      await s.node.discard(offset, req.length);
      await fua(s, req);
      ok(s, req);
    },
  ],
  [
    CMD_FLUSH,
    async (s, req) => {
      await s.node.flush();
      s.stats.flushes++;
      ok(s, req);
    },
  ],
  [
    CMD_CACHE,
    async (s, req, offset) => {
      // Walking the allocation loads the image's mapping tables: the part worth warming.
      if (req.length > 0) await collectAllocation(s.node, offset, req.length, MAX_DESCRIPTORS);
      ok(s, req);
    },
  ],
  [
    CMD_BLOCK_STATUS,
    async (s, req, offset) => {
      if (req.length === 0) return fail(s, req, NBD_EINVAL, 'block status of zero bytes');
      const one = (req.flags & CMD_FLAG_REQ_ONE) !== 0;
      const extents = await collectExtents(s.node, offset, req.length, one ? 1 : MAX_DESCRIPTORS);
      const chosen = [...s.neg.contexts];
      s.t.write(
        ...chosen.map(([name, id], i) =>
          encodeBlockStatusChunk(
            req.handle,
            id,
            descriptorsFor(name, extents, req.length),
            i === chosen.length - 1,
          ),
        ),
      );
    },
  ],
]);

/** Runs one checked request; an error from the block layer becomes the request's error reply. */
async function runRequest(
  s: Session,
  req: Request,
  offset: number,
  payload: Buffer | undefined,
): Promise<void> {
  try {
    await HANDLERS.get(req.type)!(s, req, offset, payload);
  } catch (e) {
    fail(s, req, nbdErrno(e), (e as Error).message ?? 'I/O error');
  }
}

/** Serves requests until the client disconnects; never throws. */
export async function serveTransmission(t: Transport, neg: Negotiated, limits: NbdLimits): Promise<void> {
  const { entry } = neg;
  const s: Session = { t, neg, node: entry.node, stats: entry.stats };
  const rc = (): RequestContext => ({
    size: s.node.length(),
    writable: entry.writable,
    maxPayload: limits.maxPayload,
    structured: neg.structured,
    contexts: neg.contexts.size,
    canTrim: entry.writable && s.node.capabilities().discard,
    canZero: entry.writable,
  });
  const running = new InFlight(limits);
  try {
    for (;;) {
      await t.waitWritable();
      const req = decodeRequest(await t.read(REQUEST_HEADER_SIZE));
      if (!req.magicOk) break; // the stream is out of step: nothing after this can be trusted
      if (req.type === CMD_DISC) break;
      const v = checkRequest(req, rc());
      const held = v.ok && (req.type === CMD_READ || req.type === CMD_WRITE) ? req.length : 0;
      await running.room(held);
      const payload = req.type === CMD_WRITE ? await writePayload(t, req, v.ok) : undefined;
      if (v.ok) running.add(runRequest(s, req, v.offset, payload), held);
      else fail(s, req, v.error, v.message);
    }
  } catch (e) {
    if (!(e instanceof Closed)) t.close(true);
  }
  await running.settled();
  t.close();
}

/** The payload of a WRITE follows whatever the verdict; an unwanted one is read and dropped in slices. */
async function writePayload(t: Transport, req: Request, wanted: boolean): Promise<Buffer | undefined> {
  if (!wanted) {
    await t.reader.skip(req.length);
    return undefined;
  }
  return req.length ? t.read(req.length) : Buffer.alloc(0);
}

/**
 * The requests of one connection that run now: at most maxInFlight, and
 * their payloads at most maxPayload bytes together (a big request runs
 * alone, small ones side by side).
 */
class InFlight {
  private readonly set = new Set<Promise<void>>();
  private heldBytes = 0;

  constructor(private readonly limits: NbdLimits) {}

  /** Waits until a request holding `bytes` may start. */
  async room(bytes: number): Promise<void> {
    while (this.set.size >= this.limits.maxInFlight) await Promise.race(this.set);
    while (this.set.size > 0 && this.heldBytes + bytes > this.limits.maxPayload) await Promise.race(this.set);
  }

  add(run: Promise<void>, bytes: number): void {
    this.heldBytes += bytes;
    const p: Promise<void> = run.finally(() => {
      this.heldBytes -= bytes;
      this.set.delete(p);
    });
    this.set.add(p);
  }

  settled(): Promise<unknown> {
    return Promise.allSettled([...this.set]);
  }
}

/** READ: a simple reply, or structured chunks with holes where the node reads as zeroes. */
async function read(s: Session, req: Request, offset: number): Promise<void> {
  const { t, node, stats } = s;
  const structured = s.neg.structured;
  const t0 = performance.now();
  const len = req.length;
  if (!structured) {
    const buf = Buffer.allocUnsafe(len);
    await node.read(offset, buf);
    t.write(encodeSimpleReply(0, req.handle), buf);
  } else if (len === 0 || req.flags & CMD_FLAG_DF) {
    const buf = Buffer.allocUnsafe(len);
    await node.read(offset, buf);
    if (len === 0) t.write(encodeNoneChunk(req.handle));
    else t.write(encodeDataChunkHeader(req.handle, offset, len, true), buf);
  } else {
    const buf = takeReadBuffer(len);
    let pieces: Awaited<ReturnType<typeof readPieces>>;
    try {
      pieces = await readPieces(node, offset, buf);
    } catch (e) {
      returnReadBuffer(buf);
      throw e;
    }
    const out: Buffer[] = [];
    pieces.forEach((p, i) => {
      const done = i === pieces.length - 1;
      if (p.data) out.push(encodeDataChunkHeader(req.handle, p.offset, p.data.length, done), p.data);
      else out.push(encodeHoleChunk(req.handle, p.offset, p.length, done));
    });
    t.writeThen(() => returnReadBuffer(buf), ...out);
  }
  stats.reads++;
  stats.readBytes += len;
  stats.readLatency.observe((performance.now() - t0) / 1000);
}

/** The read into `buf` split into data pieces (views of buf) and zero runs (holes), as the node's allocation says. */
async function readPieces(
  node: BlockNode,
  offset: number,
  buf: Buffer,
): Promise<Array<{ offset: number; length: number; data?: Buffer }>> {
  const length = buf.length;
  const extents = await collectAllocation(node, offset, length, 256);
  const out: Array<{ offset: number; length: number; zero: boolean }> = [];
  let at = offset;
  for (const d of extents) {
    const zero = (d.flags & STATE_ZERO) !== 0 && d.length >= MIN_HOLE;
    const last = out[out.length - 1];
    if (last && last.zero === zero) last.length += d.length;
    else out.push({ offset: at, length: d.length, zero });
    at += d.length;
  }
  // The allocation may stop short (descriptor limit): the rest is data.
  if (at < offset + length) out.push({ offset: at, length: offset + length - at, zero: false });
  const pieces: Array<{ offset: number; length: number; data?: Buffer }> = [];
  for (const p of out) {
    if (p.zero) {
      pieces.push({ offset: p.offset, length: p.length });
      continue;
    }
    const view = buf.subarray(p.offset - offset, p.offset - offset + p.length);
    await node.read(p.offset, view);
    pieces.push({ offset: p.offset, length: p.length, data: view });
  }
  return pieces;
}
