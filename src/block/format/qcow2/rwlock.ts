/**
 * A small readers-writer lock. Reads and in-place overwrites share it (taking
 * it costs no promise when nobody waits); allocating writes, zeroing,
 * discard, resize and the snapshot step of a metadata write-back take it
 * exclusively, so a cluster is never freed or re-pointed under an in-flight
 * request that still uses its old mapping.
 */

interface Waiter {
  exclusive: boolean;
  wake: () => void;
}

export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly queue: Waiter[] = [];

  /** Takes the lock shared without waiting when possible; false when the caller must wait with shared(). */
  tryShared(): boolean {
    if (this.writer || this.queue.length > 0) return false;
    this.readers++;
    return true;
  }

  /** Takes the lock shared. */
  shared(): Promise<void> {
    if (this.tryShared()) return Promise.resolve();
    return new Promise((wake) => this.queue.push({ exclusive: false, wake }));
  }

  /** Takes the lock exclusively. */
  exclusive(): Promise<void> {
    if (!this.writer && this.readers === 0 && this.queue.length === 0) {
      this.writer = true;
      return Promise.resolve();
    }
    return new Promise((wake) => this.queue.push({ exclusive: true, wake }));
  }

  /** Releases a shared hold. */
  releaseShared(): void {
    this.readers--;
    this.drain();
  }

  /** Releases the exclusive hold. */
  releaseExclusive(): void {
    this.writer = false;
    this.drain();
  }

  private drain(): void {
    while (this.queue.length > 0 && !this.writer) {
      const w = this.queue[0]!;
      if (w.exclusive) {
        if (this.readers > 0) return;
        this.writer = true;
      } else {
        this.readers++;
      }
      this.queue.shift();
      w.wake();
    }
  }
}
