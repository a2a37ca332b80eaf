/**
 * A raw NBD client for tests: a socket, exact reads, and the handful of
 * messages the hostile-client tests send by hand. Bounded by timeouts: a
 * read that never completes fails the test instead of hanging it.
 */
import { connect, type Socket } from 'node:net';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  OPT_GO,
  OPT_SET_META_CONTEXT,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
} from '../../src/export/nbd/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest } from '../../src/export/nbd/options.js';
import { encodeRequest } from '../../src/export/nbd/wire.js';

export class RawClient {
  private buf = Buffer.alloc(0);
  /** Bytes of buf already handed out. */
  private off = 0;
  /** Chunks received and not yet joined into buf (joining on every chunk would be quadratic). */
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private ended = false;
  private waiter: (() => void) | undefined;

  private constructor(readonly sock: Socket) {
    sock.on('data', (d: Buffer) => {
      this.pending.push(d);
      this.pendingBytes += d.length;
      this.wake();
    });
    sock.on('close', () => {
      this.ended = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  static open(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  /** Exactly n bytes, or an error when the server closes first or `ms` pass. */
  async read(n: number, ms = 5000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    for (;;) {
      if (this.buf.length - this.off < n && this.pendingBytes > 0) {
        this.buf = Buffer.concat([this.buf.subarray(this.off), ...this.pending]);
        this.off = 0;
        this.pending = [];
        this.pendingBytes = 0;
      }
      if (this.buf.length - this.off >= n) break;
      if (this.ended) throw new Error(`closed after ${this.buf.length - this.off} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    const out = Buffer.from(this.buf.subarray(this.off, this.off + n));
    this.off += n;
    return out;
  }

  /** Resolves true when the server closes the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.ended && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    return this.ended;
  }

  get isClosed(): boolean {
    return this.ended;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  /** Reads the greeting and answers with fixed newstyle + no zeroes. */
  async hello(): Promise<void> {
    await this.read(18);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0);
    this.write(f);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  /** One option reply: its option, type and data. */
  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return {
      option: h.readUInt32BE(8),
      type: h.readUInt32BE(12),
      data: len ? await this.read(len) : Buffer.alloc(0),
    };
  }

  /** Replies to one option up to and including the final one (ACK or an error). */
  async optionReplies(): Promise<Array<{ type: number; data: Buffer }>> {
    const out: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === REP_ACK || r.type >= 0x80000000) return out;
    }
  }

  /** Structured replies, base:allocation, then GO to `name`; returns the transmission flags and size. */
  async goStructured(name: string): Promise<{ size: bigint; flags: number }> {
    await this.hello();
    this.sendOption(OPT_STRUCTURED_REPLY);
    await this.optionReplies();
    this.sendOption(OPT_SET_META_CONTEXT, encodeMetaContextRequest(name, ['base:allocation']));
    await this.optionReplies();
    this.sendOption(OPT_GO, encodeInfoRequest(name, [INFO_BLOCK_SIZE]));
    const replies = await this.optionReplies();
    const last = replies[replies.length - 1]!;
    if (last.type !== REP_ACK) throw new Error(`GO refused: 0x${last.type.toString(16)} ${last.data}`);
    const info = replies.find((r) => r.data.readUInt16BE(0) === 0)!.data;
    return { size: info.readBigUInt64BE(2), flags: info.readUInt16BE(10) };
  }

  request(
    type: number,
    flags: number,
    handle: bigint,
    offset: bigint | number,
    length: number,
    payload?: Buffer,
  ): void {
    this.write(
      payload
        ? Buffer.concat([encodeRequest(type, flags, handle, offset, length), payload])
        : encodeRequest(type, flags, handle, offset, length),
    );
  }

  /** One structured chunk: flags, type, handle, payload. */
  async chunk(): Promise<{ flags: number; type: number; handle: bigint; payload: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      handle: h.readBigUInt64BE(8),
      payload: len ? await this.read(len) : Buffer.alloc(0),
    };
  }

  /** Chunks up to the one flagged DONE. */
  async reply(): Promise<Array<{ flags: number; type: number; handle: bigint; payload: Buffer }>> {
    const out = [];
    for (;;) {
      const c = await this.chunk();
      out.push(c);
      if (c.flags & 1) return out;
    }
  }

  destroy(): void {
    this.sock.destroy();
  }
}

/** A `blkexport nbd` child process, started and ready to serve. */
export interface NbdCommand {
  proc: import('node:child_process').ChildProcess;
  /** The line it printed once serving. */
  ready: string;
  /** The TCP port it listens on (first tcp: address), if any. */
  port: number | undefined;
  /** SIGTERM, then the exit status. */
  stop(): Promise<number | null>;
}

/**
 * Starts `blkexport nbd ARGS` and waits for its "serving" line (or its
 * failure). The process is killed when the test ends, also on failure.
 */
export async function startNbdCommand(
  t: { after(fn: () => void): void },
  bin: string,
  args: string[],
): Promise<NbdCommand> {
  const { spawn } = await import('node:child_process');
  const proc = spawn(bin, ['nbd', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  let out = '';
  let err = '';
  proc.stderr!.on('data', (d) => {
    err += d;
  });
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const ready = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`blkexport nbd not ready after 20 s: ${out}${err}`)),
      20_000,
    );
    proc.stdout!.on('data', (d) => {
      out += d;
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolve(out.split('\n')[0]!);
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`blkexport nbd exited ${code}: ${err}`));
    });
  });
  const m = /tcp:(?:\[[^\]]+\]|[^:,\s]+):([0-9]+)/.exec(ready);
  return {
    proc,
    ready,
    port: m ? Number(m[1]) : undefined,
    async stop() {
      if (proc.exitCode !== null) return proc.exitCode;
      proc.kill('SIGTERM');
      return exited;
    },
  };
}

/** Runs a command asynchronously (the caller may serve what it reads); rejects on non-zero status. */
export async function sh(cmd: string, args: string[], opts: { input?: Buffer } = {}): Promise<Buffer> {
  const { spawn } = await import('node:child_process');
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: [opts.input ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    const timer = setTimeout(() => p.kill('SIGKILL'), 60_000);
    p.stdout!.on('data', (d: Buffer) => out.push(d));
    p.stderr!.on('data', (d) => {
      err += d;
    });
    if (opts.input) p.stdin!.end(opts.input);
    p.on('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(Buffer.concat(out));
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`));
    });
  });
}
