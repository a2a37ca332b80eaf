/**
 * A live agent under a stream of random manifest edits (mutated and random
 * YAML, atomic renames and in-place writes, deletions, restores) to two
 * "churn" files: it never exits, and the exports of the manifest that stayed
 * valid are never touched — their mounts keep the same mount id in
 * /proc/self/mountinfo — and keep serving the same bytes.
 */
import assert from 'node:assert/strict';
import { readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { parseMountInfo } from '../../src/export/mount-table.js';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { needTools, qemuImg, randomBytes, run, seededRandom } from '../helpers/tools.js';
import { mutateYaml, randomYaml } from './yaml-mutate.js';

const BUDGET_MS = Number(process.env.BLKEXPORT_FUZZ_AGENT_MS ?? 12_000);

interface Status {
  exports: { id: string; state: string; reason: string }[];
}

function mountIds(paths: string[]): Map<string, number> {
  const all = parseMountInfo(readFileSync('/proc/self/mountinfo', 'utf8'));
  return new Map(paths.map((p) => [p, all.find((e) => e.mountpoint === p)?.mountId ?? -1]));
}

function manifest(name: string, exports: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n  exports:\n${exports}`;
}

function exportOf(id: string, image: string, mnt: string, extra = ''): string {
  return `    - id: ${id}\n      image: ${image}\n      mountpoint: ${mnt}\n      create-mountpoint: true\n${extra}`;
}

test('agent under random manifest edits: never exits, never touches the exports of the valid manifest', {
  timeout: BUDGET_MS + 90_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
  const d = agentDir(t);
  const data = randomBytes(seededRandom(77), 1 << 20);
  const s1 = join(d.images, 's1.raw');
  writeFileSync(s1, data);
  const s2 = join(d.images, 's2.qcow2');
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', s1, s2);
  const churnImages = ['c1.raw', 'c2.raw'].map((n) => join(d.images, n));
  for (const c of churnImages) writeFileSync(c, Buffer.alloc(1 << 20));
  const m1 = join(d.images, 's1.mnt');
  const m2 = join(d.images, 's2.mnt');
  writeFileSync(
    join(d.manifests, 'stable.yaml'),
    manifest('stable', exportOf('s1', s1, m1, '      format: raw\n') + exportOf('s2', s2, m2)),
  );
  const churn = [0, 1].map((i) => ({
    file: join(d.manifests, `churn-${i}.yaml`),
    base: manifest(
      `churn-${i}`,
      exportOf(
        `c${i}`,
        churnImages[i]!,
        join(d.images, `c${i}.mnt`),
        '      format: raw\n      writable: true\n',
      ),
    ),
  }));
  for (const c of churn) writeFileSync(c.file, c.base);

  const agent = await startAgent(t, d);
  const status = async () => (await agent.get<Status>('/status')).exports;
  await until(
    'every export ready',
    async () => {
      const e = await status();
      return e.length === 4 && e.every((x) => x.state === 'ready');
    },
    15_000,
  );
  const ids = mountIds([m1, m2]);
  assert.ok(
    [...ids.values()].every((id) => id > 0),
    JSON.stringify([...ids]),
  );

  const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000);
  const rand = seededRandom(seed);
  const deadline = Date.now() + BUDGET_MS;
  const log: string[] = [];
  let edits = 0;
  while (Date.now() < deadline) {
    const c = churn[Math.floor(rand() * churn.length)]!;
    const r = rand();
    let text: string | undefined;
    if (r < 0.65) text = mutateYaml(c.base, seed * 10_000 + edits).text;
    else if (r < 0.75) text = randomYaml(seededRandom(seed * 10_000 + edits), 600);
    else if (r < 0.85) text = c.base;
    if (text === undefined) {
      rmSync(c.file, { force: true });
      log.push(`${edits}: delete ${c.file}`);
    } else if (rand() < 0.5) {
      writeFileSync(`${c.file}.tmp`, text);
      renameSync(`${c.file}.tmp`, c.file.replace(/\.yaml$/, '.yaml'));
      log.push(`${edits}: rename over ${c.file}`);
    } else {
      writeFileSync(c.file, text);
      log.push(`${edits}: write ${c.file}`);
    }
    edits++;
    await new Promise((res) => setTimeout(res, 20 + rand() * 250));
    if (edits % 10 === 0) {
      assert.equal(agent.proc.exitCode, null, `agent exited: ${agent.log().slice(-2000)}`);
      assert.deepEqual(
        mountIds([m1, m2]),
        ids,
        `a stable export was touched after: ${log.slice(-5).join(', ')}`,
      );
    }
  }
  t.diagnostic(`seed ${seed}: ${edits} edits`);

  // Back to valid: the agent is alive and the stable exports never moved. A churn export that
  // failed during the storm comes back at its next retry (backoff up to 5 min), so it is only
  // required to be ready or failed here.
  for (const c of churn) writeFileSync(c.file, c.base);
  const settled = await until(
    'the churn manifests applied again',
    async () => {
      const e = await status();
      return e.length === 4 && e.every((x) => x.state === 'ready' || x.state === 'failed') ? e : undefined;
    },
    30_000,
  );
  const notReady = settled.filter((e) => e.state !== 'ready');
  if (notReady.length) t.diagnostic(`waiting for a retry: ${JSON.stringify(notReady)}`);
  assert.equal(agent.proc.exitCode, null);
  assert.deepEqual(mountIds([m1, m2]), ids);
  const st = await status();
  assert.ok(st.filter((e) => e.id.startsWith('s')).every((e) => e.state === 'ready'));
  for (const m of [m1, m2]) {
    const r = run('cmp', [s1, m]);
    assert.equal(r.status, 0, `${m}: ${r.stdout}${r.stderr}`);
  }
  assert.doesNotMatch(agent.log(), /uncaught|unhandled/i);
});
