/** Positional file I/O on a raw fd: whole-range reads and writes straight into the caller's buffer. */
import { fdatasync, fstat, ftruncate, read, write } from 'node:fs';

/**
 * Reads [pos, pos+len) into buf[off..]; bytes past the end of the file read
 * as zeroes (QEMU's file driver does the same on a short read at EOF).
 */
export function preadFull(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (o: number, l: number, p: number) => {
      read(fd, buf, o, l, p, (err, n) => {
        if (err) return reject(err);
        if (n === l) return resolve();
        if (n === 0) {
          buf.fill(0, o, o + l);
          return resolve();
        }
        step(o + n, l - n, p + n);
      });
    };
    step(off, len, pos);
  });
}

/** Writes all of buf[off, off+len) at pos. */
export function pwriteFull(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (o: number, l: number, p: number) => {
      write(fd, buf, o, l, p, (err, n) => {
        if (err) return reject(err);
        if (n === l) return resolve();
        step(o + n, l - n, p + n);
      });
    };
    step(off, len, pos);
  });
}

/** fdatasync as a promise. */
export function fdatasyncAsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasync(fd, (e) => (e ? reject(e) : resolve())));
}

/** ftruncate as a promise. */
export function ftruncateAsync(fd: number, size: number): Promise<void> {
  return new Promise((resolve, reject) => ftruncate(fd, size, (e) => (e ? reject(e) : resolve())));
}

/** fstat as a promise (bigint-free: sizes stay below 2^53). */
export function fstatAsync(fd: number): Promise<import('node:fs').Stats> {
  return new Promise((resolve, reject) => fstat(fd, (e, st) => (e ? reject(e) : resolve(st))));
}
