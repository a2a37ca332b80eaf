/**
 * Which nodes are open read-write: a node is writable only while a writable
 * export writes through it (the export's node and its file chain) and the
 * manifest allows it (`read-only: false`, the default). Everything else is
 * opened read-only, so a read-only export never holds an image writable (and
 * never takes QEMU's write lock). The plan derives this; engines only apply it.
 */
import { NodeGraph } from '../manifest/graph.js';
import type { Desired } from './model.js';

/** `desired` with each node's `read-only` as it will be opened. Pure; unchanged nodes keep their objects. */
export function deriveWritability(desired: Desired): Desired {
  const graph = new NodeGraph(desired.nodes.map((n) => n.options));
  const written = new Set<string>();
  for (const e of desired.exports) {
    // An overlay export writes into its overlay, never through its nodes.
    if (e.options.writable && e.options.overlay === undefined)
      for (const name of graph.fileChain(e.options['node-name'])) written.add(name);
  }
  return {
    exports: desired.exports,
    nodes: desired.nodes.map((n) =>
      n.options['read-only'] || written.has(n.options['node-name'])
        ? n
        : { ...n, options: { ...n.options, 'read-only': true } },
    ),
  };
}
