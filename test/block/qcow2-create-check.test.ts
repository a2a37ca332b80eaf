/**
 * `blkexport create` against qemu-img (check clean, info as asked, for every
 * option combination) and `blkexport check` against `qemu-img check` on
 * clean, leaky and corrupted images, with repair; a dirty lazy-refcount image
 * opened writable is rebuilt.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { BIN, needTools, qemuImg, qemuIo, run, tempDir } from '../helpers/tools.js';
import { createQcow2, K, M } from './images.js';

interface QemuCheck {
  corruptions?: number;
  leaks?: number;
  'leaks-fixed'?: number;
  'image-end-offset': number;
  'allocated-clusters': number;
  'total-clusters': number;
}

function qemuCheck(img: string): { status: number; json: QemuCheck } {
  const r = run('qemu-img', ['check', '--output=json', img]);
  return { status: r.status, json: JSON.parse(r.stdout) as QemuCheck };
}

function blkCheck(img: string, ...extra: string[]): { status: number; json: QemuCheck } {
  const r = run(BIN, ['check', '-o', 'json', ...extra, img]);
  assert.ok(r.stdout.startsWith('{'), `blkexport check printed: ${r.stdout}${r.stderr}`);
  return { status: r.status, json: JSON.parse(r.stdout) as QemuCheck };
}

/** Asserts both checkers give the same exit status and counters. */
function assertAgree(img: string, what: string): number {
  const q = qemuCheck(img);
  const b = blkCheck(img);
  assert.equal(b.status, q.status, `${what}: exit status`);
  // The same JSON, key order included.
  assert.equal(JSON.stringify(b.json), JSON.stringify(q.json), `${what}: JSON`);
  assert.equal(b.json.corruptions ?? 0, q.json.corruptions ?? 0, `${what}: corruptions`);
  assert.equal(b.json.leaks ?? 0, q.json.leaks ?? 0, `${what}: leaks`);
  assert.equal(b.json['image-end-offset'], q.json['image-end-offset'], `${what}: image end offset`);
  assert.equal(b.json['allocated-clusters'], q.json['allocated-clusters'], `${what}: allocated clusters`);
  assert.equal(b.json['total-clusters'], q.json['total-clusters'], `${what}: total clusters`);
  return q.status;
}

/** Sets the refcount of host cluster `c` (16-bit refcounts, first refcount block). */
function pokeRefcount(img: string, c: number, v: number): void {
  const b = readFileSync(img);
  const block = Number(b.readBigUInt64BE(Number(b.readBigUInt64BE(48))));
  b.writeUInt16BE(v, block + c * 2);
  writeFileSync(img, b);
}

describe('blkexport create and check', { concurrency: false }, () => {
  test('create: every option combination is clean and reads back as asked', (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.raw');
    writeFileSync(base, Buffer.alloc(3 * M + 512, 1));
    const combos: string[][] = [];
    for (const compat of ['0.10', '1.1']) {
      for (const cs of ['512', '64k', '2M']) {
        for (const bits of compat === '0.10' ? ['16'] : ['1', '16', '64']) {
          combos.push(['--compat', compat, '--cluster-size', cs, '--refcount-bits', bits]);
        }
      }
    }
    combos.push(['--extended-l2', '--cluster-size', '16k'], ['--extended-l2', '--refcount-bits', '2']);
    combos.push(
      ['--lazy-refcounts'],
      ['--backing', 'base.raw', '--backing-format', 'raw', '--cluster-size', '4k'],
    );
    let i = 0;
    for (const c of combos) {
      const img = join(dir, `c${i++}.qcow2`);
      const size = c.includes('--backing') ? [] : ['1G'];
      const r = run(BIN, ['create', '-q', '-f', 'qcow2', img, ...size, ...c]);
      assert.equal(r.status, 0, `${c.join(' ')}: ${r.stderr}`);
      assert.equal(run('qemu-img', ['check', img]).status, 0, `${c.join(' ')}: qemu-img check`);
      const info = JSON.parse(qemuImg('info', '--output=json', img)) as Record<string, unknown>;
      const data = (info['format-specific'] as { data: Record<string, unknown> }).data;
      const opt = (name: string, dflt: string) => (c.includes(name) ? c[c.indexOf(name) + 1]! : dflt);
      assert.equal(info['virtual-size'], c.includes('--backing') ? 3 * M + 512 : 1024 ** 3, c.join(' '));
      const cs = opt('--cluster-size', '64k');
      assert.equal(
        info['cluster-size'],
        { '512': 512, '4k': 4096, '16k': 16384, '64k': 65536, '2M': 2 * M }[cs],
      );
      assert.equal(data.compat, opt('--compat', '1.1'));
      assert.equal(data['refcount-bits'], Number(opt('--refcount-bits', '16')));
      if (data.compat === '1.1') {
        assert.equal(data['extended-l2'], c.includes('--extended-l2'));
        assert.equal(data['lazy-refcounts'], c.includes('--lazy-refcounts'));
      }
      if (c.includes('--backing')) {
        assert.equal(info['backing-filename'], 'base.raw');
        assert.equal(info['backing-filename-format'], 'raw');
        assert.equal(run('qemu-img', ['compare', img, base]).status, 0);
      }
    }
    // Refused combinations.
    for (const bad of [
      ['--compat', '0.10', '--refcount-bits', '8'],
      ['--extended-l2', '--cluster-size', '4k'],
      ['--cluster-size', '4M'],
      ['--backing', 'base.raw'],
    ]) {
      assert.equal(
        run(BIN, ['create', '-q', '-f', 'qcow2', join(dir, 'bad.qcow2'), '1M', ...bad]).status,
        1,
        bad.join(' '),
      );
    }
  });

  test('check agrees with qemu-img on clean, leaky and corrupted images; repair fixes them', (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const make = (name: string) => {
      const img = createQcow2(join(dir, name), 8 * M, {});
      qemuIo(
        '-f',
        'qcow2',
        '-c',
        'write -P 7 0 300k',
        '-c',
        'write -P 8 2M 64k',
        '-c',
        'write -c 4M 64k',
        img,
      );
      return img;
    };
    const clean = make('clean.qcow2');
    qemuImg('snapshot', '-c', 's', clean);
    qemuIo('-f', 'qcow2', '-c', 'write -P 9 0 64k', clean);
    assert.equal(assertAgree(clean, 'clean'), 0);

    const kinds: Record<string, string>[] = [
      { extended_l2: 'on', cluster_size: '32k' },
      { compat: '0.10' },
      { refcount_bits: '1', cluster_size: '512' },
      { lazy_refcounts: 'on', cluster_size: '4096' },
    ];
    kinds.forEach((opts, i) => {
      const img = createQcow2(join(dir, `kind${i}.qcow2`), 8 * M, opts);
      qemuIo(
        '-f',
        'qcow2',
        '-c',
        'write -P 1 1000 300k',
        '-c',
        'write -c 2M 64k',
        '-c',
        'write -z 4M 128k',
        '-c',
        'discard 1M 64k',
        '-c',
        'write 5M 64k',
        '-c',
        'write -z 5M 4k',
        img,
      );
      if (opts.refcount_bits !== '1') qemuImg('snapshot', '-c', 's', img);
      assert.equal(assertAgree(img, JSON.stringify(opts)), 0);
    });

    const leaky = make('leaky.qcow2');
    const end = qemuCheck(leaky).json['image-end-offset'] / (64 * K);
    pokeRefcount(leaky, 6, 3); // a data cluster counted too often (also a COPIED error)
    assert.equal(assertAgree(leaky, 'leak + COPIED'), 2);
    const leaky2 = make('leaky2.qcow2');
    const b = readFileSync(leaky2);
    writeFileSync(leaky2, Buffer.concat([b, Buffer.alloc(128 * K)]));
    pokeRefcount(leaky2, end, 1); // counted but unused
    pokeRefcount(leaky2, end + 1, 1);
    assert.equal(assertAgree(leaky2, 'leaks'), 3);
    const fixed = blkCheck(leaky2, '-r', 'leaks');
    assert.equal(fixed.status, 0);
    assert.equal(fixed.json['leaks-fixed'], 2);
    assert.equal(qemuCheck(leaky2).status, 0);

    const corrupt = make('corrupt.qcow2');
    pokeRefcount(corrupt, 5, 0); // a data cluster with refcount 0
    assert.equal(assertAgree(corrupt, 'corrupt'), 2);
    assert.equal(run(BIN, ['check', '-r', 'all', corrupt]).status, 0);
    assert.equal(qemuCheck(corrupt).status, 0);
    assert.equal(run(BIN, ['check', join(dir, 'missing.qcow2')]).status, 1);
  });

  test('a dirty lazy-refcount image is rebuilt when opened writable', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'lazy.qcow2'), 8 * M, { lazy_refcounts: 'on' });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 5 0 1M', '-c', 'flush', '-c', 'abort', img]);
    assert.equal(
      (JSON.parse(qemuImg('info', '--output=json', img)) as { 'dirty-flag': boolean })['dirty-flag'],
      true,
    );
    assert.equal(assertAgree(img, 'dirty'), 2);
    const o = await openImage({ filename: img, readOnly: false });
    await o.node.write(3 * M, Buffer.alloc(100 * K, 6));
    await o.close();
    assert.equal(
      (JSON.parse(qemuImg('info', '--output=json', img)) as { 'dirty-flag': boolean })['dirty-flag'],
      false,
    );
    assert.equal(qemuCheck(img).status, 0);
    const back = Buffer.alloc(M);
    const r = await openImage({ filename: img, readOnly: true });
    await r.node.read(0, back);
    await r.close();
    assert.ok(back.equals(Buffer.alloc(M, 5)));
  });
});
