/**
 * The parent of a differencing image. Its parent locator names it in up to
 * three ways, tried in the specification's order: relative_path (relative
 * to this image, Windows separators turned into '/'), volume_path and
 * absolute_win32_path. Drive-letter and volume paths cannot name a file on
 * this host and are skipped; a name that does not exist is skipped too; a
 * name the path policy refuses (outside the allowed roots, a protocol) stops
 * the open. The parent is always a VHDX image, opened read-only, with the
 * same depth and cycle limits as qcow2 backing files, and its DataWriteGuid
 * must match the locator's parent_linkage (else the parent changed since the
 * child was made, and the child's data would be mixed with other data).
 */
import { BlkError } from '../../../errors.js';
import type { OpenContext } from '../../driver.js';
import { MAX_BACKING_DEPTH } from '../../limits.js';
import { confinement, resolveImplicitFile } from '../../path-policy.js';
import type { BlockNode } from '../../types.js';
import { corrupt } from './errors.js';
import { guidText } from './layout.js';
import type { VhdxState } from './state.js';

const FIELD = 'metadata.parent_locator';
const KEYS = ['relative_path', 'volume_path', 'absolute_win32_path'];

/** The locator's names for the parent, as this host would spell them, in the order they are tried. */
export function parentCandidates(locator: Map<string, string>): { key: string; name: string }[] {
  const out: { key: string; name: string }[] = [];
  for (const key of KEYS) {
    const v = locator.get(key);
    if (v === undefined || v === '') continue;
    const name = v.replace(/\\/g, '/');
    // C:/..., //?/Volume{...}/..., //server/share/...: Windows-only names.
    if (/^[A-Za-z]:/.test(name) || name.startsWith('//')) continue;
    out.push({ key, name });
  }
  return out;
}

/** The name `info` reports for the parent: the first usable locator name, else the first recorded one. */
export function parentDisplayName(locator: Map<string, string> | undefined): string | undefined {
  if (!locator) return undefined;
  return parentCandidates(locator)[0]?.name ?? KEYS.map((k) => locator.get(k)).find((v) => v);
}

/** Looks up the state of an opened vhdx node (set by the driver's attach). */
export type StateOf = (node: BlockNode) => VhdxState | undefined;

/** Opens the parent of a differencing image (or takes the explicit one); null when there is none. */
export async function openParent(
  ctx: OpenContext,
  s: VhdxState,
  stateOf: StateOf,
): Promise<BlockNode | null> {
  if (!s.meta.hasParent) return null;
  if (ctx.backing !== undefined) return ctx.backing;
  const path = s.path;
  const locator = s.meta.parentLocator!;
  const depth = ctx.chain.depth + 1;
  if (depth > MAX_BACKING_DEPTH) {
    throw new BlkError('BACKING_CHAIN', `parent chain is longer than ${MAX_BACKING_DEPTH} images`, {
      file: path,
      field: FIELD,
    });
  }
  const candidates = parentCandidates(locator);
  if (candidates.length === 0) {
    const named = KEYS.filter((k) => locator.has(k)).map((k) => `${k}=${locator.get(k)}`);
    throw new BlkError(
      'BACKING_CHAIN',
      `the parent locator names no path this host can open (${named.join(', ') || 'no paths'})`,
      {
        file: path,
        field: FIELD,
      },
    );
  }
  let real: string | undefined;
  let firstMissing: unknown;
  for (const c of candidates) {
    try {
      real = await resolveImplicitFile(ctx.policy, path, c.name, 'backing file', `${FIELD}.${c.key}`);
      break;
    } catch (e) {
      if ((e as BlkError).code !== 'BACKING_CHAIN') throw e;
      firstMissing ??= e;
    }
  }
  if (real === undefined) throw firstMissing;
  const seen = new Set(ctx.chain.seen);
  if (s.file.fileKey !== undefined) seen.add(s.file.fileKey);
  const node = await ctx.openChild(
    {
      driver: 'vhdx',
      readOnly: true,
      file: { driver: 'file', filename: real, readOnly: true, ...confinement(ctx.policy) },
    },
    { depth, seen },
  );
  if (node.fileKey !== undefined && seen.has(node.fileKey)) {
    throw new BlkError('BACKING_CHAIN', `parent '${real}' is an image already in the chain (a cycle)`, {
      file: path,
      field: FIELD,
    });
  }
  checkLinkage(locator, stateOf(node), path);
  return node;
}

/** The parent's DataWriteGuid must be the locator's parent_linkage (or parent_linkage2). */
function checkLinkage(locator: Map<string, string>, parent: VhdxState | undefined, path: string): void {
  const linkage = locator.get('parent_linkage');
  if (linkage === undefined)
    throw corrupt(path, `${FIELD}.parent_linkage`, 'the parent locator has no parent_linkage');
  if (!parent)
    throw new BlkError('INTERNAL', 'the parent node is not a vhdx node', { file: path, field: FIELD });
  const actual = guidText(parent.header.dataWriteGuid);
  const accepted = [linkage, locator.get('parent_linkage2')].filter((v): v is string => v !== undefined);
  if (!accepted.some((v) => v.toUpperCase() === actual)) {
    throw new BlkError(
      'BACKING_CHAIN',
      `parent '${parent.path}' has DataWriteGuid ${actual}, but the child was made from ${linkage}: the parent changed since`,
      { file: path, field: `${FIELD}.parent_linkage` },
    );
  }
}
