/** The QMP client against a real qemu-storage-daemon: greeting, ids, errors, events, close. */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { qsdPaths, runningQsd, startQsd, waitExit } from '../../src/engine/qemu/daemon.js';
import { codeForQmpError, QmpClient, QmpError } from '../../src/engine/qemu/qmp.js';
import type { BlkError } from '../../src/errors.js';
import { needTools, qemuImg, tempDir } from '../helpers/tools.js';
import { cleanupQsd, mountAt, QSD_TOOLS, readExport } from './qsd-helpers.js';

test('QMP errors map to BlkError codes', () => {
  assert.equal(codeForQmpError('CommandNotFound', 'The command x has not been found'), 'NOT_SUPPORTED');
  assert.equal(codeForQmpError('GenericError', "There already is a FUSE export on '/a'"), 'EXPORT_EXISTS');
  assert.equal(
    codeForQmpError('GenericError', "Failed to stat '/a': No such file or directory"),
    'MOUNT_FAILED',
  );
  assert.equal(codeForQmpError('GenericError', 'Failed to get "write" lock'), 'LOCKED');
  assert.equal(codeForQmpError('GenericError', 'something else'), 'AGENT');
});

test('QMP client against a scripted server: events, answers out of order, a command that never answers times out', async (t) => {
  const dir = tempDir(t, 'blkexport-qmp-fake-');
  const path = join(dir, 'qmp.sock');
  const server = createServer((c) => {
    c.write(
      '{"QMP": {"version": {"qemu": {"major": 9, "minor": 1, "micro": 0}, "package": "fake"}, "capabilities": []}}\n',
    );
    let buf = '';
    c.on('data', (d) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const m = JSON.parse(buf.slice(0, nl)) as { execute: string; id: string };
        buf = buf.slice(nl + 1);
        if (m.execute === 'qmp_capabilities') c.write(`{"return": {}, "id": "${m.id}"}\n`);
        if (m.execute === 'slow') setTimeout(() => c.write(`{"return": "slow", "id": "${m.id}"}\n`), 50);
        if (m.execute === 'fast') {
          c.write(
            '{"event": "SOMETHING", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}\n',
          );
          // Two messages in one write, one split across writes.
          c.write(`{"return": "fast", "id": "${m.id}"}\n{"ret`);
          c.write('urn": {}, "id": "nobody"}\n');
        }
        // 'hang' gets no answer.
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(() => server.close());
  const qmp = await QmpClient.connect(path);
  t.after(() => qmp.close());
  assert.equal(qmp.version?.major, 9);
  const events: string[] = [];
  qmp.on('event', (e) => events.push(e.event));
  const slow = qmp.execute('slow');
  assert.equal(await qmp.execute('fast'), 'fast');
  assert.equal(await slow, 'slow');
  assert.deepEqual(events, ['SOMETHING']);
  qmp.timeoutMs = 100;
  await assert.rejects(
    qmp.execute('hang'),
    (e: BlkError) => e.code === 'AGENT' && /no answer/.test(e.message),
  );
});

test('QMP client: greeting, concurrent commands by id, errors, BLOCK_EXPORT_DELETED, close when QSD quits', async (t) => {
  if (!needTools(t, ...QSD_TOOLS)) return;
  let dir: string | undefined;
  cleanupQsd(
    t,
    () => dir && join(dir, 'qsd'),
    () => dir,
  );
  dir = tempDir(t, 'blkexport-qmp-');
  const paths = qsdPaths(join(dir, 'qsd'));
  const img = join(dir, 'a.qcow2');
  qemuImg('create', '-f', 'qcow2', img, '1M');
  const mnt = join(dir, 'a.raw');
  writeFileSync(mnt, '');

  const pid = await startQsd(paths);
  assert.equal(await runningQsd(paths), pid);
  const qmp = await QmpClient.connect(paths.qmp);
  t.after(() => qmp.close());
  assert.equal(qmp.version?.major, 7);

  // Several commands in flight at once: each answer finds its caller by id.
  const [nodes, exports, version] = await Promise.all([
    qmp.execute<unknown[]>('query-named-block-nodes', { flat: true }),
    qmp.execute<unknown[]>('query-block-exports'),
    qmp.execute<{ qemu: { major: number } }>('query-version'),
  ]);
  assert.deepEqual(nodes, []);
  assert.deepEqual(exports, []);
  assert.equal(version.qemu.major, 7);

  await assert.rejects(qmp.execute('no-such-command'), (e) => {
    assert.ok(e instanceof QmpError);
    assert.equal(e.code, 'NOT_SUPPORTED');
    assert.equal(e.qmpClass, 'CommandNotFound');
    return true;
  });
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'p', filename: img, 'read-only': true });
  await qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'f',
    file: 'p',
    'read-only': true,
    backing: null,
  });
  await assert.rejects(
    qmp.execute('block-export-add', {
      type: 'fuse',
      id: 'x',
      'node-name': 'f',
      mountpoint: join(dir, 'missing'),
    }),
    (e: QmpError) => e.code === 'MOUNT_FAILED' && /Failed to stat/.test(e.message),
  );
  await qmp.execute('block-export-add', { type: 'fuse', id: 'e', 'node-name': 'f', mountpoint: mnt });
  assert.equal(mountAt(mnt)?.fstype, 'fuse');
  assert.equal(readExport(mnt).length, 1 << 20);

  // The event can come before the return: executeAndWait listens first.
  await qmp.executeAndWait('block-export-del', { id: 'e' }, 'BLOCK_EXPORT_DELETED', (d) => d.id === 'e');
  assert.equal(mountAt(mnt), undefined);
  await qmp.execute('blockdev-del', { 'node-name': 'f' });

  const closed = new Promise((resolve) => qmp.once('close', resolve));
  await qmp.execute('quit');
  await closed;
  assert.equal(qmp.isOpen, false);
  await assert.rejects(qmp.execute('query-version'), /connection closed/);
  await waitExit(pid);
  assert.equal(await runningQsd(paths), undefined);
});
