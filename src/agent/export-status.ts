/**
 * Per-export state as status shows it (ready | pending | failed, with reason
 * and since), and the retry backoff of failed exports: 1 s doubling to 5 min.
 * A terminal failure (a corrupt image, a path outside the roots) is not
 * retried by time at all: only when its manifest or one of its files changes.
 * The clock is passed in, so the bookkeeping is testable without waiting.
 */

export type ExportPhase = 'ready' | 'pending' | 'failed';

export interface ExportRecord {
  id: string;
  manifest: string;
  state: ExportPhase;
  reason: string;
  /** ISO time of the last state change. */
  since: string;
  /** FUSE exports: the mountpoint; undefined for NBD exports. */
  mountpoint: string | undefined;
  /** NBD exports: the export name clients ask for. */
  nbdName?: string;
  node: string;
  /** Consecutive failures. */
  failures: number;
  /** Epoch ms before which a failed export is not retried (Infinity: terminal). */
  retryAt: number;
  /** A terminal failure: retried when these files' fingerprint changes (or the manifest does). */
  terminal?: { files: string[]; fingerprint: string };
}

export const BACKOFF_FIRST_MS = 1000;
export const BACKOFF_MAX_MS = 5 * 60 * 1000;

/** Delay before retry number `failures` (1 → 1 s, 2 → 2 s, ... capped at 5 min). */
export function backoffMs(failures: number): number {
  return Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.max(0, failures - 1));
}

export class ExportBook {
  private readonly records = new Map<string, ExportRecord>();

  /** Makes sure a desired export has a record (pending when new); updates where it lives. */
  track(
    id: string,
    manifest: string,
    mountpoint: string | undefined,
    node: string,
    now: number,
    nbdName?: string,
  ): ExportRecord {
    let r = this.records.get(id);
    if (!r) {
      r = {
        id,
        manifest,
        state: 'pending',
        reason: 'not applied yet',
        since: new Date(now).toISOString(),
        mountpoint,
        node,
        failures: 0,
        retryAt: 0,
      };
      this.records.set(id, r);
    }
    r.manifest = manifest;
    r.mountpoint = mountpoint;
    r.node = node;
    if (nbdName !== undefined) r.nbdName = nbdName;
    else delete r.nbdName;
    return r;
  }

  private set(r: ExportRecord, state: ExportPhase, reason: string, now: number): void {
    if (r.state !== state || r.reason !== reason) r.since = new Date(now).toISOString();
    r.state = state;
    r.reason = reason;
  }

  ready(id: string, now: number): void {
    const r = this.records.get(id);
    if (!r) return;
    r.failures = 0;
    r.retryAt = 0;
    delete r.terminal;
    this.set(r, 'ready', '', now);
  }

  pending(id: string, reason: string, now: number): void {
    const r = this.records.get(id);
    if (r) this.set(r, 'pending', reason, now);
  }

  /** Marks a failure and schedules the next retry; a terminal one waits for a change of `terminal.files`. */
  failed(id: string, reason: string, now: number, terminal?: { files: string[]; fingerprint: string }): void {
    const r = this.records.get(id);
    if (!r) return;
    r.failures += 1;
    r.retryAt = terminal ? Number.POSITIVE_INFINITY : now + backoffMs(r.failures);
    if (terminal) r.terminal = terminal;
    else delete r.terminal;
    this.set(r, 'failed', reason, now);
  }

  /** Ends the wait of a failed export (its manifest or its image changed): the next pass tries it again. */
  retryNow(id: string): void {
    const r = this.records.get(id);
    if (!r) return;
    r.failures = 0;
    r.retryAt = 0;
    delete r.terminal;
  }

  /** Exports whose failure is terminal (waiting for a change, not for time). */
  terminal(): ExportRecord[] {
    return this.list().filter((r) => r.state === 'failed' && r.terminal !== undefined);
  }

  /** True while a failed export waits for its retry time. */
  inBackoff(id: string, now: number): boolean {
    const r = this.records.get(id);
    return r !== undefined && r.state === 'failed' && now < r.retryAt;
  }

  /** The earliest retry time of any export in backoff, if any. */
  nextRetry(now: number): number | undefined {
    let next: number | undefined;
    for (const r of this.records.values()) {
      if (!Number.isFinite(r.retryAt)) continue;
      if (r.state === 'failed' && r.retryAt > now && (next === undefined || r.retryAt < next))
        next = r.retryAt;
    }
    return next;
  }

  /** Drops records of exports no longer desired. */
  retain(ids: ReadonlySet<string>): void {
    for (const id of [...this.records.keys()]) if (!ids.has(id)) this.records.delete(id);
  }

  get(id: string): ExportRecord | undefined {
    return this.records.get(id);
  }

  list(): ExportRecord[] {
    return [...this.records.values()];
  }
}
