/** Checks one expanded document for what the schema cannot say: unique names, references, cycles, writability. */
import type { DocumentProblem } from './expand.js';
import { childrenOf, NodeGraph } from './graph.js';
import {
  type ExportSpec,
  type ManifestDocument,
  NATIVE_READ_ONLY_DRIVERS,
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
  const graph = new NodeGraph(doc.nodes.map((n) => n.options));
  const nodes = checkNodes(doc, graph, problems);
  checkExports(doc, graph, nodes, problems);
  return problems;
}

/** Duplicate node-names, QEMU-only drivers under the native engine, unknown children, cycles; the nodes by name. */
function checkNodes(
  doc: ManifestDocument,
  graph: NodeGraph,
  problems: DocumentProblem[],
): Map<string, NodeSpec> {
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
  for (const n of doc.nodes) {
    if (n.options['force-share'] && !n.options['read-only'])
      problems.push({
        pointer: `${n.source.path}/force-share`,
        at: 'key',
        message: `force-share is for read-only nodes (as in QEMU): set read-only: true on "${n.options['node-name']}"`,
      });
  }
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
  graph: NodeGraph,
  nodes: Map<string, NodeSpec>,
  problems: DocumentProblem[],
): void {
  const writers = new Map<string, ExportSpec>();
  const ids = new Map<string, ExportSpec>();
  const mountpoints = new Map<string, ExportSpec>();
  const nbdNames = new Map<string, ExportSpec>();
  for (const e of doc.exports) {
    const { id } = e.options;
    const first = ids.get(id);
    if (first)
      problems.push({
        pointer: `${e.source.path}/id`,
        at: 'value',
        message: `export id "${id}" is already defined at ${at(first.source)}`,
      });
    else ids.set(id, e);
    const [claims, key, what] =
      e.options.type === 'fuse'
        ? [mountpoints, e.options.mountpoint, `mountpoint ${e.options.mountpoint}`]
        : [nbdNames, e.options.name, `NBD export name "${e.options.name}"`];
    const sameClaim = claims.get(key);
    if (sameClaim)
      problems.push({
        pointer: e.source.path,
        at: 'value',
        message: `${what} is already used by export "${sameClaim.options.id}" at ${at(sameClaim.source)}`,
      });
    else claims.set(key, e);

    const top = e.options['node-name'];
    if (!nodes.has(top)) {
      problems.push({
        pointer: `${e.source.path}/node-name`,
        at: 'value',
        message: `export "${id}" refers to node-name "${top}", which is not defined in this manifest`,
      });
      continue;
    }
    if (e.options.overlay !== undefined && doc.engine === 'qemu')
      problems.push({
        pointer: `${e.source.path}/overlay`,
        at: 'key',
        message: `overlay: ephemeral needs the native engine; the qemu engine does not build the overlay graph yet`,
      });
    if (e.options.overlay !== undefined) {
      // An overlay export writes into its overlay, never through the node: the image stays read-only.
      const writable = graph.fileChain(top).find((name) => !nodes.get(name)?.options['read-only']);
      if (writable !== undefined)
        problems.push({
          pointer: `${e.source.path}/overlay`,
          at: 'key',
          message: `overlay export "${id}" over writable node "${writable}" (defined at ${at(nodes.get(writable)!.source)}): an overlay reads the image read-only; set read-only: true on it (and force-share: true on its file node to share the image with a running VM)`,
        });
      continue;
    }
    if (!e.options.writable) continue;
    sharedWriter(e, graph, writers, problems);
    // A writable export needs every node it writes through (node, then its file chain) writable.
    const view = graph.fileChain(top).find((name) => nodes.get(name)?.options.snapshot !== undefined);
    if (view !== undefined) {
      problems.push({
        pointer: `${e.source.path}/writable`,
        at: 'value',
        message: `writable export "${id}" over node "${view}", a view of internal snapshot "${nodes.get(view)!.options.snapshot}": snapshot views are read-only`,
      });
      continue;
    }
    const readOnly = graph.fileChain(top).find((name) => nodes.get(name)?.options['read-only']);
    if (readOnly !== undefined) {
      problems.push({
        pointer: `${e.source.path}/writable`,
        at: 'value',
        message: `writable export "${id}" over read-only node "${readOnly}" (defined at ${at(nodes.get(readOnly)!.source)})`,
      });
    }
    // The native engine reads vpc, vdi, qed and vmdk but never writes them.
    const readOnlyFormat = graph
      .fileChain(top)
      .map((name) => nodes.get(name)?.options.driver)
      .find((d) => NATIVE_READ_ONLY_DRIVERS.includes(d as QemuOnlyDriver));
    if (doc.engine === 'native' && readOnlyFormat !== undefined) {
      problems.push({
        pointer: `${e.source.path}/writable`,
        at: 'value',
        message: `writable export "${id}" over a ${readOnlyFormat} image: the native engine reads ${readOnlyFormat} only (make the export read-only, or use spec.engine: qemu)`,
      });
    }
  }
}

/**
 * A FUSE and an NBD export may share nodes, but only one of them may write
 * through them: two writers of different types (a mount and network
 * clients) would each see the other's writes only through the node, with no
 * common flush or cache. Two writable FUSE exports keep their old rule
 * (allowed; the FUSE export stops trusting its read cache when shared).
 * Records `e` as a writer of its file chain; `writers` maps node → first writer.
 */
function sharedWriter(
  e: ExportSpec,
  graph: NodeGraph,
  writers: Map<string, ExportSpec>,
  problems: DocumentProblem[],
): void {
  for (const name of graph.fileChain(e.options['node-name'])) {
    const other = writers.get(name);
    if (!other) {
      writers.set(name, e);
      continue;
    }
    if (other.options.type === 'fuse' && e.options.type === 'fuse') continue;
    problems.push({
      pointer: `${e.source.path}/writable`,
      at: 'value',
      message: `writable ${e.options.type} export "${e.options.id}" writes through node "${name}", which writable ${other.options.type} export "${other.options.id}" (at ${at(other.source)}) already writes: an NBD export shares a node with another export only when at most one of them is writable`,
    });
    return;
  }
}
