/**
 * The passthrough decisions that need no mount: which nodes map to their
 * file at the same offsets, which export options refuse it, and the words
 * for each kernel answer (the paths a Linux 6.1 machine or an unprivileged
 * server takes, which this machine's kernel does not).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { openRawWindow } from '../../src/block/raw-window.js';
import { Errno } from '../../src/errors.js';
import {
  describePassthrough,
  identityFile,
  PASSTHROUGH_ENV,
  passthroughLogLine,
  passthroughRefused,
} from '../../src/export/fuse/passthrough.js';

test('a whole raw file maps to itself; a window of it does not', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-pts-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, 'disk.raw');
  writeFileSync(image, Buffer.alloc(1 << 20, 1));
  const img = await openImage({ filename: image, format: 'raw', readOnly: true });
  t.after(() => img.close());
  const whole = identityFile(img.node);
  assert.ok('fd' in whole && whole.fd >= 0);
  const file = img.node.children[0]!;
  const win = await openRawWindow(file, 4096, 8192, 'win');
  t.after(() => win.close());
  assert.match((identityFile(win) as { reason: string }).reason, /window/);
  const stacked = await openRawWindow(img.node, 0, 1 << 20, 'stacked');
  t.after(() => stacked.close());
  assert.deepEqual(identityFile(stacked), { reason: "the node is 'raw', not raw over a file" });
  assert.deepEqual(identityFile(file), { reason: "the node is 'file', not raw over a file" });
});

test('options: read-only and growable qualify, writable without growable does not, the variable turns it off', () => {
  assert.equal(passthroughRefused({ writable: false, growable: false }), undefined);
  assert.equal(passthroughRefused({ writable: true, growable: true }), undefined);
  assert.match(passthroughRefused({ writable: true, growable: false })!, /not growable/);
  const old = process.env[PASSTHROUGH_ENV];
  process.env[PASSTHROUGH_ENV] = 'off';
  try {
    assert.equal(passthroughRefused({ writable: false, growable: false }), `${PASSTHROUGH_ENV}=off`);
  } finally {
    if (old === undefined) delete process.env[PASSTHROUGH_ENV];
    else process.env[PASSTHROUGH_ENV] = old;
  }
});

test('kernel answers: an id is passthrough; not offered, EPERM and ELOOP fall back with their reason', () => {
  const info = { offered: true, negotiated: true, backingId: 0, errno: 0 };
  assert.deepEqual(describePassthrough({ ...info, backingId: 3 }), { active: true, backingId: 3 });
  const notOffered = describePassthrough({
    ...info,
    offered: false,
    negotiated: false,
    errno: Errno.EOPNOTSUPP,
  });
  assert.equal(notOffered.active, false);
  assert.match(
    passthroughLogLine(notOffered),
    /not used: the kernel does not offer FUSE passthrough \(Linux 6\.9/,
  );
  const eperm = describePassthrough({ ...info, errno: Errno.EPERM });
  assert.deepEqual(eperm, {
    active: false,
    why: 'kernel',
    reason: 'registering the image file needs CAP_SYS_ADMIN (run as root)',
  });
  assert.match(
    passthroughLogLine(describePassthrough({ ...info, errno: Errno.ELOOP })),
    /stacked filesystem/,
  );
  assert.match(passthroughLogLine({ active: true, backingId: 1 }), /the kernel serves reads and writes/);
});
