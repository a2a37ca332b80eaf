/**
 * Resource bounds of the agent, kept out of the pass itself so they stay
 * small and testable: a cap on the number of exports (a git push must not be
 * able to make the agent open thousands of images and mounts), and the
 * health of live exports as their EIO counters show it (an export that keeps
 * answering EIO is `failed` in status while it and its siblings keep serving).
 */
import { NodeGraph } from '../manifest/graph.js';
import type { Desired } from '../reconcile/model.js';

/** The default of `--max-exports`. */
export const DEFAULT_MAX_EXPORTS = 256;

/** How long an export stays `failed` after its last new I/O error. */
export const IO_ERROR_WINDOW_MS = 5 * 60 * 1000;

/**
 * The desired exports beyond the cap, with the reason to show. Exports served
 * now keep their place (a new manifest never evicts a running export); the
 * others take the free places in manifest order.
 */
export function exportsOverCap(
  desiredIds: readonly string[],
  served: ReadonlySet<string>,
  max: number,
): Map<string, string> {
  const over = new Map<string, string>();
  let used = desiredIds.filter((id) => served.has(id)).length;
  const reason = `refused: the agent serves at most ${max} exports (--max-exports)`;
  for (const id of desiredIds) {
    if (served.has(id)) continue;
    if (used < max) used++;
    else over.set(id, reason);
  }
  return over;
}

/**
 * `desired` without the exports in `drop`, the nodes only they needed, and
 * the nodes in `dropNodes` that no kept export needs.
 */
export function withoutExports(
  desired: Desired,
  drop: ReadonlySet<string>,
  dropNodes: ReadonlySet<string> = new Set(),
): Desired {
  if (drop.size === 0 && dropNodes.size === 0) return desired;
  const graph = new NodeGraph(desired.nodes.map((n) => n.options));
  const kept = desired.exports.filter((e) => !drop.has(e.options.id));
  const needed = new Set(kept.flatMap((e) => graph.below(e.options['node-name'])));
  const gone = new Set(dropNodes);
  for (const e of desired.exports)
    if (drop.has(e.options.id)) for (const n of graph.below(e.options['node-name'])) gone.add(n);
  return {
    exports: kept,
    nodes: desired.nodes.filter(
      (n) => !gone.has(n.options['node-name']) || needed.has(n.options['node-name']),
    ),
  };
}

interface ErrorEpisode {
  /** The counter when the episode began (errors before it do not count). */
  base: number;
  since: number;
  lastRise: number;
}

/**
 * Watches the EIO counters of live exports. An export whose counter rose in
 * the last `windowMs` is failing: `I/O errors: N since T`. Counters are
 * sampled whenever status is asked, so T is when the first error was seen.
 */
export class IoErrorWatch {
  private readonly last = new Map<string, number>();
  private readonly episodes = new Map<string, ErrorEpisode>();

  constructor(private readonly windowMs = IO_ERROR_WINDOW_MS) {}

  /**
   * The failure reason for export `id` given its counter now (and why its
   * last failing request failed), or undefined while it is healthy.
   */
  observe(id: string, errors: number | undefined, now: number, lastError?: string): string | undefined {
    if (errors === undefined) {
      this.last.delete(id);
      this.episodes.delete(id);
      return undefined;
    }
    const before = this.last.get(id) ?? 0;
    this.last.set(id, errors);
    let ep = this.episodes.get(id);
    if (ep && now - ep.lastRise > this.windowMs) {
      this.episodes.delete(id);
      ep = undefined;
    }
    if (errors > before) {
      if (!ep) {
        ep = { base: before, since: now, lastRise: now };
        this.episodes.set(id, ep);
      }
      ep.lastRise = now;
    }
    if (!ep) return undefined;
    const last = lastError === undefined ? '' : `; last: ${lastError}`;
    return `I/O errors: ${errors - ep.base} since ${new Date(ep.since).toISOString()} (the failing ranges answer EIO; the rest is served)${last}`;
  }
}
