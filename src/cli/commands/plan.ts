/**
 * `blkexport plan --manifests DIR`: what the agent would do. Desired state is
 * the directory's valid manifests for this host; observed state is the running
 * agent's (when --socket reaches one), else nothing mounted.
 */
import { request } from 'node:http';
import { hostname as osHostname } from 'node:os';
import { nativeCapabilities } from '../../engine/native/capabilities.js';
import { qemuCapabilities } from '../../engine/qemu/capabilities.js';
import { BlkError } from '../../errors.js';
import { loadManifestDir } from '../../manifest/directory.js';
import { manifestToJson } from '../../manifest/report.js';
import type { EngineName } from '../../manifest/types.js';
import { hostPlanInputs, planEngines } from '../../reconcile/host-plan.js';
import { EMPTY_OBSERVED, type Observed } from '../../reconcile/model.js';
import { planHasChanges, planToJson, renderPlan } from '../../reconcile/render.js';
import { parseCommandArgs } from '../args.js';

export const summary = 'show what the agent would change to match the manifests; exit 2 if anything';
export const usage = `usage: blkexport plan --manifests DIR [-o text|json] [--socket PATH] [--host NAME] [--engine E]

Compares the desired state (the valid manifests of DIR that apply to this
host) with the observed state, and prints the steps that would reconcile them,
each with the engine that carries it out:

  + node prot0 (file) /srv/images/foo.qcow2 [native]            add
  + export exp0 (fuse) /srv/images/foo.qcow2 writable [native]  add
  ~ export exp0 writable: false → true (reopen in place) [native]
  -/+ export exp1 (replace: writable changed; the qemu engine remounts to change it) [qemu]
  -/+ node prot0 (replace: filename changed) [native]           remove, then add again
  - node old0 [native]                                          remove
  ! export exp0 /srv/images/foo.qcow2 (repair: stale mount) [native]

Nodes are read-only unless a writable export writes through them. Shorthand
exports are shown expanded (<id>-file, <id>-fmt, <id>-part); a probed format
is "resolved when applied". Manifests with errors are reported on stderr and
left out of the plan.

The observed state comes from the agent on --socket; without --socket, or
when nothing answers there, the plan assumes nothing is mounted.

Exit status: 0 no changes, 2 changes pending, 1 on any error (including an
invalid manifest).

options:
  --manifests DIR    the manifest directory (as given to blkexport agent)
  -o, --output FMT   text (default) or json:
                     {"host", "observed", "manifests": [...], "changes", "summary", "steps": [...]}
  --socket PATH      the agent's control socket (its observed state)
  --host NAME        plan for host NAME (spec.hosts); default: this machine's hostname
  --engine E         the engine of manifests that name none (native or qemu); default: the
                     agent's on --socket, else native
`;

/** Asks the agent on `socketPath` for its observed state (GET /observed); undefined (with why) when that fails. */
async function observedFromAgent(
  socketPath: string,
): Promise<{ observed?: Observed & { defaultEngine?: EngineName }; why: string }> {
  return new Promise((resolve) => {
    const req = request({ socketPath, path: '/observed', method: 'GET', timeout: 2000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        body += chunk;
      });
      res.on('end', () => {
        try {
          // The body is an Observed ({nodes, exports}), or wraps one as {observed: ...}.
          const json = JSON.parse(body) as Observed & { observed?: Observed; defaultEngine?: EngineName };
          const o = json.observed ?? json;
          if (res.statusCode === 200 && o && Array.isArray(o.nodes) && Array.isArray(o.exports)) {
            resolve({ observed: o, why: `the agent on ${socketPath}` });
          } else {
            resolve({ why: `the agent on ${socketPath} does not report its observed state` });
          }
        } catch {
          resolve({ why: `the agent on ${socketPath} answered something that is not JSON` });
        }
      });
    });
    req.on('timeout', () => req.destroy(new BlkError('AGENT', 'ETIMEDOUT')));
    req.on('error', (e: NodeJS.ErrnoException) => {
      resolve({ why: `no agent answers on ${socketPath} (${e.code ?? e.message})` });
    });
    req.end();
  });
}

/** Runs `blkexport plan`. */
export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('plan', args, {
    manifests: { type: 'string' },
    output: { type: 'string', short: 'o', default: 'text' },
    socket: { type: 'string' },
    host: { type: 'string' },
    engine: { type: 'string' },
  });
  if (values.manifests === undefined)
    throw new BlkError('USAGE', '--manifests DIR is required (see blkexport plan --help)');
  if (positionals.length > 0)
    throw new BlkError('USAGE', `unexpected argument '${positionals[0]}' (see blkexport plan --help)`);
  if (values.output !== 'text' && values.output !== 'json') {
    throw new BlkError('USAGE', `unknown output format '${values.output}' (text or json)`);
  }
  if (values.engine !== undefined && values.engine !== 'native' && values.engine !== 'qemu')
    throw new BlkError('USAGE', `--engine ${values.engine}: native or qemu`);
  const host = values.host ?? osHostname();
  const files = loadManifestDir(values.manifests, { hostname: host });
  const invalid = files.filter((f) => !f.valid);
  for (const f of invalid) {
    for (const p of f.problems) console.error(`blkexport plan: ${p.format()}`);
    console.error(`blkexport plan: ${f.file} is refused and left out of the plan`);
  }

  let observed: Observed & { defaultEngine?: EngineName } = EMPTY_OBSERVED;
  let observedFrom = 'nothing mounted (no --socket)';
  if (values.socket !== undefined) {
    const r = await observedFromAgent(values.socket);
    if (r.observed) {
      observed = r.observed;
      observedFrom = r.why;
    } else {
      observedFrom = 'nothing mounted';
      console.error(`blkexport plan: ${r.why}; assuming nothing is mounted`);
    }
  }

  const fallback = (values.engine as EngineName | undefined) ?? observed.defaultEngine ?? 'native';
  const plan = planEngines(
    hostPlanInputs(files, host, observed, [nativeCapabilities, qemuCapabilities], fallback),
  );
  if (values.output === 'json') {
    const out = { host, observed: observedFrom, manifests: files.map(manifestToJson), ...planToJson(plan) };
    console.log(JSON.stringify(out, null, 2));
  } else {
    const valid = files.length - invalid.length;
    console.log(
      `# host ${host}: ${valid} valid manifest file(s) in ${values.manifests}; observed: ${observedFrom}`,
    );
    process.stdout.write(renderPlan(plan));
  }
  if (invalid.length > 0) return 1;
  return planHasChanges(plan) ? 2 : 0;
}
