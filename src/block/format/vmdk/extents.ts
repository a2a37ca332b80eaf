/**
 * Building the extent list of a vmdk image: one hosted sparse extent (a
 * monolithicSparse or streamOptimized file), or the extents a descriptor
 * names (in a separate descriptor file, or embedded in a sparse header whose
 * capacity is 0). Extent files are names read from an untrusted image: each
 * is resolved through the path policy (inside the image's directory or the
 * allowed roots, never a protocol or json: name) and opened read-only with
 * the fd itself confined to those roots.
 */
import { BlkError } from '../../../errors.js';
import type { OpenContext } from '../../driver.js';
import { confinement, resolveImplicitFile } from '../../path-policy.js';
import type { BlockNode } from '../../types.js';
import type { TableCache } from '../qcow2/table-cache.js';
import { DESCRIPTOR_CREATE_TYPES, type Descriptor, type ExtentLine, printable } from './descriptor.js';
import { openSparseExtent, type SparseExtent } from './grains.js';
import {
  COWD,
  FOOTER_BYTES,
  footerHeader,
  KDMV,
  parseSparseHeader,
  peekHeader,
  SECTOR,
  type SparseHeader,
} from './sparse-header.js';
import { inflatedCache } from './stream.js';

interface ExtentBase {
  /** Guest byte offset where the extent starts, and its length in bytes. */
  start: number;
  length: number;
  /** The extent's type as the descriptor names it ('' for a monolithic sparse file, as QEMU shows it). */
  type: string;
  /** The file name as the descriptor writes it (the image itself for a monolithic file). */
  filename: string;
}

export type Extent =
  | (ExtentBase & { kind: 'flat'; node: BlockNode; fileOffset: number; fileLength: number })
  | (ExtentBase & { kind: 'zero' })
  | (ExtentBase & { kind: 'sparse'; sparse: SparseExtent; inflated: TableCache | undefined });

async function readAt(node: BlockNode, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.allocUnsafe(length);
  await node.read(offset, b);
  return b;
}

/** What the first sector of a KDMV file says: a sparse extent, or a descriptor embedded at `descOffset`. */
export type SparseOpen =
  | { kind: 'sparse'; header: SparseHeader }
  | { kind: 'descriptor'; descOffset: number };

/** Reads and checks the header of the KDMV file `node` (taking the footer's copy for a stream with GD_AT_END). */
export async function readSparseHeader(node: BlockNode, path: string): Promise<SparseOpen> {
  const fileLength = node.length();
  if (fileLength < SECTOR) {
    throw new BlkError(
      'IMAGE_INVALID',
      `a sparse extent of ${fileLength} bytes is too short for its header`,
      {
        file: path,
        field: 'magic',
      },
    );
  }
  const head = await readAt(node, 0, SECTOR);
  if (head.readUInt32BE(0) === COWD) {
    throw new BlkError('IMAGE_UNSUPPORTED', 'vmfsSparse (COWD, VMware 3) extents are not supported', {
      file: path,
      field: 'magic',
    });
  }
  if (head.readUInt32LE(0) !== KDMV) {
    throw new BlkError('IMAGE_INVALID', 'not a VMDK sparse extent (no KDMV magic)', {
      file: path,
      field: 'magic',
    });
  }
  const peek = peekHeader(head);
  if (peek.capacity === 0n && peek.descOffset !== 0n) {
    if (peek.descOffset * BigInt(SECTOR) >= BigInt(fileLength)) {
      throw new BlkError('IMAGE_CORRUPT', 'the descriptor lies past the end of the file', {
        file: path,
        field: 'descriptorOffset',
      });
    }
    return { kind: 'descriptor', descOffset: Number(peek.descOffset) * SECTOR };
  }
  if (!peek.gdAtEnd) return { kind: 'sparse', header: parseSparseHeader(head, fileLength, path) };
  // A stream: the footer (footer marker, header copy, end-of-stream marker) is in the last three sectors.
  const end = Math.floor(fileLength / SECTOR) * SECTOR;
  if (end < FOOTER_BYTES + SECTOR) {
    throw new BlkError('IMAGE_CORRUPT', 'invalid stream footer: the file is too short for a footer', {
      file: path,
      field: 'gdOffset',
    });
  }
  const tail = await readAt(node, end - FOOTER_BYTES, FOOTER_BYTES);
  return { kind: 'sparse', header: parseSparseHeader(footerHeader(tail, path), fileLength, path, true) };
}

/** The hosted sparse extent in `node` with its caches. */
export async function sparseExtent(
  node: BlockNode,
  header: SparseHeader,
  path: string,
  at: Omit<ExtentBase, 'length'>,
): Promise<Extent> {
  const sparse = await openSparseExtent(node, header, path);
  return {
    ...at,
    kind: 'sparse',
    length: header.capacity * SECTOR,
    sparse,
    inflated: header.compressed ? inflatedCache(sparse) : undefined,
  };
}

/** Refuses createType values QEMU does not open from a descriptor (naming seSparse and vsanSparse). */
export function checkCreateType(d: Descriptor, path: string): string {
  const line = d.lines.createType;
  const ct = d.createType;
  if (ct === undefined) {
    throw new BlkError('IMAGE_INVALID', 'the descriptor has no createType', {
      file: path,
      field: 'createType',
    });
  }
  if (ct === 'seSparse' || ct === 'vsanSparse') {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      `${ct} images (ESXi ${ct === 'seSparse' ? 'space-efficient sparse' : 'vSAN sparse'}) are not supported`,
      { file: path, line, field: 'createType' },
    );
  }
  if (!DESCRIPTOR_CREATE_TYPES.includes(ct)) {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      `createType '${printable(ct)}' is not supported in a descriptor file`,
      {
        file: path,
        line,
        field: 'createType',
      },
    );
  }
  if (d.extents.length === 0) {
    throw new BlkError('IMAGE_INVALID', 'the descriptor names no extents', { file: path, field: 'extent' });
  }
  return ct;
}

/** Opens every extent a descriptor names; `path` is the descriptor's file (names are relative to its directory). */
export async function openDescriptorExtents(
  ctx: OpenContext,
  d: Descriptor,
  path: string,
): Promise<Extent[]> {
  const files = new Map<string, BlockNode>();
  const out: Extent[] = [];
  let start = 0;
  for (const e of d.extents) {
    const x = await openExtent(ctx, e, path, start, files);
    if (start + x.length > Number.MAX_SAFE_INTEGER) {
      throw new BlkError('IMAGE_TOO_LARGE', 'the extents add up to more than 2^53 bytes', {
        file: path,
        line: e.line,
        field: 'extent size',
      });
    }
    start += x.length;
    out.push(x);
  }
  return out;
}

async function openExtent(
  ctx: OpenContext,
  e: ExtentLine,
  path: string,
  start: number,
  files: Map<string, BlockNode>,
): Promise<Extent> {
  const place = (field: string) => ({ file: path, line: e.line, field });
  if (e.access === 'NOACCESS')
    throw new BlkError('IMAGE_UNSUPPORTED', 'NOACCESS extents cannot be read', place('access'));
  if (e.type === 'ZERO')
    return { kind: 'zero', start, length: e.sectors * SECTOR, type: 'ZERO', filename: '' };
  if (e.type === 'VMFSSPARSE')
    throw new BlkError('IMAGE_UNSUPPORTED', 'VMFSSPARSE (COWD) extents are not supported', place('type'));
  const name = e.filename!;
  const field = `extent file (line ${e.line})`;
  const real = await resolveImplicitFile(ctx.policy, path, name, 'extent file', field);
  let node = files.get(real);
  if (node === undefined) {
    node = await ctx.openChild(
      { driver: 'file', filename: real, readOnly: true, ...confinement(ctx.policy) },
      ctx.chain,
    );
    files.set(real, node);
  }
  const at = { start, type: e.type, filename: name };
  if (e.type === 'FLAT' || e.type === 'VMFS') {
    return {
      ...at,
      kind: 'flat',
      length: e.sectors * SECTOR,
      node,
      fileOffset: e.offsetSectors * SECTOR,
      fileLength: node.length(),
    };
  }
  // SPARSE: like QEMU, the extent's size is its header's capacity (the descriptor's count is not used).
  const opened = await readSparseHeader(node, real);
  if (opened.kind === 'descriptor') {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      'a sparse extent that is itself a descriptor (nested descriptors)',
      {
        file: real,
        field: 'capacity',
      },
    );
  }
  return sparseExtent(node, opened.header, real, at);
}
