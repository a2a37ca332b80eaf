/**
 * Option haggling (fixed newstyle): from the greeting to the transmission
 * phase. Every option gets an answer; a malformed one gets
 * NBD_REP_ERR_INVALID and the connection stays usable. Only protocol
 * violations that leave the byte stream unreadable (a bad magic, unknown
 * client flags, a failed EXPORT_NAME, a failed TLS handshake) end it.
 */
import type { Socket } from 'node:net';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  INFO_DESCRIPTION,
  INFO_NAME,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  OPTION_HEADER_SIZE,
  REP_ACK,
  REP_ERR_INVALID,
  REP_ERR_POLICY,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_TOO_BIG,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
} from './constants.js';
import { transmissionFlags } from './flags.js';
import { blockSizes } from './limits.js';
import { CONTEXTS, isQuerySyntaxValid, selectContexts } from './meta.js';
import {
  decodeString,
  infoBlockSize,
  infoExport,
  infoString,
  parseInfoRequest,
  parseMetaContextRequest,
  repMetaContext,
  repServer,
} from './options.js';
import { startServerTls } from './tls.js';
import type { Transport } from './transport.js';
import type { NbdExportEntry, ServerContext } from './types.js';
import { decodeOptionHeader, encodeExportNameReply, encodeGreeting, encodeOptionReply } from './wire.js';

/** Option data the server reads into memory; longer data is skipped and refused. */
export const MAX_OPTION_DATA = 64 * 1024;
/** Longer option data than this is not even skipped: the connection ends. */
const MAX_SKIPPED_OPTION_DATA = 16 * 1024 * 1024;

/** What the handshake agreed on. */
export interface Negotiated {
  entry: NbdExportEntry;
  structured: boolean;
  /** Selected metadata contexts (name → id) for this export. */
  contexts: Map<string, number>;
  tls: boolean;
}

/** Where an export lives: an exact name, or the only export for the empty (default) name. */
export function findExport(ctx: ServerContext, name: string): NbdExportEntry | undefined {
  const e = ctx.find(name);
  if (e || name !== '') return e;
  const all = ctx.list();
  return all.length === 1 ? all[0] : undefined;
}

/** Counts a connection on an export unless the export is full. */
function admit(entry: NbdExportEntry): boolean {
  if (entry.connections >= entry.maxConnections) return false;
  entry.connections++;
  return true;
}

/** Whether the node can discard (a TRIM that does nothing is not advertised). */
function canTrim(entry: NbdExportEntry): boolean {
  return entry.writable && entry.node.capabilities().discard;
}

/** The state option haggling builds up. */
interface Haggle {
  t: Transport;
  ctx: ServerContext;
  raw: Socket;
  noZeroes: boolean;
  structured: boolean;
  tls: boolean;
  meta: { exportName: string; contexts: Map<string, number> } | undefined;
}

/** What one option leads to: the next option, the transmission phase, or the end of the connection. */
type Outcome = 'next' | 'end' | Negotiated;

/** Sends option replies for one option. */
interface Replier {
  reply(type: number, data?: Buffer): void;
  error(type: number, message: string): void;
}

function repliesFor(t: Transport, option: number): Replier {
  const reply = (type: number, data?: Buffer) => t.write(encodeOptionReply(option, type, data));
  return { reply, error: (type, message) => reply(type, Buffer.from(message, 'utf8')) };
}

/** The contexts SET_META_CONTEXT chose, if it named the export the client went to. */
function contextsFor(h: Haggle, entry: NbdExportEntry): Map<string, number> {
  return h.meta && findExport(h.ctx, h.meta.exportName) === entry ? h.meta.contexts : new Map();
}

async function optStartTls(h: Haggle, data: Buffer, r: Replier): Promise<Outcome> {
  if (!h.ctx.tls) r.error(REP_ERR_POLICY, 'TLS is not configured on this server');
  else if (h.tls) r.error(REP_ERR_INVALID, 'TLS is already running');
  else if (data.length) r.error(REP_ERR_INVALID, 'STARTTLS takes no data');
  else {
    r.reply(REP_ACK);
    await h.t.flushed();
    if (h.t.stream.readableLength > 0) {
      h.t.close(true); // bytes sent before the TLS handshake: not a client that follows the protocol
      return 'end';
    }
    h.t.reader.detach();
    try {
      h.t.upgrade(await startServerTls(h.raw, h.ctx.tls));
    } catch {
      h.raw.destroy();
      return 'end';
    }
    h.tls = true;
    h.structured = false; // the protocol: nothing negotiated before STARTTLS survives it
    h.meta = undefined;
  }
  return 'next';
}

async function optList(h: Haggle, data: Buffer, r: Replier): Promise<Outcome> {
  if (data.length) r.error(REP_ERR_INVALID, 'LIST takes no data');
  else {
    for (const e of h.ctx.list()) r.reply(REP_SERVER, repServer(e.name, e.description));
    r.reply(REP_ACK);
  }
  return 'next';
}

async function optStructuredReply(h: Haggle, data: Buffer, r: Replier): Promise<Outcome> {
  if (data.length) r.error(REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
  else {
    h.structured = true;
    r.reply(REP_ACK);
  }
  return 'next';
}

function metaContext(set: boolean) {
  return async (h: Haggle, data: Buffer, r: Replier): Promise<Outcome> => {
    if (set) h.meta = undefined; // a SET replaces the selection even when it fails
    if (!h.structured) {
      r.error(REP_ERR_INVALID, 'negotiate structured replies first');
      return 'next';
    }
    const p = parseMetaContextRequest(data);
    if (!p.ok) r.error(REP_ERR_INVALID, p.invalid);
    else if (!p.value.queries.every(isQuerySyntaxValid)) {
      r.error(REP_ERR_INVALID, 'a query must start with a namespace and a colon');
    } else if (!findExport(h.ctx, p.value.name)) {
      r.error(REP_ERR_UNKNOWN, `no export named '${p.value.name}'`);
    } else {
      const chosen = new Map<string, number>();
      for (const n of selectContexts(p.value.queries, set ? 'set' : 'list')) {
        const id = set ? CONTEXTS.get(n)! : 0;
        chosen.set(n, id);
        r.reply(REP_META_CONTEXT, repMetaContext(id, n));
      }
      if (set) h.meta = { exportName: p.value.name, contexts: chosen };
      r.reply(REP_ACK);
    }
    return 'next';
  };
}

function infoOrGo(go: boolean) {
  return async (h: Haggle, data: Buffer, r: Replier): Promise<Outcome> => {
    const p = parseInfoRequest(data);
    if (!p.ok) {
      r.error(REP_ERR_INVALID, p.invalid);
      return 'next';
    }
    const entry = findExport(h.ctx, p.value.name);
    if (!entry) {
      r.error(REP_ERR_UNKNOWN, `no export named '${p.value.name}'`);
      return 'next';
    }
    if (go && !admit(entry)) {
      r.error(
        REP_ERR_POLICY,
        `export '${entry.name}' has its maximum of ${entry.maxConnections} connections`,
      );
      return 'next';
    }
    const flags = transmissionFlags({
      writable: entry.writable,
      canTrim: canTrim(entry),
      structured: h.structured,
    });
    r.reply(REP_INFO, infoExport(entry.node.length(), flags));
    if (p.value.infos.includes(INFO_NAME)) r.reply(REP_INFO, infoString(INFO_NAME, entry.name));
    if (p.value.infos.includes(INFO_DESCRIPTION) && entry.description !== undefined) {
      r.reply(REP_INFO, infoString(INFO_DESCRIPTION, entry.description));
    }
    const sizes = blockSizes(entry.node.imageInfo?.().clusterSize, h.ctx.limits.maxPayload);
    r.reply(REP_INFO, infoBlockSize(sizes.minimum, sizes.preferred, sizes.maximum));
    r.reply(REP_ACK);
    if (!go) return 'next';
    return { entry, structured: h.structured, contexts: contextsFor(h, entry), tls: h.tls };
  };
}

async function optExportName(h: Haggle, data: Buffer): Promise<Outcome> {
  const name = decodeString(data);
  const entry = name === undefined ? undefined : findExport(h.ctx, name);
  if (!entry || !admit(entry)) {
    h.t.close(true); // EXPORT_NAME cannot fail politely
    return 'end';
  }
  const flags = transmissionFlags({
    writable: entry.writable,
    canTrim: canTrim(entry),
    structured: h.structured,
  });
  h.t.write(encodeExportNameReply(entry.node.length(), flags, h.noZeroes));
  return { entry, structured: h.structured, contexts: contextsFor(h, entry), tls: h.tls };
}

const OPTIONS: ReadonlyMap<number, (h: Haggle, data: Buffer, r: Replier) => Promise<Outcome>> = new Map([
  [OPT_STARTTLS, optStartTls],
  [OPT_LIST, optList],
  [OPT_STRUCTURED_REPLY, optStructuredReply],
  [OPT_LIST_META_CONTEXT, metaContext(false)],
  [OPT_SET_META_CONTEXT, metaContext(true)],
  [OPT_INFO, infoOrGo(false)],
  [OPT_GO, infoOrGo(true)],
  [OPT_EXPORT_NAME, optExportName],
]);

/** Refusals that come before the option itself: TLS first, the server shutting down. */
function refusal(h: Haggle, option: number): { type: number; message: string } | undefined {
  if (h.ctx.tls && !h.tls && option !== OPT_STARTTLS) {
    return { type: REP_ERR_TLS_REQD, message: 'TLS is required: send NBD_OPT_STARTTLS first' };
  }
  if (h.ctx.shuttingDown) return { type: REP_ERR_SHUTDOWN, message: 'the server is shutting down' };
  return undefined;
}

/** Runs the handshake; resolves with the agreement, or undefined when the client left or was sent away. */
export async function negotiate(
  t: Transport,
  ctx: ServerContext,
  raw: Socket,
): Promise<Negotiated | undefined> {
  t.write(encodeGreeting());
  const clientFlags = (await t.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0) {
    t.close(true); // unknown client flags: the protocol says drop the connection
    return undefined;
  }
  const h: Haggle = {
    t,
    ctx,
    raw,
    noZeroes: (clientFlags & FLAG_C_NO_ZEROES) !== 0,
    structured: false,
    tls: false,
    meta: undefined,
  };
  for (;;) {
    const head = decodeOptionHeader(await h.t.read(OPTION_HEADER_SIZE));
    // Without the magic the stream is out of step; an EXPORT_NAME cannot be refused with a reply.
    const hangUp = () => {
      h.t.close(true);
      return undefined;
    };
    if (!head.magicOk) return hangUp();
    const r = repliesFor(h.t, head.option);
    if (head.length > MAX_OPTION_DATA) {
      if (head.length > MAX_SKIPPED_OPTION_DATA || head.option === OPT_EXPORT_NAME) return hangUp();
      await h.t.reader.skip(head.length);
      r.error(REP_ERR_TOO_BIG, `option data of ${head.length} bytes is too large`);
      continue;
    }
    const data = head.length ? await h.t.read(head.length) : Buffer.alloc(0);
    if (head.option === OPT_ABORT) {
      r.reply(REP_ACK);
      h.t.close();
      return undefined;
    }
    const refused = refusal(h, head.option);
    if (refused) {
      if (head.option === OPT_EXPORT_NAME) return hangUp();
      r.error(refused.type, refused.message);
      continue;
    }
    const handler = OPTIONS.get(head.option);
    if (!handler) {
      r.error(REP_ERR_UNSUP, `option ${head.option} is not supported`);
      continue;
    }
    const out = await handler(h, data, r);
    if (out === 'end') return undefined;
    if (out !== 'next') return out;
  }
}
