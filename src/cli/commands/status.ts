/** `blkexport status`: what the running agent reports, as a table, JSON or YAML. */
import { stringify } from 'yaml';
import type { StatusDocument } from '../../agent/agent.js';
import { getAgentJson } from '../../agent/control-client.js';
import { DEFAULT_SOCKET } from '../../agent/control-server.js';
import { BlkError } from '../../errors.js';
import { parseCommandArgs } from '../args.js';

export const summary = "show the running agent's manifests and exports";
export const usage = `usage: blkexport status [--socket PATH] [-o table|json|yaml]

Asks the agent on the control socket (default ${DEFAULT_SOCKET}) for every
manifest (valid or not, with errors as FILE:LINE:COL) and every export
(its engine; ready, pending or failed, with the reason and since when; since
when this agent process serves it, and whether it adopted it from a previous
agent process; "passthrough" after the engine: the kernel serves its reads and
writes from the image file, so its I/O counters stay still).
`;

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows
    .map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  '))
    .join('\n');
}

/** The engine column: with FUSE passthrough the kernel does the I/O, which the export's counters do not see. */
function engineLabel(e: StatusDocument['exports'][number]): string {
  return e.passthrough ? `${e.engine}, passthrough` : e.engine;
}

/** Where an export is served: its mountpoint, or its NBD name and clients. */
function servedAt(e: StatusDocument['exports'][number]): string {
  if (e.mountpoint !== undefined) return e.mountpoint;
  return e.nbd ? `nbd:${e.nbd.name} (${e.nbd.connections} connected)` : '-';
}

/** The agent's line, and where its NBD server listens once it runs. */
function agentLines(a: StatusDocument['agent']): string {
  const line = `agent pid ${a.pid} on ${a.hostname}, manifests ${a.manifests}, ${a.passes} passes`;
  return a.nbd?.length ? `${line}\nNBD server listening on ${a.nbd.join(', ')}` : line;
}

/** Renders the status document for people. */
export function renderStatus(s: StatusDocument): string {
  const out: string[] = [agentLines(s.agent), '', 'MANIFESTS'];
  const mrows = [['FILE', 'NAME', 'VALID', 'NOTE']];
  for (const m of s.manifests) {
    const note = m.valid
      ? m.ignoredForHost?.length
        ? `not for this host: ${m.ignoredForHost.join(', ')}`
        : ''
      : m.lastGoodInForce
        ? 'last good version in force'
        : 'nothing in force';
    mrows.push([m.file, m.name || '-', m.valid ? 'yes' : 'NO', note]);
  }
  out.push(table(mrows));
  for (const m of s.manifests) {
    for (const e of m.errors)
      out.push(`  ${e.file}${e.line !== null ? `:${e.line}:${e.col}` : ''}: ${e.message}`);
  }
  out.push('', 'EXPORTS');
  const erows = [['ID', 'ENGINE', 'STATE', 'MOUNTPOINT', 'NODE', 'SINCE', 'SERVED BY THIS AGENT', 'REASON']];
  for (const e of s.exports) {
    const served = e.servedSince === undefined ? '-' : `${e.servedSince}${e.adopted ? ' (adopted)' : ''}`;
    erows.push([
      e.id,
      engineLabel(e),
      e.state,
      servedAt(e),
      e.chain.join(' > ') || e.node,
      e.since,
      served,
      e.reason,
    ]);
  }
  out.push(table(erows));
  return out.join('\n');
}

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('status', args, {
    socket: { type: 'string', default: DEFAULT_SOCKET },
    output: { type: 'string', short: 'o', default: 'table' },
  });
  if (positionals.length) throw new BlkError('USAGE', `unexpected argument '${positionals[0]}'`);
  const s = await getAgentJson<StatusDocument>(values.socket as string, '/status');
  switch (values.output) {
    case 'json':
      console.log(JSON.stringify(s, null, 2));
      break;
    case 'yaml':
      process.stdout.write(stringify(s));
      break;
    case 'table':
      console.log(renderStatus(s));
      break;
    default:
      throw new BlkError('USAGE', `-o takes table, json or yaml, not '${values.output}'`);
  }
  return 0;
}
