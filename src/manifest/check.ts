/** Checks one expanded document for what the schema cannot say: unique names, references, cycles, writability. */
import type { DocumentProblem } from './expand.js';
import { type ManifestDocument, type NodeSpec, QEMU_ONLY_DRIVERS, type QemuOnlyDriver } from './types.js';

function at(s: { file: string; line: number; col: number }): string {
  return `${s.file}:${s.line}:${s.col}`;
}

function describeNode(n: NodeSpec): string {
  return n.generatedFor === undefined
    ? `node-name "${n.options['node-name']}"`
    : `node-name "${n.options['node-name']}" (generated for the ${n.generatedFor})`;
}

/** Problems of one document: duplicates, unresolved references, cycles, writable exports over read-only nodes. */
export function checkDocument(doc: ManifestDocument): DocumentProblem[] {
  const problems: DocumentProblem[] = [];
  const nodes = new Map<string, NodeSpec>();
  for (const n of doc.nodes) {
    const name = n.options['node-name'];
    const first = nodes.get(name);
    if (first) {
      const pointer = n.generatedFor === undefined ? `${n.source.path}/node-name` : n.source.path;
      problems.push({
        pointer,
        at: 'value',
        message: `${describeNode(n)} is already defined at ${at(first.source)}`,
      });
      continue;
    }
    nodes.set(name, n);
  }

  // QEMU's own format drivers: refused up front when the manifest asks for the native engine.
  if (doc.engine === 'native') {
    for (const n of doc.nodes) {
      if (!QEMU_ONLY_DRIVERS.includes(n.options.driver as QemuOnlyDriver)) continue;
      problems.push({
        pointer: n.generatedFor?.startsWith('shorthand')
          ? `${n.source.path}/format`
          : `${n.source.path}/driver`,
        at: 'value',
        message: `driver "${n.options.driver}" needs the qemu engine (spec.engine: qemu); the native engine cannot open it`,
      });
    }
  }

  for (const n of doc.nodes) {
    for (const role of ['file', 'backing'] as const) {
      const ref = n.options[role];
      if (typeof ref === 'string' && !nodes.has(ref)) {
        problems.push({
          pointer: `${n.source.path}/${role}`,
          at: 'value',
          message: `${role} refers to node-name "${ref}", which is not defined in this manifest`,
        });
      }
    }
  }

  // Cycles through file/backing: depth-first search, each cycle reported once at its first node.
  const state = new Map<string, 'visiting' | 'done'>();
  const reported = new Set<string>();
  const visit = (name: string, trail: string[]): void => {
    const s = state.get(name);
    if (s === 'done') return;
    if (s === 'visiting') {
      const cycle = trail.slice(trail.indexOf(name));
      const key = [...cycle].sort().join(',');
      if (!reported.has(key)) {
        reported.add(key);
        const node = nodes.get(cycle[0]!)!;
        problems.push({
          pointer: node.source.path,
          at: 'value',
          message: `cycle between nodes: ${[...cycle, name].join(' → ')}`,
        });
      }
      return;
    }
    const node = nodes.get(name);
    if (!node) return;
    state.set(name, 'visiting');
    for (const ref of [node.options.file, node.options.backing]) {
      if (typeof ref === 'string') visit(ref, [...trail, name]);
    }
    state.set(name, 'done');
  };
  for (const name of nodes.keys()) visit(name, []);

  const ids = new Map<string, (typeof doc.exports)[number]>();
  const mountpoints = new Map<string, (typeof doc.exports)[number]>();
  for (const e of doc.exports) {
    const { id, mountpoint } = e.options;
    const first = ids.get(id);
    if (first) {
      problems.push({
        pointer: `${e.source.path}/id`,
        at: 'value',
        message: `export id "${id}" is already defined at ${at(first.source)}`,
      });
    } else ids.set(id, e);
    const sameMount = mountpoints.get(mountpoint);
    if (sameMount) {
      problems.push({
        pointer: e.source.path,
        at: 'value',
        message: `mountpoint ${mountpoint} is already used by export "${sameMount.options.id}" at ${at(sameMount.source)}`,
      });
    } else mountpoints.set(mountpoint, e);

    const top = e.options['node-name'];
    if (!nodes.has(top)) {
      problems.push({
        pointer: `${e.source.path}/node-name`,
        at: 'value',
        message: `export "${id}" refers to node-name "${top}", which is not defined in this manifest`,
      });
      continue;
    }
    if (!e.options.writable) continue;
    // A writable export needs every node it writes through (node, then its file chain) writable.
    const seen = new Set<string>();
    for (let n = nodes.get(top); n && !seen.has(n.options['node-name']); ) {
      seen.add(n.options['node-name']);
      if (n.options['read-only']) {
        problems.push({
          pointer: `${e.source.path}/writable`,
          at: 'value',
          message: `writable export "${id}" over read-only node "${n.options['node-name']}" (defined at ${at(n.source)})`,
        });
        break;
      }
      n = typeof n.options.file === 'string' ? nodes.get(n.options.file) : undefined;
    }
  }
  return problems;
}
