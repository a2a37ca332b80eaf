/**
 * Reusable buffers for large READ replies. A fresh buffer of 64 KiB or more
 * is its own allocation (for the C library, its own mapping): the pread into
 * it faults in every page, and the garbage collector frees it again a moment
 * later. nbdcopy reads in 256 KiB requests, 64 of them in flight, so that
 * churn was a visible share of the server's time. A buffer comes back once
 * the socket has handed its bytes to the kernel (Transport.writeThen); the
 * pool keeps at most KEEP_BYTES in all, shared by every connection.
 *
 * Every byte a reply sends from such a buffer was read into it for that
 * reply (data pieces are read whole; holes are sent as hole chunks, never
 * from the buffer), so stale contents never leave the process.
 */

const MIN = 64 * 1024;
const MAX = 4 * 1024 * 1024;
const KEEP_BYTES = 32 * 1024 * 1024;

const free = new Map<number, Buffer[]>();
let kept = 0;

/** A buffer of exactly `length` bytes with unspecified contents. */
export function takeReadBuffer(length: number): Buffer {
  if (length < MIN || length > MAX) return Buffer.allocUnsafe(length);
  const b = free.get(length)?.pop();
  if (b) {
    kept -= length;
    return b;
  }
  // Its own ArrayBuffer (not a slice of Node's pool), so that it can come back whole.
  return Buffer.allocUnsafeSlow(length);
}

/** Hands back a buffer from takeReadBuffer that nothing refers to any more. */
export function returnReadBuffer(b: Buffer): void {
  const n = b.length;
  if (n < MIN || n > MAX || b.byteOffset !== 0 || b.buffer.byteLength !== n) return;
  if (kept + n > KEEP_BYTES) return;
  let list = free.get(n);
  if (!list) {
    list = [];
    free.set(n, list);
  }
  list.push(b);
  kept += n;
}
