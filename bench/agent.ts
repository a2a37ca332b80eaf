/**
 * AGENT FIGURES (issue 9) — NOT MEASURED YET.
 *
 * This is where the agent benchmark goes once `blkexport agent` exists: time
 * until 200 exports are ready, RSS with 200 exports, reconcile latency
 * p50/p99 (from the control socket's /metrics), and CPU seconds per GiB read.
 * Until then it reports why nothing was measured; it must never print a
 * figure it did not measure.
 */

export interface AgentFigures {
  /** Seconds from agent start until 200 exports report `ready`. */
  exportsReadySeconds: number;
  /** Resident set size of the agent with 200 exports, MiB. */
  rssMiB: number;
  reconcileP50Ms: number;
  reconcileP99Ms: number;
  /** CPU seconds (user + system) of the serving process per GiB read through an export. */
  cpuSecondsPerGiB: number;
}

export type AgentOutcome = { measured: true; figures: AgentFigures } | { measured: false; reason: string };

/** Measures the agent figures; today it only says that the agent is not there to measure. */
export async function measureAgent(): Promise<AgentOutcome> {
  return {
    measured: false,
    reason: 'not measured yet: `blkexport agent` is not implemented (issue 9 adds this)',
  };
}

/** The report's "Agent" section. */
export function renderAgentSection(outcome: AgentOutcome): string {
  const lines = ['## Agent', ''];
  if (!outcome.measured) {
    lines.push(`n/a — ${outcome.reason}.`, '');
    return lines.join('\n');
  }
  const f = outcome.figures;
  lines.push(
    '| figure | value | target |',
    '|---|---|---|',
    `| 200 exports ready | ${f.exportsReadySeconds.toFixed(2)} s | ≤ 10 s |`,
    `| RSS with 200 exports | ${f.rssMiB.toFixed(0)} MiB | ≤ 300 MiB |`,
    `| reconcile latency p50 / p99 | ${f.reconcileP50Ms.toFixed(1)} / ${f.reconcileP99Ms.toFixed(1)} ms | p50 ≤ 100 ms |`,
    `| CPU per GiB read | ${f.cpuSecondsPerGiB.toFixed(2)} s | |`,
    '',
  );
  return lines.join('\n');
}
