/** Checks one expanded document for what the schema cannot say: unique names, references, cycles, writability. */
import type { DocumentProblem } from './expand.js';
import { childrenOf, NodeGraph } from './graph.js';
import {
  type ExportSpec,
  type ManifestDocument,
  type NodeSpec,
  QEMU_ONLY_DRIVERS,
  type QemuOnlyDriver,
} from './types.js';

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
  const nodes = checkNodes(doc, problems);
  checkExports(doc, nodes, problems);
  return problems;
}

/** Duplicate node-names, QEMU-only drivers under the native engine, unknown children, cycles; the nodes by name. */
function checkNodes(doc: ManifestDocument, problems: DocumentProblem[]): Map<string, NodeSpec> {
  const nodes = new Map<string, NodeSpec>();
  for (const n of doc.nodes) {
    const first = nodes.get(n.options['node-name']);
    if (!first) {
      nodes.set(n.options['node-name'], n);
      continue;
    }
    const pointer = n.generatedFor === undefined ? `${n.source.path}/node-name` : n.source.path;
    problems.push({
      pointer,
      at: 'value',
      message: `${describeNode(n)} is already defined at ${at(first.source)}`,
    });
  }
  // QEMU's own format drivers: refused up front when the manifest asks for the native engine.
  for (const n of doc.engine === 'native' ? doc.nodes : []) {
    if (!QEMU_ONLY_DRIVERS.includes(n.options.driver as QemuOnlyDriver)) continue;
    problems.push({
      pointer: n.generatedFor?.startsWith('shorthand')
        ? `${n.source.path}/format`
        : `${n.source.path}/driver`,
      at: 'value',
      message: `driver "${n.options.driver}" needs the qemu engine (spec.engine: qemu); the native engine cannot open it`,
    });
  }
  const graph = new NodeGraph(doc.nodes.map((n) => n.options));
  for (const n of doc.nodes) {
    for (const c of childrenOf(n.options)) {
      if (nodes.has(c.name)) continue;
      problems.push({
        pointer: `${n.source.path}/${c.role}`,
        at: 'value',
        message: `${c.role} refers to node-name "${c.name}", which is not defined in this manifest`,
      });
    }
  }
  for (const cycle of graph.cycles()) {
    problems.push({
      pointer: nodes.get(cycle[0]!)!.source.path,
      at: 'value',
      message: `cycle between nodes: ${[...cycle, cycle[0]].join(' → ')}`,
    });
  }
  return nodes;
}

/** Duplicate ids and mountpoints, unknown nodes, writable exports over read-only nodes. */
function checkExports(
  doc: ManifestDocument,
  nodes: Map<string, NodeSpec>,
  problems: DocumentProblem[],
): void {
  const graph = new NodeGraph(doc.nodes.map((n) => n.options));
  const ids = new Map<string, ExportSpec>();
  const mountpoints = new Map<string, ExportSpec>();
  for (const e of doc.exports) {
    const { id, mountpoint } = e.options;
    const first = ids.get(id);
    if (first)
      problems.push({
        pointer: `${e.source.path}/id`,
        at: 'value',
        message: `export id "${id}" is already defined at ${at(first.source)}`,
      });
    else ids.set(id, e);
    const sameMount = mountpoints.get(mountpoint);
    if (sameMount)
      problems.push({
        pointer: e.source.path,
        at: 'value',
        message: `mountpoint ${mountpoint} is already used by export "${sameMount.options.id}" at ${at(sameMount.source)}`,
      });
    else mountpoints.set(mountpoint, e);

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
    const readOnly = graph.fileChain(top).find((name) => nodes.get(name)?.options['read-only']);
    if (readOnly !== undefined) {
      problems.push({
        pointer: `${e.source.path}/writable`,
        at: 'value',
        message: `writable export "${id}" over read-only node "${readOnly}" (defined at ${at(nodes.get(readOnly)!.source)})`,
      });
    }
    checkNativeReadOnly(doc, e, graph.fileChain(top), nodes, problems);
  }
}

/** Formats the native engine serves read-only only. */
const NATIVE_READ_ONLY: readonly string[] = ['vhdx'];

/** Under the native engine, a writable export cannot write through a read-only-only format. */
function checkNativeReadOnly(
  doc: ManifestDocument,
  e: ExportSpec,
  chain: string[],
  nodes: Map<string, NodeSpec>,
  problems: DocumentProblem[],
): void {
  if (doc.engine !== 'native') return;
  const name = chain.find((n) => NATIVE_READ_ONLY.includes(nodes.get(n)?.options.driver ?? ''));
  if (name === undefined) return;
  problems.push({
    pointer: `${e.source.path}/writable`,
    at: 'value',
    message: `writable export "${e.options.id}" over ${nodes.get(name)!.options.driver} node "${name}": the native engine serves ${nodes.get(name)!.options.driver} images read-only`,
  });
}
