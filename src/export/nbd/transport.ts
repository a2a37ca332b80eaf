/**
 * One client's byte stream: exact reads (reader.ts), writes that wait when
 * the client reads slowly, and the swap to TLS after NBD_OPT_STARTTLS.
 */
import type { Duplex } from 'node:stream';
import { Closed, ExactReader } from './reader.js';

/** Bytes queued for a client before the server stops taking its requests (see waitWritable). */
export const WRITE_HIGH_WATER = 8 * 1024 * 1024;

export class Transport {
  reader: ExactReader;
  private closedFlag = false;
  /** A cork on the stream is waiting for its setImmediate uncork (see write). */
  private corked = false;

  constructor(public stream: Duplex) {
    this.reader = new ExactReader(stream);
    stream.on('close', () => {
      this.closedFlag = true;
    });
  }

  get closed(): boolean {
    return this.closedFlag || this.stream.destroyed;
  }

  read(n: number): Promise<Buffer> {
    return this.reader.read(n);
  }

  /**
   * Queues the buffers back to back (a reply never interleaves with another's
   * bytes). The stream stays corked until the event loop's next check phase,
   * so the replies of every request that completes in one loop turn leave in
   * one writev instead of a system call per header and per payload.
   */
  write(...bufs: Buffer[]): void {
    if (this.closed) return;
    if (!this.corked) {
      this.corked = true;
      const stream = this.stream; // an upgrade to TLS must not leave the plain socket corked
      stream.cork();
      setImmediate(() => {
        this.corked = false;
        stream.uncork();
      });
    }
    for (const b of bufs) if (b.length) this.stream.write(b);
  }

  /**
   * write(), then `sent` once the kernel has the last buffer (or at once when
   * the connection is closed): until then the socket may still read them.
   */
  writeThen(sent: () => void, ...bufs: Buffer[]): void {
    const last = bufs.findLastIndex((b) => b.length > 0);
    if (this.closed || last < 0) {
      this.write(...bufs);
      sent();
      return;
    }
    this.write(...bufs.slice(0, last));
    this.stream.write(bufs[last]!, () => sent());
  }

  /** Resolves once the queued bytes are below `limit` (or the stream closed): backpressure. */
  async waitWritable(limit = WRITE_HIGH_WATER): Promise<void> {
    while (!this.closed && this.stream.writableLength > limit) {
      await new Promise<void>((resolve) => {
        const done = () => {
          this.stream.off('drain', done);
          this.stream.off('close', done);
          resolve();
        };
        this.stream.on('drain', done);
        this.stream.on('close', done);
      });
    }
  }

  /** Resolves once everything queued so far has been handed to the kernel. */
  flushed(): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => this.stream.write(Buffer.alloc(0), () => resolve()));
  }

  /** Replaces the stream (the TLS socket over the plain one); nothing may be buffered unread. */
  upgrade(next: Duplex): void {
    this.reader.detach();
    this.stream = next;
    this.reader = new ExactReader(next);
    this.closedFlag = false;
    next.on('close', () => {
      this.closedFlag = true;
    });
  }

  /**
   * Takes no further request: the serving loop ends, answers what is in
   * flight, then closes (an export removed while clients use it).
   */
  drain(): void {
    this.reader.stop();
  }

  /** Ends the connection (after what is queued has gone, unless `hard`). */
  close(hard = false): void {
    if (hard) this.stream.destroy();
    else this.stream.end();
    // A client that never reads what is queued must not keep the socket forever.
    setTimeout(() => this.stream.destroy(), 5000).unref();
  }
}

export { Closed };
