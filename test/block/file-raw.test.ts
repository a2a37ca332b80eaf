import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openGraph, openImage, openRawWindow, probeBytes } from '../../src/block/index.js';
import { isBlkError } from '../../src/errors.js';
import { randomBytes, seededRandom, tempDir } from '../helpers/tools.js';

function code(e: unknown): string {
  return isBlkError(e) ? e.code : String(e);
}

test('file + raw: reads, writes, windows and bounds', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'disk.raw');
  const data = randomBytes(seededRandom(1), 1024 * 1024 + 7);
  writeFileSync(path, data);

  const img = await openImage({ filename: path, readOnly: true });
  t.after(() => img.close());
  assert.equal(img.format, 'raw');
  assert.equal(img.node.length(), data.length);
  const buf = Buffer.alloc(1000);
  await img.node.read(data.length - 1000, buf);
  assert.deepEqual(buf, data.subarray(data.length - 1000));
  await assert.rejects(img.node.read(data.length - 10, Buffer.alloc(11)), (e) => code(e) === 'OUT_OF_RANGE');
  await assert.rejects(img.node.write(0, Buffer.alloc(1)), (e) => code(e) === 'READ_ONLY');
  assert.equal(img.node.capabilities().write, false);

  const win = await openRawWindow(img.node, 4096, 8192, 'win');
  assert.equal(win.length(), 8192);
  const wb = Buffer.alloc(8192);
  await win.read(0, wb);
  assert.deepEqual(wb, data.subarray(4096, 4096 + 8192));
  await assert.rejects(win.read(8000, Buffer.alloc(200)), (e) => code(e) === 'OUT_OF_RANGE');
});

test('openGraph: named nodes, windows, writes, reopen, close order', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'disk.raw');
  writeFileSync(path, Buffer.alloc(65536, 1));
  const g = await openGraph(
    [
      { driver: 'raw', nodeName: 'fmt', file: 'prot', offset: 512, size: 4096 },
      { driver: 'file', nodeName: 'prot', filename: path },
    ],
    { allowedRoots: [dir] },
  );
  t.after(() => g.close());
  const fmt = g.get('fmt')!;
  assert.equal(fmt.length(), 4096);
  await fmt.write(0, Buffer.alloc(10, 7));
  await fmt.writeZeroes(10, 100, { mayUnmap: false });
  await fmt.flush();
  const b = Buffer.alloc(120);
  await g.get('prot')!.read(512, b);
  assert.deepEqual(b, Buffer.concat([Buffer.alloc(10, 7), Buffer.alloc(100), Buffer.alloc(10, 1)]));
  await fmt.reopen({ readOnly: true });
  assert.equal(fmt.readOnly, true);
  assert.equal(g.get('prot')!.readOnly, true);
  await assert.rejects(fmt.write(0, Buffer.alloc(1)), (e) => code(e) === 'READ_ONLY');
  await fmt.reopen({ readOnly: false });
  await fmt.write(0, Buffer.alloc(1, 9));
  await assert.rejects(fmt.truncate(100), (e) => code(e) === 'NOT_SUPPORTED');
  await assert.rejects(
    openGraph([{ driver: 'raw', nodeName: 'a', file: 'missing' }], { allowedRoots: [dir] }),
    (e) => code(e) === 'IMAGE_INVALID',
  );
});

test('probe: qcow2, raw, vpc, vdi, qed, vmdk, vhdx, and refused formats', () => {
  const pad = (s: string) => Buffer.concat([Buffer.from(s, 'latin1'), Buffer.alloc(512)]);
  const q = pad('QFI\xfb\0\0\0\x03');
  assert.equal(probeBytes(q), 'qcow2');
  assert.equal(probeBytes(Buffer.alloc(512)), 'raw');
  assert.equal(probeBytes(Buffer.alloc(0)), 'raw');
  assert.equal(probeBytes(pad('vhdxfile')), 'vhdx');
  const vdi = Buffer.alloc(512);
  vdi.writeUInt32LE(0xbeda107f, 0x40);
  assert.equal(probeBytes(vdi), 'vdi');
  assert.equal(probeBytes(pad('conectix')), 'vpc');
  assert.equal(probeBytes(pad('QED\0')), 'qed');
  assert.equal(probeBytes(pad('KDMV')), 'vmdk');
  assert.equal(probeBytes(pad('# Disk DescriptorFile')), 'vmdk');
  const cases: [Buffer, string][] = [
    [pad('QFI\xfb\0\0\0\x01'), 'qcow (version 1)'],
    [pad('LUKS\xba\xbe'), 'luks'],
  ];
  for (const [buf, name] of cases) {
    assert.throws(
      () => probeBytes(buf, '/x'),
      (e) =>
        code(e) === 'IMAGE_UNSUPPORTED' && (e as Error).message === `format ${name} is not supported yet`,
    );
  }
});

test('a confined file node refuses an fd that reaches outside its roots', async (t) => {
  const dir = tempDir(t);
  const inside = join(dir, 'in');
  const path = join(dir, 'disk.raw');
  writeFileSync(path, Buffer.alloc(512));
  mkdirSync(inside);
  await assert.rejects(
    openGraph([{ driver: 'file', nodeName: 'f', filename: path, readOnly: true, confineTo: [inside] }], {
      allowedRoots: [inside],
    }),
    (e) => code(e) === 'BACKING_POLICY',
  );
  const g = await openGraph(
    [{ driver: 'file', nodeName: 'f', filename: path, readOnly: true, confineTo: [dir] }],
    {
      allowedRoots: [dir],
    },
  );
  await g.close();
});
