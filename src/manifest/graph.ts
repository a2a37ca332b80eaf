/**
 * The node graph of a set of manifest nodes: each node names its children by
 * node-name (`file`, then `backing`). The one walk of that graph, used by the
 * manifest check, the diff, the agent and both engines: children, parents,
 * what lies below or above a node, the file chain a writer writes through,
 * bottom-up order and cycles. Unknown names and cycles never hang a walk.
 */

/** The fields of a node the graph looks at. */
export interface GraphNodeOptions {
  'node-name': string;
  file?: string;
  backing?: string | null;
}

export type ChildRole = 'file' | 'backing';

/** One edge: the child (or parent) at the other end, and the role of the child. */
export interface Edge {
  role: ChildRole;
  name: string;
}

/** A node's children by node-name: file first, then backing. */
export function childrenOf(n: GraphNodeOptions): Edge[] {
  const out: Edge[] = [];
  if (typeof n.file === 'string') out.push({ role: 'file', name: n.file });
  if (typeof n.backing === 'string') out.push({ role: 'backing', name: n.backing });
  return out;
}

export class NodeGraph<N extends GraphNodeOptions = GraphNodeOptions> {
  private readonly byName = new Map<string, N>();
  private parentIndex: Map<string, Edge[]> | undefined;

  /** Nodes in declaration order; of two nodes with one name, the first counts. */
  constructor(nodes: Iterable<N>) {
    for (const n of nodes) if (!this.byName.has(n['node-name'])) this.byName.set(n['node-name'], n);
  }

  get(name: string): N | undefined {
    return this.byName.get(name);
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  /** Node-names in declaration order. */
  names(): string[] {
    return [...this.byName.keys()];
  }

  children(name: string): Edge[] {
    const n = this.byName.get(name);
    return n ? childrenOf(n) : [];
  }

  /** The nodes that name `name` as a child, each with the role `name` plays for it. */
  parents(name: string): Edge[] {
    if (!this.parentIndex) {
      this.parentIndex = new Map();
      for (const n of this.byName.values()) {
        for (const c of childrenOf(n)) {
          const list = this.parentIndex.get(c.name) ?? [];
          list.push({ role: c.role, name: n['node-name'] });
          this.parentIndex.set(c.name, list);
        }
      }
    }
    return this.parentIndex.get(name) ?? [];
  }

  /** `name` and every node below it (file and backing), depth-first, file first; names not in the graph included once. */
  below(name: string): string[] {
    const out: string[] = [];
    const seen = new Set<string>();
    const visit = (x: string): void => {
      if (seen.has(x)) return;
      seen.add(x);
      out.push(x);
      for (const c of this.children(x)) visit(c.name);
    };
    visit(name);
    return out;
  }

  /**
   * `name` and its file children downwards: the nodes a writer writes
   * through (a backing file is only read).
   */
  fileChain(name: string): string[] {
    const out: string[] = [];
    for (let x: string | undefined = name; x !== undefined && !out.includes(x); ) {
      out.push(x);
      const f: string | undefined = this.byName.get(x)?.file;
      x = typeof f === 'string' ? f : undefined;
    }
    return out;
  }

  /**
   * Every node above any of `names` (parents, their parents, ...), each with
   * the first edge that reached it: `{role, name}` names the child below it.
   */
  above(names: Iterable<string>): Map<string, Edge> {
    const out = new Map<string, Edge>();
    const queue = [...names];
    const start = new Set(queue);
    for (let child = queue.shift(); child !== undefined; child = queue.shift()) {
      for (const p of this.parents(child)) {
        if (out.has(p.name) || start.has(p.name)) continue;
        out.set(p.name, { role: p.role, name: child });
        queue.push(p.name);
      }
    }
    return out;
  }

  /** Node-names children before parents, roots taken in `order` (default: declaration order). */
  bottomUp(order: Iterable<string> = this.byName.keys()): string[] {
    const out: string[] = [];
    const seen = new Set<string>();
    const visit = (name: string): void => {
      if (seen.has(name)) return;
      seen.add(name);
      if (!this.byName.has(name)) return;
      for (const c of this.children(name)) visit(c.name);
      out.push(name);
    };
    for (const name of order) visit(name);
    return out;
  }

  /** Cycles through file/backing, each once, as the node-names along it (first node first). */
  cycles(): string[][] {
    const state = new Map<string, 'visiting' | 'done'>();
    const found: string[][] = [];
    const keys = new Set<string>();
    const visit = (name: string, trail: string[]): void => {
      const s = state.get(name);
      if (s === 'done') return;
      if (s === 'visiting') {
        const cycle = trail.slice(trail.indexOf(name));
        const key = [...cycle].sort().join(',');
        if (!keys.has(key)) {
          keys.add(key);
          found.push(cycle);
        }
        return;
      }
      if (!this.byName.has(name)) return;
      state.set(name, 'visiting');
      for (const c of this.children(name)) visit(c.name, [...trail, name]);
      state.set(name, 'done');
    };
    for (const name of this.byName.keys()) visit(name, []);
    return found;
  }
}
