/**
 * A small readers-writer lock. Reads and in-place overwrites share it (taking
 * it costs no promise when nobody waits); allocating writes, zeroing,
 * discard, resize and the snapshot step of a flush take it exclusively, so a
 * cluster is never freed or re-pointed under an in-flight request that still
 * uses its old mapping. The snapshot step of a commit (which frees nothing)
 * only needs no other writer half-way through a change: it takes the lock
 * against writers alone (`writersOnly`), and readers keep going.
 */

interface Waiter {
  exclusive: boolean;
  wake: () => void;
}

export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly queue: Waiter[] = [];
  /** A writersOnly request waiting for the writer: it goes before the queue (it holds the lock only for a synchronous step). */
  private first: (() => void) | undefined;

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

  /**
   * Takes the lock against other writers only (readers holding it keep going),
   * ahead of queued requests, for a synchronous step (one caller at a time);
   * released with releaseExclusive.
   */
  writersOnly(): Promise<void> {
    if (!this.writer) {
      this.writer = true;
      return Promise.resolve();
    }
    return new Promise((wake) => {
      this.first = wake;
    });
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
    if (this.first !== undefined && !this.writer) {
      const wake = this.first;
      this.first = undefined;
      this.writer = true;
      wake();
      return;
    }
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
