/**
 * Format probing from an image's first bytes, for `format: auto` on the image
 * a user names (never on backing files: their format must be recorded).
 * qcow2, raw, vpc (dynamic and differencing vhd), vdi, qed, vmdk and vhdx are
 * opened (all but qcow2 and raw read-only); other formats are recognized by
 * their magic and refused, so they are never presented as raw. A fixed vhd has
 * its footer only at the end, so (as with QEMU) it probes as raw: name its
 * format (vpc) to open it as a vhd.
 */
import { closeSync, constants, openSync } from 'node:fs';
import { resolve } from 'node:path';
import { BlkError } from '../errors.js';
import { preadFull } from './protocol/file-io.js';
import type { BlockNode } from './types.js';

export type ProbedFormat = 'qcow2' | 'raw' | ReadOnlyFormat;

/** Formats the native block layer opens read-only. */
export type ReadOnlyFormat = 'vpc' | 'vdi' | 'qed' | 'vmdk' | 'vhdx';

/** Formats the native block layer opens read-only (a writable open is refused naming the format). */
export const READ_ONLY_FORMATS: readonly ReadOnlyFormat[] = ['vpc', 'vdi', 'qed', 'vmdk', 'vhdx'];

/** Every format a probe can choose for the native block layer. */
export const PROBED_FORMATS: readonly ProbedFormat[] = ['qcow2', 'raw', ...READ_ONLY_FORMATS];

/** Bytes probing looks at. */
export const PROBE_BYTES = 512;

function unsupported(format: string, file: string | undefined): BlkError {
  return new BlkError('IMAGE_UNSUPPORTED', `format ${format} is not supported yet`, { file });
}

/** Formats recognized by their magic; which of them can be opened depends on the engine. */
export type KnownFormat = ProbedFormat | 'qcow' | 'vhdx' | 'luks' | 'parallels' | 'bochs' | 'cloop';

/**
 * Names the format of an image from its first bytes, whatever engine will
 * open it ('raw' when no magic matches); a qcow2 header of an unknown
 * version throws IMAGE_UNSUPPORTED.
 */
export function identifyFormat(head: Buffer, file?: string): KnownFormat {
  const ascii = (off: number, s: string) =>
    head.length >= off + s.length && head.toString('latin1', off, off + s.length) === s;
  if (ascii(0, 'QFI\xfb')) {
    const version = head.length >= 8 ? head.readUInt32BE(4) : 0;
    if (version === 1) return 'qcow';
    if (version === 2 || version === 3) return 'qcow2';
    throw new BlkError('IMAGE_UNSUPPORTED', `qcow2 version ${version} is not supported`, {
      file,
      field: 'version',
    });
  }
  if (ascii(0, 'KDMV') || ascii(0, 'COWD') || ascii(0, '# Disk DescriptorFile')) return 'vmdk';
  if (ascii(0, 'vhdxfile')) return 'vhdx';
  if (ascii(0, 'conectix')) return 'vpc';
  if (head.length >= 0x44 && head.readUInt32LE(0x40) === 0xbeda107f) return 'vdi';
  if (ascii(0, 'QED\0')) return 'qed';
  if (ascii(0, 'LUKS\xba\xbe')) return 'luks';
  if (ascii(0, 'WithoutFreeSpace') || ascii(0, 'WithouFreSpacExt')) return 'parallels';
  if (ascii(0, 'Bochs Virtual HD Image')) return 'bochs';
  if (ascii(0, '#!/bin/sh\n#V2.0 Format')) return 'cloop';
  return 'raw';
}

/** Names the format of an image from its first bytes; throws IMAGE_UNSUPPORTED for formats the native block layer cannot open. */
export function probeBytes(head: Buffer, file?: string): ProbedFormat {
  const f = identifyFormat(head, file);
  if ((PROBED_FORMATS as readonly string[]).includes(f)) return f as ProbedFormat;
  throw unsupported(f === 'qcow' ? 'qcow (version 1)' : f, file);
}

/** Probes an opened node (reads its first bytes through the node, so a mount over the path does not matter). */
export async function probeNode(node: BlockNode): Promise<ProbedFormat> {
  const n = Math.min(PROBE_BYTES, node.length());
  const head = Buffer.alloc(n);
  await node.read(0, head);
  return probeBytes(head, node.filename);
}

/** Probes the image at `path`: a format of PROBED_FORMATS, or throws IMAGE_UNSUPPORTED naming the format found. */
export async function probeFormat(path: string): Promise<ProbedFormat> {
  const file = resolve(path);
  let fd: number;
  try {
    fd = openSync(file, constants.O_RDONLY);
  } catch (e) {
    throw new BlkError('IO', `cannot open: ${(e as Error).message}`, { file }, { cause: e });
  }
  try {
    const head = Buffer.alloc(PROBE_BYTES);
    await preadFull(fd, head, 0, PROBE_BYTES, 0);
    return probeBytes(head, file);
  } finally {
    closeSync(fd);
  }
}
