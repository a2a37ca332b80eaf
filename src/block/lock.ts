/**
 * QEMU-compatible image locking (docs/block-layer.md), so QEMU and blkexport never
 * both write one image. Locks are open-file-description (OFD) read locks on
 * single bytes of the image: byte 100+i = "I hold permission i", byte 200+i =
 * "I refuse others permission i"; permissions 0 consistent read, 1 write,
 * 2 write unchanged, 3 resize. A user first takes its own locks, then probes
 * with F_WRLCK: byte 200+i for each permission it holds, byte 100+i for each
 * it refuses. Locks live on a dedicated fd that stays open across reopen, so
 * moving between read-only and read-write changes bytes in place, never
 * dropping them (QEMU's file-posix does the same with prepare/commit/abort).
 *
 * What we hold, as QEMU 7.2 holds it for a qcow2 image (checked in /proc/locks):
 *   read-only : 100,           201, 203   (qemu-io -r, a backing file)
 *   read-write: 100, 101, 103, 201, 203   (qemu-io, a writable QSD export)
 * We hold the qcow2 profile for raw images too: QEMU's raw driver shares
 * write with others, but our promise is "never two writers", and a reader of
 * an image that someone else rewrites sees torn data.
 */
import { closeSync, constants, openSync } from 'node:fs';
import { BlkError } from '../errors.js';
import { type NativeHelper, nativeHelper } from './lock-native.js';

/** QEMU's OnOffAuto for `locking`: auto = lock when the host supports OFD locks. */
export type LockingMode = 'auto' | 'on' | 'off';

/** QEMU's permission names, indexed by permission number (bdrv_perm_names). */
export const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;

export const PERM_CONSISTENT_READ = 1 << 0;
export const PERM_WRITE = 1 << 1;
export const PERM_WRITE_UNCHANGED = 1 << 2;
export const PERM_RESIZE = 1 << 3;
const PERM_ALL = 0xf;

/** Base byte offsets of QEMU's lock bytes. */
export const LOCK_BYTE_PERM = 100;
export const LOCK_BYTE_SHARED = 200;

/** A permission set as bitmasks: what we hold, and what we let others hold. */
export interface LockPerms {
  perm: number;
  shared: number;
}

/**
 * The permissions a user of an image takes: QEMU's qcow2 profile for a
 * read-only or read-write open. With `forceShare` (QEMU's `force-share=on`,
 * what `qemu-img -U` and `qemu-nbd --shared`-style readers use; read-only
 * only) the reader still takes "consistent read" but refuses nobody anything,
 * so it can open an image a running VM writes and the VM can open it after.
 */
export function lockPermsFor(readOnly: boolean, forceShare = false): LockPerms {
  if (forceShare) return { perm: PERM_CONSISTENT_READ, shared: PERM_ALL };
  const shared = PERM_ALL & ~(PERM_WRITE | PERM_RESIZE);
  return readOnly
    ? { perm: PERM_CONSISTENT_READ, shared }
    : { perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared };
}

/** The lock bytes a permission set holds (sorted), e.g. [100, 201, 203] for read-only. */
export function lockBytesOf(p: LockPerms): number[] {
  const out: number[] = [];
  for (let i = 0; i < PERM_NAMES.length; i++) if (p.perm & (1 << i)) out.push(LOCK_BYTE_PERM + i);
  for (let i = 0; i < PERM_NAMES.length; i++) if (!(p.shared & (1 << i))) out.push(LOCK_BYTE_SHARED + i);
  return out;
}

/** Parses a `locking` option value; undefined means auto. */
export function parseLockingMode(v: unknown, file?: string): LockingMode {
  if (v === undefined || v === 'auto') return 'auto';
  if (v === 'on' || v === 'off') return v;
  if (v === true) return 'on';
  if (v === false) return 'off';
  throw new BlkError('IMAGE_INVALID', `locking must be auto, on or off, not '${String(v)}'`, { file });
}

function lockError(path: string, what: string): BlkError {
  return new BlkError('LOCKED', `${what}. Is another process using the image [${path}]?`, { file: path });
}

/** The OFD locks one open image holds; see the module comment for the bytes. */
export class ImageLock {
  private constructor(
    private readonly n: NativeHelper,
    private fd: number,
    readonly path: string,
    private held: LockPerms,
  ) {}

  /**
   * Takes the locks for `perms` on the file `dataFd` reaches and checks that
   * nobody else conflicts. Returns undefined when locking is off, or auto on a
   * host without OFD locks. Throws BlkError LOCKED on a conflict.
   */
  static acquire(dataFd: number, path: string, mode: LockingMode, perms: LockPerms): ImageLock | undefined {
    if (mode === 'off') return undefined;
    const n = nativeHelper();
    let fd: number;
    try {
      // A description of our own for the locks: reopen swaps the data fd, the lock fd stays.
      fd = openSync(`/proc/self/fd/${dataFd}`, constants.O_RDONLY);
    } catch (e) {
      throw new BlkError(
        'IO',
        `cannot open a lock descriptor: ${(e as Error).message}`,
        { file: path },
        { cause: e },
      );
    }
    const lock = new ImageLock(n, fd, path, { perm: 0, shared: PERM_ALL });
    try {
      // Probe once: EINVAL means the kernel or filesystem has no OFD locks.
      const probe = n.ofdTestLock(fd, 0, 0, n.F_RDLCK);
      if (probe < 0) {
        if (mode === 'auto') {
          lock.release();
          return undefined;
        }
        throw new BlkError('LOCKED', `OFD locks are not available here (errno ${-probe}) and locking is on`, {
          file: path,
        });
      }
      lock.apply(perms);
      lock.held = perms;
      lock.check(perms);
      return lock;
    } catch (e) {
      lock.release();
      throw e;
    }
  }

  /** The permissions held now. */
  get perms(): LockPerms {
    return { ...this.held };
  }

  /** The lock bytes held now. */
  bytes(): number[] {
    return lockBytesOf(this.held);
  }

  /**
   * Reopen, step 1: takes the union of the old and new locks and checks the
   * new ones; on a conflict, restores the old locks and throws LOCKED.
   */
  prepare(next: LockPerms): void {
    const union = { perm: this.held.perm | next.perm, shared: this.held.shared & next.shared };
    try {
      this.apply(union);
      this.check(next);
    } catch (e) {
      this.tryApply(this.held);
      throw e;
    }
  }

  /** Reopen, step 2: keeps exactly the new locks (dropping bytes never conflicts). */
  commit(next: LockPerms): void {
    this.tryApply(next);
    this.held = { ...next };
  }

  /** Reopen, failed elsewhere: back to the locks held before prepare. */
  abort(): void {
    this.tryApply(this.held);
  }

  /** Drops every lock (closing the descriptor releases them). */
  release(): void {
    if (this.fd < 0) return;
    closeSync(this.fd);
    this.fd = -1;
  }

  private setByte(byte: number, type: number): void {
    const r = this.n.ofdSetLock(this.fd, byte, 1, type);
    if (r === 0) return;
    if (type === this.n.F_UNLCK) {
      throw new BlkError('IO', `Failed to unlock byte ${byte} (errno ${-r})`, { file: this.path });
    }
    throw lockError(this.path, `Failed to lock byte ${byte}`);
  }

  /** QEMU's raw_apply_lock_bytes: read-lock exactly the bytes of `p`, unlock the rest. */
  private apply(p: LockPerms): void {
    const { F_RDLCK, F_UNLCK } = this.n;
    for (let i = 0; i < PERM_NAMES.length; i++) {
      this.setByte(LOCK_BYTE_PERM + i, p.perm & (1 << i) ? F_RDLCK : F_UNLCK);
      this.setByte(LOCK_BYTE_SHARED + i, p.shared & (1 << i) ? F_UNLCK : F_RDLCK);
    }
  }

  private tryApply(p: LockPerms): void {
    try {
      this.apply(p);
    } catch {
      // Going back to locks we held before cannot conflict; an unlock failure leaves a stricter lock.
    }
  }

  /** QEMU's raw_check_lock_bytes: does anyone refuse what we take, or hold what we refuse? */
  private check(p: LockPerms): void {
    const { F_WRLCK, F_UNLCK } = this.n;
    for (let i = 0; i < PERM_NAMES.length; i++) {
      const name = PERM_NAMES[i]!;
      if (p.perm & (1 << i)) {
        const r = this.n.ofdTestLock(this.fd, LOCK_BYTE_SHARED + i, 1, F_WRLCK);
        if (r !== F_UNLCK) throw lockError(this.path, `Failed to get "${name}" lock`);
      }
      if (!(p.shared & (1 << i))) {
        const r = this.n.ofdTestLock(this.fd, LOCK_BYTE_PERM + i, 1, F_WRLCK);
        if (r !== F_UNLCK) throw lockError(this.path, `Failed to get shared "${name}" lock`);
      }
    }
  }
}
