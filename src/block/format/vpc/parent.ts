/**
 * The parent of a differencing vhd: the names its parent locators (and the
 * header's parent name) give, tried in order through the backing-file path
 * policy. Windows locators ("W2ru" relative, "W2ku" absolute, UTF-16LE) get
 * their backslashes turned into slashes; a "MacX" locator is a file:// URL.
 * The parent must be a vhd whose footer UUID is the one the child recorded.
 */
import { BlkError } from '../../../errors.js';
import type { OpenContext } from '../../driver.js';
import type { BlockNode } from '../../types.js';
import { openNamedBacking } from '../backing-file.js';
import { readAt } from '../pieces.js';
import type { VpcDynHeader } from './footer.js';

/** Longest locator data read (bytes). */
const MAX_LOCATOR_BYTES = 64 * 1024;
const ORDER = ['W2ru', 'MacX', 'W2ku'];

/** The parent's UUID by node, registered when a vpc node is attached. */
export const vpcUuids = new WeakMap<BlockNode, Buffer>();

/** Candidate parent names, best first (locator data is read and bounded here). */
export async function parentNames(file: BlockNode, dyn: VpcDynHeader, path: string): Promise<string[]> {
  const names: string[] = [];
  const sorted = [...dyn.locators].sort((a, b) => rank(a.platform) - rank(b.platform));
  for (const loc of sorted) {
    if (!ORDER.includes(loc.platform)) continue;
    const i = dyn.locators.indexOf(loc);
    const field = `parent_locator[${i}]`;
    if (loc.dataLength === 0) continue;
    if (loc.dataLength > MAX_LOCATOR_BYTES) {
      throw new BlkError(
        'IMAGE_CORRUPT',
        `parent locator data of ${loc.dataLength} bytes (at most ${MAX_LOCATOR_BYTES})`,
        {
          file: path,
          field: `${field}.data_length`,
        },
      );
    }
    if (loc.dataOffset + BigInt(loc.dataLength) > BigInt(file.length())) {
      throw new BlkError('IMAGE_CORRUPT', 'parent locator data lies past the end of the file', {
        file: path,
        field: `${field}.data_offset`,
      });
    }
    const raw = await readAt(file, Number(loc.dataOffset), loc.dataLength);
    const name = decodeLocator(loc.platform, raw);
    if (name !== undefined && name.length > 0) names.push(name);
  }
  if (dyn.parentName.length > 0) names.push(dyn.parentName);
  return [...new Set(names)];
}

function rank(platform: string): number {
  const i = ORDER.indexOf(platform);
  return i < 0 ? ORDER.length : i;
}

function decodeLocator(platform: string, raw: Buffer): string | undefined {
  if (platform === 'W2ru' || platform === 'W2ku') {
    let s = raw.toString('utf16le', 0, raw.length - (raw.length % 2));
    const nul = s.indexOf('\0');
    if (nul >= 0) s = s.slice(0, nul);
    s = s.replace(/\\/g, '/');
    return s.startsWith('./') ? s.slice(2) : s;
  }
  if (platform === 'MacX') {
    let s = raw.toString('utf8');
    const nul = s.indexOf('\0');
    if (nul >= 0) s = s.slice(0, nul);
    if (!s.startsWith('file://')) return undefined;
    try {
      return decodeURIComponent(s.slice('file://'.length));
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/** Opens the parent: the first candidate that exists inside the allowed roots, checked against parent_uuid. */
export async function openParent(
  ctx: OpenContext,
  file: BlockNode,
  names: string[],
  parentUuid: Buffer,
  path: string,
): Promise<BlockNode> {
  if (names.length === 0) {
    throw new BlkError(
      'BACKING_CHAIN',
      'differencing disk names no parent (no usable parent locator or name)',
      {
        file: path,
        field: 'parent_locator',
      },
    );
  }
  let first: unknown;
  for (const name of names) {
    let node: BlockNode;
    try {
      node = await openNamedBacking(ctx, file, name, 'vpc', 'parent_locator');
    } catch (e) {
      first ??= e;
      continue;
    }
    const uuid = vpcUuids.get(node);
    if (uuid === undefined || !uuid.equals(parentUuid)) {
      throw new BlkError(
        'BACKING_CHAIN',
        `parent '${name}' is not the disk this one was made from (its UUID is not parent_uuid)`,
        { file: path, field: 'parent_uuid' },
      );
    }
    return node;
  }
  throw first;
}
