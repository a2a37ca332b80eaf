/**
 * The agent as a systemd Type=notify service: a stand-in notification socket
 * (a Unix datagram socket, as systemd binds it; Node has none, so a small
 * Python listener) gets READY=1 only once the first pass has mounted the
 * exports, and STOPPING=1 on SIGTERM. No FDSTORE=1: the connections outlive
 * the agent through blkexport's own fd holder, not systemd's store (docs/decisions/0006).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { mountsUnder } from '../helpers/mounts.js';
import { needTools, qemuImg, REPO } from '../helpers/tools.js';

interface Datagram {
  msg: string;
  pid: number | null;
}

test('Type=notify: READY=1 after the first pass mounted the exports, STOPPING=1 on SIGTERM, no FDSTORE', async (t) => {
  if (!needTools(t, 'qemu-img', '/dev/fuse', 'python3', 'systemd-notify')) return;
  const d = agentDir(t);
  const notifySocket = join(d.dir, 'notify.sock');
  const listener = spawn('python3', [join(REPO, 'test/integration/notify-listener.py'), notifySocket], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  t.after(() => {
    listener.kill('SIGKILL');
  });
  const got: Datagram[] = [];
  let bound = false;
  let partial = '';
  listener.stdout!.on('data', (chunk) => {
    partial += chunk;
    const lines = partial.split('\n');
    partial = lines.pop() ?? '';
    for (const l of lines) {
      const j = JSON.parse(l) as Datagram & { bound?: string };
      if (j.bound) bound = true;
      else got.push(j);
    }
  });
  await until('the notification socket bound', () => bound);

  const image = join(d.images, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', image, '1M');
  const mountpoint = join(d.images, 'a.raw');
  writeFileSync(
    join(d.manifests, 'a.yaml'),
    `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: a\nspec:\n  exports:\n${shorthand('a', image, { mountpoint, 'create-mountpoint': true })}`,
  );
  const agent = await startAgent(t, d, [], { NOTIFY_SOCKET: notifySocket });
  const ready = await until('READY=1', () => got.find((g) => /^READY=1$/m.test(g.msg)), 20_000);
  // When READY=1 arrives, the first pass is over: the export is mounted already.
  assert.deepEqual(
    mountsUnder(d.dir).map((m) => m.mountpoint),
    [mountpoint],
  );
  assert.equal(ready.pid, agent.proc.pid, 'READY=1 names the agent as the main process');

  agent.proc.kill('SIGTERM');
  assert.equal(await agent.exited, 0);
  await until('STOPPING=1', () => got.some((g) => /^STOPPING=1$/m.test(g.msg)));
  assert.ok(!got.some((g) => /FDSTORE=1/.test(g.msg)), JSON.stringify(got));
});
