/**
 * Reads exact byte counts from a stream in paused mode: the socket's own
 * buffer is the only one, so a client that sends faster than requests run
 * is held back by TCP, not by our memory. A closed stream rejects the
 * pending read with `Closed`.
 */
import type { Duplex } from 'node:stream';

/** The peer closed (or reset) the connection. */
export class Closed extends Error {
  constructor(message = 'connection closed') {
    super(message);
  }
}

export class ExactReader {
  private ended = false;
  /** stop() was called: no further request is read, whatever the client sends. */
  private stopped = false;
  private error: Error | undefined;
  private wake: (() => void) | undefined;
  private readonly onReadable = () => this.notify();
  private readonly onEnd = () => {
    this.ended = true;
    this.notify();
  };
  private readonly onError = (e: Error) => {
    this.error = e;
    this.notify();
  };

  constructor(readonly stream: Duplex) {
    stream.on('readable', this.onReadable);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private wait(): Promise<void> {
    return new Promise((resolve) => {
      this.wake = resolve;
    });
  }

  /** Exactly `n` bytes (n > 0), or a Closed rejection when the stream ends first. */
  async read(n: number): Promise<Buffer> {
    for (;;) {
      if (this.stopped) throw new Closed('the server stopped reading');
      if (this.error) throw new Closed(this.error.message);
      const b = this.stream.read(n) as Buffer | null;
      if (b !== null) {
        if (b.length === n) return b;
        throw new Closed(`connection closed after ${b.length} of ${n} bytes`);
      }
      if (this.ended || this.stream.destroyed) throw new Closed();
      await this.wait();
    }
  }

  /** Reads and drops `n` bytes without holding more than one chunk (an oversized payload). */
  async skip(n: number, chunk = 1024 * 1024): Promise<void> {
    for (let left = n; left > 0; ) {
      const k = Math.min(chunk, left);
      await this.read(k);
      left -= k;
    }
  }

  /** Reads nothing more: the pending read and every later one reject with Closed; the stream stays open. */
  stop(): void {
    this.stopped = true;
    this.notify();
  }

  /** Stops listening (before the stream is handed to TLS, or at the end). */
  detach(): void {
    this.stream.off('readable', this.onReadable);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    this.notify();
  }
}
