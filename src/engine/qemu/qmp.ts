/**
 * A small QMP client (QEMU Machine Protocol over a Unix socket): reads the
 * greeting, negotiates capabilities, runs commands with ids, and delivers
 * events. No npm package for QMP is maintained, and the protocol is one JSON
 * object per line, so it is ours.
 */
import { EventEmitter } from 'node:events';
import { createConnection, type Socket } from 'node:net';
import { BlkError, type BlkErrorCode } from '../../errors.js';

/** One asynchronous event QEMU sent (BLOCK_EXPORT_DELETED, JOB_STATUS_CHANGE, ...). */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** QEMU's version from the greeting. */
export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
  package: string;
}

/** A command QEMU refused: its error class and description, mapped to a BlkError code. */
export class QmpError extends BlkError {
  readonly qmpClass: string;
  readonly command: string;

  constructor(command: string, qmpClass: string, desc: string) {
    super(codeForQmpError(qmpClass, desc), `${command}: ${desc}`);
    this.qmpClass = qmpClass;
    this.command = command;
  }
}

/** The BlkError code for a QMP error, from its class and the description QEMU gives. */
export function codeForQmpError(qmpClass: string, desc: string): BlkErrorCode {
  if (qmpClass === 'CommandNotFound') return 'NOT_SUPPORTED';
  if (/already is a FUSE export|Duplicate (node name|ID)|already exists|is already in use/i.test(desc))
    return 'EXPORT_EXISTS';
  if (/Failed to stat|is not a regular file|Failed to mount|fuse/i.test(desc)) return 'MOUNT_FAILED';
  if (/Failed to get .*lock|another process using the image/i.test(desc)) return 'LOCKED';
  if (/read-only|Read-only/.test(desc)) return 'READ_ONLY';
  if (/Could not open|No such file|Permission denied/.test(desc)) return 'IO';
  if (/Image is not in|Unsupported|not supported/i.test(desc)) return 'IMAGE_UNSUPPORTED';
  if (/corrupt|invalid|Invalid|Cluster size|L1 table|refcount table|snapshot table|header/i.test(desc))
    return 'IMAGE_INVALID';
  return 'AGENT';
}

interface Pending {
  command: string;
  resolve(v: unknown): void;
  reject(e: Error): void;
}

/** A QMP connection in command mode (capabilities negotiated). */
export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [Error | undefined] }> {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closedWith: Error | undefined;
  private closed = false;
  version: QmpVersion | undefined;

  private constructor(
    private readonly socket: Socket,
    readonly path: string,
  ) {
    super();
  }

  /** Connects to the QMP socket at `path`, reads the greeting and leaves capabilities negotiation done. */
  static async connect(path: string, timeoutMs = 5000): Promise<QmpClient> {
    const socket = createConnection({ path });
    const client = new QmpClient(socket, path);
    const greeting = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new BlkError('AGENT', `QMP ${path}: no greeting within ${timeoutMs} ms`));
      }, timeoutMs);
      client.onGreeting = (g) => {
        clearTimeout(timer);
        client.version = { ...g.QMP.version.qemu, package: g.QMP.version.package };
        resolve();
      };
      socket.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new BlkError('AGENT', `QMP ${path}: ${e.code ?? e.message}`, {}, { cause: e }));
      });
      socket.once('close', () => {
        clearTimeout(timer);
        reject(new BlkError('AGENT', `QMP ${path}: closed before the greeting`));
      });
    });
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => client.onData(chunk));
    socket.on('error', (e) => {
      client.closedWith ??= e;
    });
    socket.on('close', () => client.onClose());
    await greeting;
    await client.execute('qmp_capabilities');
    return client;
  }

  private onGreeting: ((g: { QMP: { version: { qemu: QmpVersion; package: string } } }) => void) | undefined;

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let nl = this.buffer.indexOf('\n'); nl >= 0; nl = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.socket.destroy(new BlkError('AGENT', `QMP ${this.path}: not JSON: ${line.slice(0, 200)}`));
      return;
    }
    if ('QMP' in msg) {
      this.onGreeting?.(msg as never);
      this.onGreeting = undefined;
      return;
    }
    if ('event' in msg) {
      this.emit('event', { data: {}, ...(msg as object) } as QmpEvent);
      return;
    }
    const id = msg.id === undefined ? undefined : String(msg.id);
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) return; // an answer to nothing we asked: ignore it
    this.pending.delete(id);
    if ('error' in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, err.class ?? 'GenericError', err.desc ?? 'unknown error'));
    } else p.resolve(msg.return);
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    const why = new BlkError(
      'AGENT',
      `QMP ${this.path}: connection closed${this.closedWith ? ` (${this.closedWith.message})` : ''}`,
    );
    for (const p of this.pending.values()) p.reject(why);
    this.pending.clear();
    this.emit('close', this.closedWith);
  }

  /** True until the connection closes (QEMU exited, or close() was called). */
  get isOpen(): boolean {
    return !this.closed;
  }

  /** Longest wait for an answer: a daemon that hangs must not hang the agent's passes. */
  timeoutMs = 30_000;

  /** Runs one command; resolves with its `return`, rejects with a QmpError (or AGENT when the connection drops or times out). */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(new BlkError('AGENT', `QMP ${this.path}: connection closed`));
    const id = `blk-${this.nextId++}`;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (!this.pending.delete(id)) return;
        reject(
          new BlkError('AGENT', `${command}: no answer from QMP ${this.path} within ${this.timeoutMs} ms`),
        );
      }, this.timeoutMs);
      timer.unref();
      const done =
        <A extends unknown[]>(f: (...a: A) => void) =>
        (...a: A) => {
          clearTimeout(timer);
          f(...a);
        };
      this.pending.set(id, { command, resolve: done(resolve as (v: unknown) => void), reject: done(reject) });
      this.socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /**
   * Runs `command` and waits for the first event `name` whose data `match`es,
   * listening before the command is sent (QEMU may send the event before the return).
   */
  async executeAndWait<T = unknown>(
    command: string,
    args: Record<string, unknown> | undefined,
    name: string,
    match: (data: Record<string, unknown>) => boolean,
    timeoutMs = 10_000,
  ): Promise<T> {
    let onEvent: ((e: QmpEvent) => void) | undefined;
    let onClose: (() => void) | undefined;
    let timer: NodeJS.Timeout | undefined;
    const seen = new Promise<void>((resolve, reject) => {
      onEvent = (e) => {
        if (e.event === name && match(e.data)) resolve();
      };
      onClose = () => reject(new BlkError('AGENT', `QMP ${this.path}: closed waiting for ${name}`));
      this.on('event', onEvent);
      this.once('close', onClose);
      timer = setTimeout(
        () => reject(new BlkError('AGENT', `${command}: no ${name} within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    seen.catch(() => undefined);
    try {
      const r = await this.execute<T>(command, args);
      await seen;
      return r;
    } finally {
      clearTimeout(timer);
      if (onEvent) this.off('event', onEvent);
      if (onClose) this.off('close', onClose);
    }
  }

  /** Closes the connection (QEMU keeps running). */
  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}
