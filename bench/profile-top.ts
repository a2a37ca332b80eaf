/**
 * Where the time goes in a V8 CPU profile (`node --cpu-prof`): the functions
 * with the most self time, and the most inclusive time, as shares of the
 * profile. Not part of `npm run bench`; used for the notes in docs/benchmarks.md.
 *
 *   node --import tsx bench/profile-top.ts FILE.cpuprofile [N]
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}

interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
}

function label(n: ProfileNode): string {
  const f = n.callFrame;
  const where = f.url ? `${basename(f.url)}:${f.lineNumber + 1}` : '';
  return `${f.functionName || '(anonymous)'} ${where}`.trim();
}

/** Self and inclusive sample counts per function label (recursion counted once per stack). */
export function summarize(p: Profile): {
  total: number;
  self: Map<string, number>;
  inclusive: Map<string, number>;
} {
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  const inclusive = new Map<string, number>();
  let total = 0;
  const walk = (id: number, onStack: Set<string>): number => {
    const n = byId.get(id)!;
    const l = label(n);
    const hits = n.hitCount ?? 0;
    self.set(l, (self.get(l) ?? 0) + hits);
    const fresh = !onStack.has(l);
    if (fresh) onStack.add(l);
    let sum = hits;
    for (const c of n.children ?? []) sum += walk(c, onStack);
    if (fresh) {
      onStack.delete(l);
      inclusive.set(l, (inclusive.get(l) ?? 0) + sum);
    }
    return sum;
  };
  total = walk(p.nodes[0]!.id, new Set());
  return { total, self, inclusive };
}

function top(m: Map<string, number>, total: number, n: number): string[] {
  return [...m.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([l, v]) => `${((100 * v) / total).toFixed(1).padStart(5)} %  ${l}`);
}

const [file, count] = process.argv.slice(2);
if (!file) {
  console.error('usage: node --import tsx bench/profile-top.ts FILE.cpuprofile [N]');
  process.exit(2);
}
const p = JSON.parse(readFileSync(file, 'utf8')) as Profile;
const { total, self, inclusive } = summarize(p);
const n = Number(count ?? 25);
console.log(`${file}: ${((p.endTime - p.startTime) / 1e6).toFixed(1)} s, ${total} samples`);
console.log('\nself time:');
for (const l of top(self, total, n)) console.log(l);
console.log('\ninclusive time:');
for (const l of top(inclusive, total, n)) console.log(l);
