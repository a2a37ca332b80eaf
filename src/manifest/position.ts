/** Maps a JSON pointer inside a parsed YAML document back to a line and column of the file. */
import { type Document, isMap, isPair, isScalar, isSeq, type LineCounter, type Node } from 'yaml';

/** A 1-based line and column. */
export interface LineCol {
  line: number;
  col: number;
}

/** Splits a JSON pointer (`/spec/exports/0`) into its unescaped segments. */
export function pointerSegments(pointer: string): string[] {
  if (pointer === '') return [];
  const segments = pointer.slice(1).split('/');
  if (!pointer.includes('~')) return segments; // nothing escaped: one look-up per export of a large manifest
  return segments.map((s) => s.replaceAll('~1', '/').replaceAll('~0', '~'));
}

/** Joins segments into a JSON pointer. */
export function toPointer(segments: readonly (string | number)[]): string {
  return segments.map((s) => `/${String(s).replaceAll('~', '~0').replaceAll('/', '~1')}`).join('');
}

/** Finds the value node at `segments`; stops at the deepest node that exists. */
function walk(
  root: Node | null,
  segments: string[],
): { node: Node | null; keyNode?: Node; complete: boolean } {
  let node: Node | null = root;
  let keyNode: Node | undefined;
  for (const seg of segments) {
    if (isMap(node)) {
      const pair = node.items.find((p) => isPair(p) && isScalar(p.key) && String(p.key.value) === seg);
      if (!pair) return { node, complete: false };
      keyNode = (pair.key as Node) ?? undefined;
      const value = pair.value as Node | null;
      // `key:` with no value: point at the key.
      if (value === null || value.range === undefined) return { node: keyNode ?? node, complete: true };
      node = value;
    } else if (isSeq(node)) {
      const item = node.items[Number(seg)] as Node | undefined;
      if (item === undefined || !/^[0-9]+$/.test(seg)) return { node, complete: false };
      keyNode = undefined;
      node = item;
    } else {
      return { node, complete: false };
    }
  }
  return keyNode === undefined ? { node, complete: true } : { node, keyNode, complete: true };
}

/**
 * Position of the value at `pointer` (or of its key with `at: 'key'`); when the
 * pointer does not exist in the text (a default, a missing field) the deepest
 * existing ancestor is used.
 */
export function positionOf(
  doc: Document,
  lineCounter: LineCounter,
  pointer: string,
  at: 'value' | 'key' = 'value',
): LineCol {
  const { node, keyNode } = walk(doc.contents as Node | null, pointerSegments(pointer));
  const target = at === 'key' && keyNode ? keyNode : node;
  const offset = target?.range?.[0] ?? doc.range?.[0] ?? 0;
  return lineCounter.linePos(offset);
}
