import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { describe, it } from 'node:test';
import { crc32 } from 'node:zlib';
import {
  findPartition,
  listPartitions,
  type Partition,
  type ReadAt,
} from '../../src/block/partition/index.js';
import { BlkError } from '../../src/errors.js';
import { needTools, runOk, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const LINUX = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';

/** Flips the bits of `mask` in byte `at` of `buf`. */
function flip(buf: Buffer, at: number, mask: number): void {
  buf[at] = buf[at]! ^ mask;
}

/** A disk held in memory (images here are a few MiB), with a read function like a node's. */
function memDisk(buf: Buffer): { read: ReadAt; size: number } {
  return {
    size: buf.length,
    read: async (offset, length) => {
      assert.ok(offset >= 0 && offset + length <= buf.length, `read ${offset}+${length} outside the disk`);
      return Buffer.from(buf.subarray(offset, offset + length));
    },
  };
}

function fileDisk(path: string): { read: ReadAt; size: number; buf: Buffer } {
  const buf = readFileSync(path);
  return { ...memDisk(buf), buf };
}

type Expected = Omit<Partition, 'scheme'>;

/** sfdisk's view of the image's data partitions (the MBR extended container left out). */
function sfdiskPartitions(path: string): Expected[] {
  const json = JSON.parse(runOk('sfdisk', ['-J', path])) as {
    partitiontable: { partitions?: { node: string; start: number; size: number; type: string }[] };
  };
  const name = basename(path);
  return (json.partitiontable.partitions ?? [])
    .filter((p) => !['5', 'f', '85'].includes(p.type))
    .map((p) => ({
      index: Number(p.node.slice(p.node.lastIndexOf(name) + name.length)),
      offset: p.start * 512,
      size: p.size * 512,
      type: p.type,
    }));
}

function strip(parts: Partition[]): Expected[] {
  return parts.map(({ index, offset, size, type }) => ({ index, offset, size, type }));
}

function makeImage(dir: string, name: string, size: number, sfdiskScript: string): string {
  const path = join(dir, name);
  writeFileSync(path, '');
  truncateSync(path, size);
  runOk('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', path], { input: sfdiskScript });
  return path;
}

/** Asserts that `p` rejects with a BlkError of `code` whose formatted text names `source` and matches `re`. */
async function rejectsWith(p: Promise<unknown>, code: string, re: RegExp, source: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof BlkError, `not a BlkError: ${String(e)}`);
    assert.equal(e.code, code, e.format());
    assert.match(e.format(), re);
    assert.ok(e.format().startsWith(`${source}: `), e.format());
    return true;
  });
}

/** Recomputes the CRCs of the GPT header at `lba` (after the test patched its entries or fields). */
function fixGptCrcs(buf: Buffer, lba: number): void {
  const h = lba * 512;
  const entriesAt = Number(buf.readBigUInt64LE(h + 72)) * 512;
  const arrayBytes = buf.readUInt32LE(h + 80) * buf.readUInt32LE(h + 84);
  buf.writeUInt32LE(crc32(buf.subarray(entriesAt, entriesAt + arrayBytes)), h + 88);
  const size = buf.readUInt32LE(h + 12);
  buf.writeUInt32LE(0, h + 16);
  buf.writeUInt32LE(crc32(buf.subarray(h, h + size)), h + 16);
}

/** Writes one 16-byte MBR/EBR entry into `sector` (a 512-byte view). */
function putEntry(sector: Buffer, slot: number, type: number, start: number, sectors: number): void {
  const at = 446 + slot * 16;
  sector[at + 4] = type;
  sector.writeUInt32LE(start, at + 8);
  sector.writeUInt32LE(sectors, at + 12);
  sector[510] = 0x55;
  sector[511] = 0xaa;
}

describe('MBR partition tables made by sfdisk and parted', () => {
  it('primary partitions match sfdisk -J, empty slots keep their numbers', async (t) => {
    if (!needTools(t, 'sfdisk')) return;
    const dir = tempDir(t);
    const img = makeImage(
      dir,
      'dos.img',
      16 * MiB,
      'label: dos\n1: start=2048, size=4096, type=83\n2: start=6144, size=2048, type=c\n4: start=10240, type=82\n',
    );
    const disk = fileDisk(img);
    const parts = await listPartitions(disk.read, disk.size, img);
    assert.deepEqual(strip(parts), sfdiskPartitions(img));
    assert.deepEqual(
      parts.map((p) => p.index),
      [1, 2, 4],
    );
    assert.ok(parts.every((p) => p.scheme === 'mbr'));
    const p4 = await findPartition(disk.read, disk.size, 4, img);
    assert.deepEqual(p4, {
      index: 4,
      offset: 10240 * 512,
      size: 16 * MiB - 10240 * 512,
      type: '82',
      scheme: 'mbr',
    });
  });

  it('reads the msdos label of the seed example (parted mkpart primary 2048s 100%)', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const dir = tempDir(t);
    const img = join(dir, 'seed.img');
    writeFileSync(img, '');
    truncateSync(img, 32 * MiB);
    runOk('parted', ['-s', img, 'mklabel msdos', 'mkpart primary ext4 2048s 100%']);
    const disk = fileDisk(img);
    const p1 = await findPartition(disk.read, disk.size, 1, img);
    assert.deepEqual(strip([p1]), sfdiskPartitions(img));
    assert.equal(p1.offset, 2048 * 512);
  });

  it('logical partitions of an extended partition are numbered 5+ along the EBR chain', async (t) => {
    if (!needTools(t, 'sfdisk')) return;
    const dir = tempDir(t);
    const img = makeImage(
      dir,
      'ext.img',
      32 * MiB,
      'label: dos\nstart=2048, size=4096, type=83\nstart=8192, type=5\n' +
        'start=10240, size=4096, type=83\nstart=16384, size=2048, type=82\nstart=20480, size=8192, type=c\n',
    );
    const disk = fileDisk(img);
    const parts = await listPartitions(disk.read, disk.size, img);
    const expected = sfdiskPartitions(img);
    assert.deepEqual(
      expected.map((p) => p.index),
      [1, 5, 6, 7],
    );
    assert.deepEqual(strip(parts), expected);
    const p6 = await findPartition(disk.read, disk.size, 6, img);
    assert.deepEqual(strip([p6]), [expected[2]]);
    await rejectsWith(findPartition(disk.read, disk.size, 2, img), 'OUT_OF_RANGE', /extended partition/, img);
  });

  it('a missing partition number is refused, naming the partitions that exist', async (t) => {
    if (!needTools(t, 'sfdisk')) return;
    const dir = tempDir(t);
    const img = makeImage(dir, 'two.img', 8 * MiB, 'label: dos\nsize=2048\nsize=2048\n');
    const disk = fileDisk(img);
    await rejectsWith(
      findPartition(disk.read, disk.size, 3, img),
      'OUT_OF_RANGE',
      /partition 3 does not exist \(MBR has partitions 1, 2\)/,
      img,
    );
    await rejectsWith(findPartition(disk.read, disk.size, 0, img), 'USAGE', /positive integer/, img);
  });

  it('a partition beyond the end of the disk is refused', async (t) => {
    if (!needTools(t, 'sfdisk')) return;
    const dir = tempDir(t);
    const img = makeImage(dir, 'cut.img', 32 * MiB, 'label: dos\nsize=4096\nstart=8192\n');
    truncateSync(img, 16 * MiB);
    const disk = fileDisk(img);
    await rejectsWith(
      listPartitions(disk.read, disk.size, img),
      'IMAGE_CORRUPT',
      /beyond the end of the disk/,
      img,
    );
    // Even asking for the healthy partition 1 refuses the table: it is inconsistent as a whole.
    await rejectsWith(findPartition(disk.read, disk.size, 1, img), 'IMAGE_CORRUPT', /partition 2/, img);
  });
});

describe('GPT partition tables made by parted and sfdisk', () => {
  function makeGpt(dir: string): string {
    const img = join(dir, 'gpt.img');
    writeFileSync(img, '');
    truncateSync(img, 32 * MiB);
    runOk('parted', [
      '-s',
      img,
      'mklabel gpt',
      'mkpart boot fat32 1MiB 5MiB',
      'set 1 esp on',
      'mkpart root ext4 5MiB 20MiB',
      'mkpart swap linux-swap 20MiB 24MiB',
      'mkpart data ext4 24MiB 31MiB',
    ]);
    return img;
  }

  it('several partitions match sfdisk -J, type GUIDs included', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    const disk = fileDisk(img);
    const parts = await listPartitions(disk.read, disk.size, img);
    assert.equal(parts.length, 4);
    assert.deepEqual(strip(parts), sfdiskPartitions(img));
    assert.ok(parts.every((p) => p.scheme === 'gpt'));
    assert.equal(parts[0]!.type, 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B');
    assert.equal(parts[1]!.type, LINUX);
  });

  it('numbers by entry slot: a deleted partition leaves a gap and is reported missing', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    runOk('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', '--delete', img, '2']);
    const disk = fileDisk(img);
    const parts = await listPartitions(disk.read, disk.size, img);
    assert.deepEqual(
      parts.map((p) => p.index),
      [1, 3, 4],
    );
    assert.deepEqual(strip(parts), sfdiskPartitions(img));
    await rejectsWith(
      findPartition(disk.read, disk.size, 2, img),
      'OUT_OF_RANGE',
      /partition 2 does not exist \(GPT has partitions 1, 3, 4\)/,
      img,
    );
  });

  it('a primary header with a bad CRC falls back to the backup GPT at the last sector', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    const good = await listPartitions(fileDisk(img).read, 32 * MiB, img);
    const disk = fileDisk(img);
    flip(disk.buf, 512 + 56, 0xff); // a byte of the disk GUID: the header CRC no longer matches
    assert.deepEqual(await listPartitions(disk.read, disk.size, img), good);
    // sfdisk agrees that the table is still readable (it uses the backup too).
    writeFileSync(img, disk.buf);
    assert.deepEqual(strip(good), sfdiskPartitions(img));
  });

  it('a primary entry array with a bad CRC falls back to the backup; both bad is refused', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    const disk = fileDisk(img);
    const good = await listPartitions(disk.read, disk.size, img);
    flip(disk.buf, 1024 + 40, 0x01); // the first entry's ending LBA in the primary array
    assert.deepEqual(await listPartitions(disk.read, disk.size, img), good);
    const sectors = disk.size / 512;
    flip(disk.buf, (sectors - 1) * 512 + 16, 0x01); // the backup header's CRC
    await rejectsWith(
      findPartition(disk.read, disk.size, 1, img),
      'IMAGE_CORRUPT',
      /no usable GPT: primary GPT partition entry array CRC32 mismatch; backup GPT header CRC32 mismatch/,
      img,
    );
  });

  it('a GPT partition beyond the end of the disk is refused even with valid CRCs', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    const disk = fileDisk(img);
    const sectors = disk.size / 512;
    for (const lba of [1, sectors - 1]) {
      const entries = Number(disk.buf.readBigUInt64LE(lba * 512 + 72)) * 512;
      disk.buf.writeBigUInt64LE(BigInt(sectors + 100), entries + 3 * 128 + 40); // partition 4 ends past the disk
      fixGptCrcs(disk.buf, lba);
    }
    await rejectsWith(
      listPartitions(disk.read, disk.size, img),
      'IMAGE_CORRUPT',
      /GPT partition 4 .* beyond the end of the disk/,
      img,
    );
  });

  it('a truncated GPT disk is refused', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    truncateSync(img, 16 * MiB);
    const disk = fileDisk(img);
    await rejectsWith(
      listPartitions(disk.read, disk.size, img),
      'IMAGE_CORRUPT',
      /beyond the end of the disk/,
      img,
    );
  });

  it('overlapping GPT partitions are refused', async (t) => {
    if (!needTools(t, 'parted', 'sfdisk')) return;
    const img = makeGpt(tempDir(t));
    const disk = fileDisk(img);
    for (const lba of [1, disk.size / 512 - 1]) {
      const entries = Number(disk.buf.readBigUInt64LE(lba * 512 + 72)) * 512;
      disk.buf.writeBigUInt64LE(BigInt(3 * 2048), entries + 1 * 128 + 32); // partition 2 now starts at 3 MiB, inside partition 1
      fixGptCrcs(disk.buf, lba);
    }
    await rejectsWith(
      listPartitions(disk.read, disk.size, img),
      'IMAGE_CORRUPT',
      /partitions 1 and 2 overlap/,
      img,
    );
  });
});

describe('hostile and malformed tables (synthetic)', () => {
  const SRC = '/images/evil.img';

  it('a disk without a partition table is refused', async () => {
    const disk = memDisk(Buffer.alloc(MiB));
    await rejectsWith(listPartitions(disk.read, disk.size, SRC), 'IMAGE_INVALID', /no partition table/, SRC);
    const tiny = memDisk(Buffer.alloc(100));
    await rejectsWith(
      listPartitions(tiny.read, tiny.size, SRC),
      'IMAGE_INVALID',
      /smaller than one sector/,
      SRC,
    );
  });

  it('a filesystem boot sector (55AA but invalid boot flags) is not a partition table', async () => {
    const buf = Buffer.alloc(MiB);
    putEntry(buf, 0, 0x83, 2048, 100);
    buf[446] = 0x12;
    const disk = memDisk(buf);
    await rejectsWith(listPartitions(disk.read, disk.size, SRC), 'IMAGE_INVALID', /boot flags/, SRC);
  });

  it('overlapping primary partitions are refused', async () => {
    const buf = Buffer.alloc(MiB);
    putEntry(buf, 0, 0x83, 64, 512);
    putEntry(buf, 1, 0x83, 500, 100);
    const disk = memDisk(buf);
    await rejectsWith(
      listPartitions(disk.read, disk.size, SRC),
      'IMAGE_CORRUPT',
      /partitions 1 and 2 overlap/,
      SRC,
    );
  });

  it('a partition starting on the MBR itself is refused', async () => {
    const buf = Buffer.alloc(MiB);
    putEntry(buf, 0, 0x83, 0, 100);
    const disk = memDisk(buf);
    await rejectsWith(listPartitions(disk.read, disk.size, SRC), 'IMAGE_CORRUPT', /sector 0/, SRC);
  });

  it('an EBR chain that loops is refused instead of spinning', async () => {
    const buf = Buffer.alloc(MiB);
    putEntry(buf, 0, 0x05, 64, 1024);
    const ebr1 = buf.subarray(64 * 512, 65 * 512);
    putEntry(ebr1, 0, 0x83, 1, 10);
    putEntry(ebr1, 1, 0x05, 100, 20); // next EBR at 64+100
    const ebr2 = buf.subarray(164 * 512, 165 * 512);
    putEntry(ebr2, 0, 0x83, 1, 10);
    putEntry(ebr2, 1, 0x05, 1, 20); // relative 1 → sector 65: a fresh EBR...
    const ebr3 = buf.subarray(65 * 512, 66 * 512);
    putEntry(ebr3, 1, 0x05, 100, 20); // ...that links back to sector 164
    const disk = memDisk(buf);
    await rejectsWith(
      listPartitions(disk.read, disk.size, SRC),
      'IMAGE_CORRUPT',
      /loops back to sector 164/,
      SRC,
    );
  });

  it('a logical partition outside its extended partition is refused', async () => {
    const buf = Buffer.alloc(MiB);
    putEntry(buf, 0, 0x05, 64, 128);
    putEntry(buf.subarray(64 * 512, 65 * 512), 0, 0x83, 1, 500);
    const disk = memDisk(buf);
    await rejectsWith(
      listPartitions(disk.read, disk.size, SRC),
      'IMAGE_CORRUPT',
      /logical partition 5 .* outside the extended partition/,
      SRC,
    );
  });

  it('a GPT with an absurd entry count is refused without reading it', async () => {
    const buf = Buffer.alloc(MiB);
    putEntry(buf, 0, 0xee, 1, 2047);
    const h = buf.subarray(512, 1024);
    h.write('EFI PART', 0, 'latin1');
    h.writeUInt32LE(0x10000, 8);
    h.writeUInt32LE(92, 12);
    h.writeBigUInt64LE(1n, 24);
    h.writeBigUInt64LE(2047n, 32);
    h.writeBigUInt64LE(34n, 40);
    h.writeBigUInt64LE(2014n, 48);
    h.writeBigUInt64LE(2n, 72);
    h.writeUInt32LE(0xffffffff, 80);
    h.writeUInt32LE(128, 84);
    h.writeUInt32LE(0, 16);
    h.writeUInt32LE(crc32(h.subarray(0, 92)), 16);
    const disk = memDisk(buf);
    await rejectsWith(
      listPartitions(disk.read, disk.size, SRC),
      'IMAGE_CORRUPT',
      /primary GPT has too many partition entries/,
      SRC,
    );
  });

  it('a short read from the node is an I/O error, not a parse of garbage', async () => {
    const read: ReadAt = async () => Buffer.alloc(10);
    await rejectsWith(listPartitions(read, MiB, SRC), 'IO', /short read of MBR/, SRC);
  });
});
