/**
 * `spec.engine: native` serves vhdx: an agent (native engine) exports a
 * probed and an explicitly named vhdx through its own block layer; the bytes
 * equal `qemu-img convert`, and status says the native engine serves them.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { applyWrites, convertToRaw, scatteredWrites } from '../block/images.js';
import { createVhdx, M } from '../block/vhdx-images.js';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { readExport } from '../helpers/mounts.js';
import { needTools } from '../helpers/tools.js';

interface Status {
  exports: { id: string; engine: string; state: string; reason: string }[];
}

describe('vhdx under the native engine', { concurrency: false }, () => {
  test('spec.engine: native exports vhdx (probed and explicit) with the bytes qemu-img convert gives', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse')) return;
    const d = agentDir(t);
    const img = createVhdx(join(d.images, 'hv.vhdx'), 20 * M, { block_size: '1M' });
    applyWrites(d.images, img, 'vhdx', scatteredWrites(5, 20 * M, M, 4 * M, 10), 5);
    const want = convertToRaw(img, join(d.dir, 'want.raw'));
    const mp = (name: string) => ({ mountpoint: join(d.images, name), 'create-mountpoint': true });
    const body = `  exports:\n${shorthand('auto', img, mp('auto.raw'))}${shorthand('named', img, { ...mp('named.raw'), format: 'vhdx' })}`;
    writeFileSync(
      join(d.manifests, 'hv.yaml'),
      `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: hv\nspec:\n  engine: native\n${body}`,
    );
    const agent = await startAgent(t, d, ['--engine', 'native']);
    const st = await until(
      'two exports ready',
      async () => {
        const s = await agent.get<Status>('/status');
        return s.exports.length === 2 && s.exports.every((e) => e.state === 'ready') ? s : undefined;
      },
      15_000,
    );
    assert.ok(
      st.exports.every((e) => e.engine === 'native'),
      JSON.stringify(st.exports),
    );
    const bytes = readExport(want);
    for (const name of ['auto.raw', 'named.raw'])
      assert.ok(readExport(join(d.images, name)).equals(bytes), name);
  });
});
