/**
 * A seeded mutator for manifest YAML: line edits (delete, duplicate, swap,
 * re-indent, truncate), token splices (YAML's special characters, anchors and
 * aliases, tags, flow brackets, tabs, NUL and odd Unicode), scalar swaps
 * (huge, negative, fractional, empty, suffixed sizes, paths with `..` and
 * NUL) and plain random token soup.
 */
import { seededRandom } from '../helpers/tools.js';

type Rand = () => number;
const pick = <T>(rand: Rand, xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;

const TOKENS = [
  ':',
  ': ',
  '- ',
  '? ',
  '{',
  '}',
  '[',
  ']',
  ',',
  '&a ',
  '*a',
  '!!str ',
  '!!binary ',
  '!foo ',
  '|',
  '>',
  '"',
  "'",
  '#',
  '%YAML 1.2\n',
  '---\n',
  '...\n',
  '\t',
  '\0',
  '\u2028',
  '\ufeff',
  '\\',
  '<<: *a',
  '@',
  '`',
  '\n',
  '  ',
  'null',
  '~',
  'true',
  'off',
  '0x10',
  '1e400',
  '.inf',
  '-.nan',
];
const SCALARS = [
  '0',
  '-1',
  '1.5',
  '9007199254740993',
  '1e309',
  '""',
  "''",
  'null',
  '~',
  '[]',
  '{}',
  'yes',
  'no',
  '16E',
  '1Z',
  '-4K',
  '0x7fffffffffffffff',
  '/etc/shadow',
  '/../../etc/passwd',
  'json:{"file":{"filename":"/etc/shadow"}}',
  'nbd://host/x',
  '"/img/a\\0b"',
  '"\\u0000"',
  'a'.repeat(5000),
  '/proc/self/mem',
  'relative/path',
  'auto',
  'on',
];
const KEYS = [
  'apiVersion',
  'kind',
  'metadata',
  'name',
  'spec',
  'exports',
  'blockdevs',
  'id',
  'image',
  'mountpoint',
  'writable',
  'node-name',
  'driver',
  'file',
  'filename',
  'backing',
  'locking',
  'offset',
  'size',
  'partition',
  'format',
  'hosts',
  'engine',
  'growable',
  'allow-other',
  'create-mountpoint',
  'read-only',
  'type',
  '<<',
];

/** Random token soup: keys, scalars, YAML punctuation and indentation, up to `maxLen` characters. */
export function randomYaml(rand: Rand, maxLen = 600): string {
  let s = '';
  while (s.length < maxLen * rand()) {
    const r = rand();
    if (r < 0.3) s += `${' '.repeat(Math.floor(rand() * 4) * 2)}${pick(rand, KEYS)}: `;
    else if (r < 0.55) s += pick(rand, SCALARS);
    else if (r < 0.85) s += pick(rand, TOKENS);
    else s += '\n';
  }
  return s;
}

/** Applies one to three seeded edits to `text`; returns the text and what was done. */
export function mutateYaml(text: string, seed: number): { text: string; steps: string[] } {
  const rand = seededRandom(seed);
  let lines = text.split('\n');
  const steps: string[] = [];
  const n = 1 + Math.floor(rand() * 3);
  for (let i = 0; i < n; i++) {
    const at = Math.floor(rand() * lines.length);
    const line = lines[at] ?? '';
    switch (Math.floor(rand() * 9)) {
      case 0:
        lines.splice(at, 1);
        steps.push(`delete line ${at + 1}`);
        break;
      case 1:
        lines.splice(at, 0, line);
        steps.push(`duplicate line ${at + 1}`);
        break;
      case 2: {
        const other = Math.floor(rand() * lines.length);
        [lines[at], lines[other]] = [lines[other] ?? '', line];
        steps.push(`swap lines ${at + 1} and ${other + 1}`);
        break;
      }
      case 3: {
        const d = pick(rand, [-4, -2, -1, 1, 2, 4]);
        lines[at] =
          d > 0 ? ' '.repeat(d) + line : line.slice(Math.min(-d, line.length - line.trimStart().length));
        steps.push(`indent line ${at + 1} by ${d}`);
        break;
      }
      case 4: {
        const col = Math.floor(rand() * (line.length + 1));
        const tok = pick(rand, TOKENS);
        lines[at] = line.slice(0, col) + tok + line.slice(col);
        steps.push(`insert ${JSON.stringify(tok)} at ${at + 1}:${col + 1}`);
        break;
      }
      case 5: {
        const m = /^(\s*(?:- )?[\w-]+:\s*)(.*)$/.exec(line);
        if (!m) break;
        const v = pick(rand, SCALARS);
        lines[at] = m[1] + v;
        steps.push(`value at line ${at + 1} -> ${JSON.stringify(v.slice(0, 40))}`);
        break;
      }
      case 6: {
        const m = /^(\s*(?:- )?)([\w-]+)(:.*)$/.exec(line);
        if (!m) break;
        const k = pick(rand, KEYS);
        lines[at] = m[1] + k + m[3];
        steps.push(`key at line ${at + 1} -> ${k}`);
        break;
      }
      case 7: {
        const cut = Math.floor(rand() * text.length);
        lines = lines.join('\n').slice(0, cut).split('\n');
        steps.push(`truncate at ${cut}`);
        break;
      }
      default: {
        const soup = randomYaml(rand, 120);
        lines.splice(at, 0, soup);
        steps.push(`splice soup at line ${at + 1}`);
      }
    }
  }
  return { text: lines.join('\n'), steps };
}
