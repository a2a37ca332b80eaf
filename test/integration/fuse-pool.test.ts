/**
 * The FUSE binding's workers are one pool per process, not per export: an
 * agent serving many exports keeps a handful of worker threads (each with a
 * resident 1 MiB read buffer) and still serves every export, in parallel.
 * With workers per export, 40 exports meant 160 waiting threads and 160 MiB of
 * buffers (926 MiB RSS for 200 exports in the agent benchmark).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { needTools, qemuImg } from '../helpers/tools.js';

const EXPORTS = 40;
const IDLE = 4; // BLKEXPORT_FUSE_IDLE_THREADS' default (native-fuse/fuse_loop.c)

/** The agent's threads named blk-fuse (the pool's workers) and its total thread count. */
function threads(pid: number): { pool: number; total: number } {
  const tids = readdirSync(`/proc/${pid}/task`);
  const pool = tids.filter((tid) => {
    try {
      return readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim() === 'blk-fuse';
    } catch {
      return false; // the thread left meanwhile
    }
  }).length;
  return { pool, total: tids.length };
}

test(`${EXPORTS} exports in one agent share one small worker pool, and every export serves`, async (t) => {
  if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
  const d = agentDir(t);
  let body = '';
  for (let i = 0; i < EXPORTS; i++) {
    const img = join(d.images, `d${i}.qcow2`);
    qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
    // Distinct content per export, so a read answered by the wrong connection would show.
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${i + 1} 0 64k`, img]);
    body += shorthand(`d${i}`, img, {
      format: 'qcow2',
      mountpoint: join(d.images, `d${i}.raw`),
      'create-mountpoint': true,
    });
  }
  writeFileSync(
    join(d.manifests, 'many.yaml'),
    `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata: { name: many }\nspec:\n  exports:\n${body}`,
  );
  const agent = await startAgent(t, d);
  await until(
    `${EXPORTS} exports ready`,
    async () =>
      (await agent.get<{ exports: { state: string }[] }>('/status')).exports.filter(
        (e) => e.state === 'ready',
      ).length === EXPORTS,
    60_000,
  );
  // Every export answers with its own bytes, read by child processes (never by the serving agent),
  // all at once, so the pool serves several connections concurrently.
  const script = [
    'const fs = require("node:fs");',
    'const [dir, n] = process.argv.slice(1);',
    'Promise.all(Array.from({ length: +n }, (_, i) => fs.promises.readFile(dir + "/d" + i + ".raw").then((b) => {',
    '  if (b.length !== 4 << 20 || b[0] !== i + 1 || b[65535] !== i + 1 || b[65536] !== 0) throw new Error("d" + i + ": wrong bytes");',
    '}))).then(() => console.log("ok"), (e) => { console.error(String(e)); process.exit(1); });',
  ].join('\n');
  const r = spawnSync(process.execPath, ['-e', script, d.images, String(EXPORTS)], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  assert.equal(r.status, 0, r.stderr);
  const pid = agent.proc.pid!;
  // Workers that served the burst above leave once max_idle others wait again.
  const settled = await until(
    'the pool back to its idle size',
    () => {
      const n = threads(pid);
      return n.pool <= IDLE ? n : undefined;
    },
    10_000,
  );
  assert.ok(settled.pool >= 1, 'the pool has workers');
  assert.ok(
    settled.total < EXPORTS,
    `${settled.total} threads for ${EXPORTS} exports: the workers must not grow with the number of exports`,
  );
});
