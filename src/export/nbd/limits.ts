/**
 * Size constraints and request checks (pure): what the server advertises in
 * NBD_INFO_BLOCK_SIZE, and whether a request may run, decided before any
 * buffer is allocated for it.
 */
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
  NBD_ENOSPC,
  NBD_EOVERFLOW,
  NBD_EPERM,
} from './constants.js';

/** The largest payload the protocol says no client should consider hostile: 32 MiB. */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

const isPow2 = (n: number) => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;

/**
 * NBD_INFO_BLOCK_SIZE for a node: minimum 1 (the block layer does any byte
 * range), preferred the cluster size (at least 512, a power of two, at most
 * the maximum), maximum the configured request size limit.
 */
export function blockSizes(clusterSize: number | undefined, maxPayload: number): BlockSizes {
  let preferred = clusterSize && isPow2(clusterSize) ? Math.max(512, clusterSize) : 4096;
  if (preferred > maxPayload) preferred = 512;
  return { minimum: 1, preferred, maximum: maxPayload };
}

/** What a request may use, as negotiated for this connection. */
export interface RequestContext {
  size: number;
  writable: boolean;
  maxPayload: number;
  structured: boolean;
  /** Number of metadata contexts selected for this export. */
  contexts: number;
  canTrim: boolean;
  canZero: boolean;
}

/** Command flags each command accepts (FUA is accepted everywhere, as the protocol asks). */
const ALLOWED_FLAGS: Record<number, number> = {
  [CMD_READ]: CMD_FLAG_FUA | CMD_FLAG_DF,
  [CMD_WRITE]: CMD_FLAG_FUA,
  [CMD_DISC]: CMD_FLAG_FUA,
  [CMD_FLUSH]: CMD_FLAG_FUA,
  [CMD_TRIM]: CMD_FLAG_FUA,
  [CMD_CACHE]: CMD_FLAG_FUA,
  [CMD_WRITE_ZEROES]: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
  [CMD_BLOCK_STATUS]: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
};

/** The verdict on one request: run it, or answer with an NBD error (and why, for the error chunk). */
export type Verdict = { ok: true; offset: number } | { ok: false; error: number; message: string };

type Failure = { ok: false; error: number; message: string };
const fail = (error: number, message: string): Failure => ({ ok: false, error, message });

/** The command, its flags and what the export allows, without the range. */
function checkCommand(req: { type: number; flags: number }, c: RequestContext): Failure | undefined {
  const allowed = ALLOWED_FLAGS[req.type];
  if (allowed === undefined) return fail(NBD_EINVAL, `unknown command ${req.type}`);
  if ((req.flags & ~allowed) !== 0)
    return fail(NBD_EINVAL, `flags 0x${req.flags.toString(16)} not valid here`);
  if (req.flags & CMD_FLAG_DF && !c.structured) return fail(NBD_EINVAL, 'DF without structured replies');
  const writes = req.type === CMD_WRITE || req.type === CMD_WRITE_ZEROES || req.type === CMD_TRIM;
  if (writes && !c.writable) return fail(NBD_EPERM, 'the export is read-only');
  if (req.type === CMD_TRIM && !c.canTrim) return fail(NBD_EINVAL, 'trim is not supported');
  if (req.type === CMD_WRITE_ZEROES && !c.canZero) return fail(NBD_EINVAL, 'write zeroes is not supported');
  if (req.type === CMD_BLOCK_STATUS && (!c.structured || c.contexts === 0)) {
    return fail(NBD_EINVAL, 'no metadata context was selected');
  }
  return undefined;
}

/** Checks a request against the negotiated state; never throws. */
export function checkRequest(
  req: { type: number; flags: number; offset: bigint; length: number },
  c: RequestContext,
): Verdict {
  const refused = checkCommand(req, c);
  if (refused) return refused;
  if ((req.type === CMD_READ || req.type === CMD_WRITE) && req.length > c.maxPayload) {
    return fail(NBD_EOVERFLOW, `request of ${req.length} bytes exceeds the maximum payload ${c.maxPayload}`);
  }
  if (req.type === CMD_FLUSH || req.type === CMD_DISC) {
    return req.offset === 0n && req.length === 0
      ? { ok: true, offset: 0 }
      : fail(NBD_EINVAL, 'offset and length must be zero');
  }
  if (req.offset + BigInt(req.length) > BigInt(c.size)) {
    const past = `range ${req.offset}+${req.length} runs past the end of the export (${c.size} bytes)`;
    return fail(req.type === CMD_WRITE || req.type === CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL, past);
  }
  return { ok: true, offset: Number(req.offset) };
}
