/**
 * The `partition` filter driver over real images: partitioned raw disks made
 * by sfdisk, turned into qcow2 by qemu-img, opened as file → qcow2 →
 * partition. Bytes, writes, block status and host mapping are checked
 * against qemu-img's own view of the image (convert -O raw, map).
 */
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { type BlockGraph, type BlockNode, openGraph, openNode } from '../../src/block/index.js';
import { checkWindow } from '../../src/block/window.js';
import { BlkError, isBlkError } from '../../src/errors.js';
import { needTools, qemuImg, randomBytes, runOk, seededRandom, tempDir } from '../helpers/tools.js';
import { convertToRaw, M } from './images.js';
import { readViaMap } from './read-via-map.js';

const S = 512;

/** MBR: primary 1 and logicals 5, 6 start on sectors that are not cluster-aligned. */
const MBR_SCRIPT =
  'label: dos\nstart=2049, size=6000, type=83\nstart=8192, type=5\n' +
  'start=10241, size=8000, type=83\nstart=20480, size=8192, type=c\n';
/** GPT: partition 2 starts on an odd sector. */
const GPT_SCRIPT = 'label: gpt\nstart=2048, size=4000\nstart=6145, size=10000\n';

interface Disk {
  dir: string;
  /** The partitioned raw disk the qcow2 was made from (the expected guest bytes). */
  raw: string;
  qcow2: string;
  /** Partition windows as sfdisk reports them, by number. */
  parts: Map<number, { offset: number; size: number }>;
}

/**
 * A 32 MiB disk partitioned by sfdisk, each partition holding seeded data in
 * its first and last quarter and zeroes in between (so the qcow2 made from it
 * by qemu-img has both allocated and unallocated clusters inside partitions).
 */
function makeDisk(t: TestContext, script: string, seed: number): Disk {
  const dir = tempDir(t);
  const raw = join(dir, 'disk.img');
  writeFileSync(raw, '');
  truncateSync(raw, 32 * M);
  runOk('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', raw], { input: script });
  const table = JSON.parse(runOk('sfdisk', ['-J', raw])) as {
    partitiontable: { partitions: { node: string; start: number; size: number; type: string }[] };
  };
  const parts = new Map<number, { offset: number; size: number }>();
  for (const p of table.partitiontable.partitions) {
    if (p.type === '5') continue; // the extended container
    parts.set(Number(p.node.slice(p.node.lastIndexOf('disk.img') + 'disk.img'.length)), {
      offset: p.start * S,
      size: p.size * S,
    });
  }
  const buf = readFileSync(raw);
  const rand = seededRandom(seed);
  for (const { offset, size } of parts.values()) {
    const q = Math.floor(size / 4);
    randomBytes(rand, q).copy(buf, offset);
    randomBytes(rand, q).copy(buf, offset + size - q);
  }
  writeFileSync(raw, buf);
  const qcow2 = join(dir, 'disk.qcow2');
  qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
  return { dir, raw, qcow2, parts };
}

/** Opens file → qcow2 → partition `number` as named nodes; the graph is closed when the test ends. */
async function openPartition(
  t: TestContext,
  disk: Disk,
  number: number,
  readOnly = true,
): Promise<{ graph: BlockGraph; part: BlockNode; fmt: BlockNode }> {
  const graph = await openGraph(
    [
      { driver: 'file', nodeName: 'prot', filename: disk.qcow2, readOnly },
      { driver: 'qcow2', nodeName: 'fmt', file: 'prot', readOnly },
      { driver: 'partition', nodeName: 'part', file: 'fmt', number, readOnly },
    ],
    { allowedRoots: [disk.dir] },
  );
  t.after(() => graph.close());
  return { graph, part: graph.get('part')!, fmt: graph.get('fmt')! };
}

async function readAll(node: BlockNode): Promise<Buffer> {
  const buf = Buffer.alloc(node.length());
  await node.read(0, buf);
  return buf;
}

/** The guest bytes of the qcow2 as qemu-img sees them. */
function qemuBytes(disk: Disk, name: string): Buffer {
  return readFileSync(convertToRaw(disk.qcow2, join(disk.dir, name)));
}

function code(e: unknown): string {
  return isBlkError(e) ? e.code : String(e);
}

describe('partition filter over file → qcow2', () => {
  it('MBR primary and logical partitions read the same bytes as qemu-img convert', async (t) => {
    if (!needTools(t, 'qemu-img', 'sfdisk')) return;
    const disk = makeDisk(t, MBR_SCRIPT, 1);
    const whole = qemuBytes(disk, 'out.raw');
    assert.ok(whole.equals(readFileSync(disk.raw)), 'qemu-img convert round-trips the disk');
    for (const n of [1, 5, 6]) {
      const { graph, part } = await openPartition(t, disk, n);
      const p = disk.parts.get(n)!;
      assert.equal(part.driver, 'partition');
      assert.equal(part.role, 'filter');
      assert.equal(part.length(), p.size);
      assert.deepEqual(part.resolved?.(), { offset: p.offset, size: p.size, scheme: 'mbr' });
      const got = await readAll(part);
      assert.ok(got.equals(whole.subarray(p.offset, p.offset + p.size)), `partition ${n} bytes differ`);
      // A read that crosses the window's end is refused, not served from the next partition.
      await assert.rejects(part.read(p.size - 10, Buffer.alloc(11)), (e) => code(e) === 'OUT_OF_RANGE');
      await graph.close();
    }
  });

  it('a GPT partition at an odd sector reads the same bytes as qemu-img convert (inline children)', async (t) => {
    if (!needTools(t, 'qemu-img', 'sfdisk')) return;
    const disk = makeDisk(t, GPT_SCRIPT, 2);
    const whole = qemuBytes(disk, 'out.raw');
    const { node, graph } = await openNode(
      {
        driver: 'partition',
        nodeName: 'gpt2',
        number: 2,
        readOnly: true,
        file: { driver: 'qcow2', file: { driver: 'file', filename: disk.qcow2 } },
      },
      { allowedRoots: [disk.dir] },
    );
    t.after(() => graph.close());
    const p = disk.parts.get(2)!;
    assert.equal(p.offset, 6145 * S);
    assert.deepEqual(node.resolved?.(), { offset: p.offset, size: p.size, scheme: 'gpt' });
    assert.equal(node.filename, disk.qcow2);
    assert.ok((await readAll(node)).equals(whole.subarray(p.offset, p.offset + p.size)));
  });

  it('writes land at the partition offset of the image and nowhere else', async (t) => {
    if (!needTools(t, 'qemu-img', 'sfdisk')) return;
    const disk = makeDisk(t, MBR_SCRIPT, 3);
    const expected = readFileSync(disk.raw);
    const p = disk.parts.get(5)!;
    const { graph, part } = await openPartition(t, disk, 5, false);
    assert.equal(part.capabilities().write, true);
    const rand = seededRandom(33);
    const edits: [number, Buffer][] = [
      [0, randomBytes(rand, 777)], // the first byte of the partition
      [123_457, randomBytes(rand, 70_000)], // crosses qcow2 clusters, into the unallocated middle
      [p.size - 513, randomBytes(rand, 513)], // the last byte of the partition
    ];
    for (const [off, data] of edits) {
      await part.write(off, data);
      data.copy(expected, p.offset + off);
    }
    await part.writeZeroes(2 * M, 100_000, { mayUnmap: true });
    expected.fill(0, p.offset + 2 * M, p.offset + 2 * M + 100_000);
    await assert.rejects(part.write(p.size - 1, Buffer.alloc(2)), (e) => code(e) === 'OUT_OF_RANGE');
    // read-only is mutable in place: the filter, the qcow2 and the file change together.
    await part.reopen({ readOnly: true });
    assert.equal(graph.get('prot')!.readOnly, true);
    await assert.rejects(part.write(0, Buffer.alloc(1)), (e) => code(e) === 'READ_ONLY');
    await part.reopen({ readOnly: false });
    await part.flush();
    await graph.close();

    qemuImg('check', '-q', disk.qcow2);
    assert.ok(qemuBytes(disk, 'after.raw').equals(expected), 'image differs outside the expected edits');
  });

  it('truncate is refused and not offered: a partition is a fixed window', async (t) => {
    if (!needTools(t, 'qemu-img', 'sfdisk')) return;
    const disk = makeDisk(t, MBR_SCRIPT, 4);
    const { part, fmt } = await openPartition(t, disk, 1, false);
    assert.equal(fmt.capabilities().truncate, true);
    assert.equal(part.capabilities().truncate, false);
    await assert.rejects(part.truncate(M), (e: unknown) => {
      assert.ok(e instanceof BlkError);
      assert.equal(e.code, 'NOT_SUPPORTED');
      assert.match(e.message, /partition 1 is a fixed window and cannot be resized/);
      return true;
    });
    assert.equal(part.length(), disk.parts.get(1)!.size);
    assert.equal(fmt.length(), 32 * M);
  });

  it('a missing partition, the extended container and a missing number are refused, naming the image', async (t) => {
    if (!needTools(t, 'qemu-img', 'sfdisk')) return;
    const disk = makeDisk(t, MBR_SCRIPT, 5);
    const open = (number: number | undefined) =>
      openGraph(
        [
          { driver: 'file', nodeName: 'prot', filename: disk.qcow2, readOnly: true },
          { driver: 'qcow2', nodeName: 'fmt', file: 'prot', readOnly: true },
          { driver: 'partition', nodeName: 'part', file: 'fmt', readOnly: true, number },
        ],
        { allowedRoots: [disk.dir] },
      );
    const refused = async (number: number | undefined, c: string, re: RegExp) => {
      await assert.rejects(open(number), (e: unknown) => {
        assert.ok(e instanceof BlkError, String(e));
        assert.equal(e.code, c, e.format());
        assert.match(e.format(), re);
        assert.ok(e.format().startsWith(`${disk.qcow2}: `), e.format());
        return true;
      });
    };
    await refused(3, 'OUT_OF_RANGE', /partition 3 does not exist \(MBR has partitions 1, 5, 6\)/);
    await refused(2, 'OUT_OF_RANGE', /partition 2 is the MBR extended partition/);
    await refused(0, 'USAGE', /partition number must be a positive integer, not 0/);
    await refused(undefined, 'USAGE', /driver partition needs a partition 'number'/);
  });

  it('a disk without a partition table is refused with the parser message', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const qcow2 = join(dir, 'blank.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', qcow2, String(4 * M));
    await assert.rejects(
      openNode(
        {
          driver: 'partition',
          number: 1,
          file: { driver: 'qcow2', file: { driver: 'file', filename: qcow2 } },
        },
        { allowedRoots: [dir] },
      ),
      (e: unknown) => isBlkError(e) && e.code === 'IMAGE_INVALID' && /no partition table/.test(e.message),
    );
  });

  it('blockStatus and mapHostCached are shifted by the partition offset', async (t) => {
    if (!needTools(t, 'qemu-img', 'sfdisk')) return;
    const disk = makeDisk(t, MBR_SCRIPT, 6);
    const map = JSON.parse(qemuImg('map', '--output=json', disk.qcow2)) as {
      start: number;
      length: number;
      data: boolean;
      zero: boolean;
    }[];
    for (const n of [1, 5]) {
      const { graph, part, fmt } = await openPartition(t, disk, n);
      const p = disk.parts.get(n)!;
      // Walk the partition: extents are contiguous, start where asked, and agree with qemu-img map.
      const kinds = new Set<boolean>();
      for (let off = 0; off < p.size; ) {
        const e = await part.blockStatus(off, p.size - off);
        assert.equal(e.offset, off);
        assert.ok(e.length > 0 && off + e.length <= p.size);
        const c = await fmt.blockStatus(p.offset + off, p.size - off);
        assert.deepEqual(e, { ...c, offset: off });
        for (const m of map) {
          if (m.start + m.length <= p.offset + off || m.start >= p.offset + off + e.length) continue;
          assert.equal(m.data, e.data, `partition ${n} at ${off}: data differs from qemu-img map`);
          assert.equal(m.zero, e.zero, `partition ${n} at ${off}: zero differs from qemu-img map`);
        }
        kinds.add(e.data);
        off += e.length;
      }
      assert.deepEqual([...kinds].sort(), [false, true], 'both data and holes inside the partition');
      await assert.rejects(part.blockStatus(p.size, 1), (e) => code(e) === 'OUT_OF_RANGE');

      // Host extents: what the fast path would read equals what the node reads.
      const whole = await readAll(part); // also warms the L2 cache
      const rand = seededRandom(60 + n);
      let mapped = 0;
      for (let i = 0; i < 200; i++) {
        const off = Math.floor(rand() * p.size);
        const len = Math.max(1, Math.min(p.size - off, 1 + Math.floor(rand() * 200_000)));
        const own = part.mapHostCached?.(off, len) ?? null;
        assert.deepEqual(own, fmt.mapHostCached?.(p.offset + off, len) ?? null);
        const got = await readViaMap(part, off, len);
        if (!got) continue;
        mapped++;
        assert.ok(got.equals(whole.subarray(off, off + len)), `mapped bytes differ at ${off}+${len}`);
      }
      assert.ok(mapped > 100, `only ${mapped} of 200 ranges were mappable`);
      assert.equal(part.mapHostCached?.(p.size - 10, 11), null, 'a range past the window is not mapped');
      await graph.close();
    }
  });
});

describe('window bounds', () => {
  const child = { length: () => 4096, filename: '/images/d.img' } as unknown as BlockNode;

  it('a window past the end of its child is refused at open, naming the child', () => {
    assert.doesNotThrow(() => checkWindow(child, 512, 3584, 'partition 1'));
    for (const [off, size, field] of [
      [512, 3585, 'size'],
      [4097, 0, 'offset'],
      [-1, 10, 'offset'],
      [0, Number.NaN, 'size'],
    ] as const) {
      assert.throws(
        () => checkWindow(child, off, size, 'partition 1'),
        (e: unknown) =>
          e instanceof BlkError &&
          e.code === 'OUT_OF_RANGE' &&
          e.place.field === field &&
          e.format().startsWith('/images/d.img: partition 1 '),
      );
    }
  });
});
