/**
 * vpc, vdi and qed under the agent's native engine (no qemu-storage-daemon):
 * shorthand exports with the format probed and given, read-only, serve what
 * `qemu-img convert -O raw` gives; a writable export over a probed vdi is not
 * served, and its status names the format.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { guest } from '../block/ro-formats.js';
import { convertToRaw, qsdAgentSetup, qsdPid, readExport } from '../engine/qsd-helpers.js';
import { until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { needTools, qemuImg } from '../helpers/tools.js';

interface Status {
  exports: { id: string; engine: string; state: string; reason: string }[];
}

function manifest(name: string, body: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n${body}`;
}

describe('vpc, vdi and qed under the native engine', { concurrency: false }, () => {
  test('shorthand exports (probed and explicit) serve qemu-img convert bytes; a writable one is refused naming the format', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    const { d, qsdDir, start } = qsdAgentSetup(t, 'native');
    const src = join(d.images, 'src.raw');
    writeFileSync(src, guest('sparse', 4 * 1024 * 1024, 77));
    const cases: [string, string, string[], boolean][] = [
      ['vpc', 'vpc', [], true],
      ['vpcf', 'vpc', ['-o', 'subformat=fixed'], false],
      ['vdi', 'vdi', ['-o', 'static=on'], true],
      ['qed', 'qed', [], true],
    ];
    let body = '  exports:\n';
    for (const [id, fmt, opts, probe] of cases) {
      const img = join(d.images, `${id}.img`);
      qemuImg('convert', '-f', 'raw', '-O', fmt, ...opts, src, img);
      const mp = { mountpoint: join(d.images, `${id}.raw`), 'create-mountpoint': true };
      if (probe) body += shorthand(id, img, mp);
      body += shorthand(`${id}-x`, img, { ...mp, mountpoint: join(d.images, `${id}-x.raw`), format: fmt });
    }
    const vdiW = join(d.images, 'w.vdi');
    qemuImg('convert', '-f', 'raw', '-O', 'vdi', src, vdiW);
    body += shorthand('w', vdiW, {
      mountpoint: join(d.images, 'w.raw'),
      'create-mountpoint': true,
      writable: true,
    });
    writeFileSync(join(d.manifests, 'formats.yaml'), manifest('formats', body));
    const agent = await start('native');
    const n = cases.length + cases.filter((c) => c[3]).length;
    const st = await until(
      'read-only exports ready, the writable one refused',
      async () => {
        const s = await agent.get<Status>('/status');
        const ready = s.exports.filter((e) => e.state === 'ready').length;
        const w = s.exports.find((e) => e.id === 'w');
        return ready === n && w && w.state !== 'ready' && /vdi/.test(w.reason) ? s : undefined;
      },
      20_000,
    );
    assert.ok(st.exports.every((e) => e.engine === 'native'));
    assert.match(st.exports.find((e) => e.id === 'w')!.reason, /reads only/);
    for (const [id, fmt, , probe] of cases) {
      const want = convertToRaw(join(d.images, `${id}.img`), join(d.dir, `${id}.out`), fmt);
      if (probe) assert.ok(readExport(join(d.images, `${id}.raw`)).equals(want), `${id} (probed)`);
      assert.ok(readExport(join(d.images, `${id}-x.raw`)).equals(want), `${id} (explicit)`);
    }
    assert.equal(qsdPid(qsdDir), undefined, 'no qemu-storage-daemon');
  });
});
