/**
 * The node graph: opens children before their parents, wraps each driver
 * state into a BlockNode, and closes nodes in the reverse order of opening
 * (parents first, children last).
 */
import { BlkError } from '../errors.js';
import type { OpenContext, ReopenOptions } from './driver.js';
import { MAX_BACKING_DEPTH } from './limits.js';
import { type GraphNode, reopenTogether, wrapNode } from './node.js';
import type { NodeOptions } from './options.js';
import type { PathPolicy } from './path-policy.js';
import { findDriver } from './registry.js';
import type { BlockNode } from './types.js';

type Chain = { depth: number; seen: ReadonlySet<string> };

export class BlockGraph {
  readonly policy: PathPolicy;
  /** Every node this graph opened, in opening order (children before parents). */
  private readonly opened: GraphNode[] = [];
  private readonly byName = new Map<string, GraphNode>();
  private implicitCounter = 0;
  private closed = false;

  constructor(policy: PathPolicy) {
    this.policy = policy;
  }

  /** The node called `name`, if this graph opened it. */
  get(name: string): BlockNode | undefined {
    return this.byName.get(name);
  }

  /** Every node, children before parents. */
  nodes(): readonly BlockNode[] {
    return this.opened;
  }

  /** Opens one node and its inline children (named children must already be open in this graph). */
  openNode(opts: NodeOptions, chain: Chain = { depth: 0, seen: new Set() }): Promise<BlockNode> {
    return this.open(opts, chain);
  }

  private generatedName(driver: string): string {
    this.implicitCounter += 1;
    return `#${driver}${this.implicitCounter}`;
  }

  private async resolveChild(ref: string | NodeOptions, parentRO: boolean, chain: Chain): Promise<BlockNode> {
    if (typeof ref === 'string') {
      const n = this.byName.get(ref);
      if (!n) throw new BlkError('STATE', `no node called '${ref}' is open`);
      return n;
    }
    return this.open({ readOnly: parentRO, ...ref }, chain);
  }

  private async open(opts: NodeOptions, chain: Chain): Promise<GraphNode> {
    if (this.closed) throw new BlkError('INTERNAL', 'the block graph is closed');
    const driver = findDriver(opts.driver);
    const nodeName = opts.nodeName ?? this.generatedName(opts.driver);
    if (this.byName.has(nodeName)) throw new BlkError('STATE', `node-name '${nodeName}' is already in use`);
    const readOnly = opts.readOnly ?? false;

    let file: BlockNode | undefined;
    if (driver.role !== 'protocol') {
      if (opts.file === undefined) {
        throw new BlkError('IMAGE_INVALID', `node '${nodeName}': driver ${driver.name} needs a 'file' child`);
      }
      file = await this.resolveChild(opts.file, readOnly, chain);
    }
    let backing: BlockNode | null | undefined;
    if (opts.backing === null) backing = null;
    else if (opts.backing !== undefined) backing = await this.resolveChild(opts.backing, true, chain);

    const ctx: OpenContext = {
      nodeName,
      readOnly,
      options: opts,
      file,
      backing,
      policy: this.policy,
      chain,
      openChild: (childOpts, childChain) => {
        if (childChain.depth > MAX_BACKING_DEPTH) {
          throw new BlkError('BACKING_CHAIN', `backing chain longer than ${MAX_BACKING_DEPTH} images`, {
            file: file?.filename,
          });
        }
        return this.open(childOpts, childChain);
      },
    };
    const state = await driver.open(ctx);
    const desc = driver.describe?.(state) ?? { filename: file?.filename, fileKey: file?.fileKey };
    const node = wrapNode(driver, state, { nodeName, readOnly, ...desc });
    this.opened.push(node);
    this.byName.set(nodeName, node);
    return node;
  }

  /**
   * Changes one node's mutable options in place (the engine's "reopen node"
   * step). Only this node: the plan reopens each node it changes, children
   * before parents when they become writable, parents first otherwise.
   */
  async reopenNode(name: string, opts: ReopenOptions): Promise<void> {
    const node = this.byName.get(name);
    if (!node) throw new BlkError('STATE', `no node called '${name}' is open`);
    await reopenTogether([node], opts);
  }

  /**
   * Closes one node (the engine's "remove node" step). Refused while another
   * node uses it as a child. Its generated children (inline options, an
   * image's own backing file) go with it when nothing else uses them.
   */
  async closeNode(name: string): Promise<void> {
    const node = this.byName.get(name);
    if (!node) throw new BlkError('STATE', `no node called '${name}' is open`);
    const user = this.opened.find((n) => n !== node && n.children.includes(node));
    if (user) throw new BlkError('STATE', `node '${name}' is still used by node '${user.nodeName}'`);
    const children = [...node.children];
    this.opened.splice(this.opened.indexOf(node), 1);
    this.byName.delete(name);
    await node.close();
    for (const c of children) {
      const inUse = this.opened.some((n) => n.children.includes(c));
      if (c.nodeName.startsWith('#') && !inUse && this.byName.has(c.nodeName))
        await this.closeNode(c.nodeName);
    }
  }

  /** Closes every node, parents first; keeps going after an error and throws the first one. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let first: unknown;
    for (const n of [...this.opened].reverse()) {
      try {
        await n.close();
      } catch (e) {
        first ??= e;
      }
    }
    this.opened.length = 0;
    this.byName.clear();
    if (first !== undefined) throw first;
  }
}

/** Opens one node (and its inline children) in a fresh graph; close the graph to release it. */
export async function openNode(
  opts: NodeOptions,
  policy: PathPolicy,
): Promise<{ node: BlockNode; graph: BlockGraph }> {
  const graph = new BlockGraph(policy);
  try {
    return { node: await graph.openNode(opts), graph };
  } catch (e) {
    await graph.close().catch(() => {});
    throw e;
  }
}

/**
 * Opens a set of named nodes that refer to each other by node-name, children
 * before parents; refuses unknown references and reference cycles.
 */
export async function openGraph(nodes: readonly NodeOptions[], policy: PathPolicy): Promise<BlockGraph> {
  const byName = new Map<string, NodeOptions>();
  for (const n of nodes) {
    if (!n.nodeName) throw new BlkError('IMAGE_INVALID', `a top-level ${n.driver} node needs a node-name`);
    if (byName.has(n.nodeName))
      throw new BlkError('IMAGE_INVALID', `node-name '${n.nodeName}' is used twice`);
    byName.set(n.nodeName, n);
  }
  const order: NodeOptions[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const refsOf = (o: NodeOptions): string[] => {
    const out: string[] = [];
    for (const r of [o.file, o.backing]) {
      if (typeof r === 'string') out.push(r);
      else if (r) out.push(...refsOf(r));
    }
    return out;
  };
  const visit = (name: string, from: string | undefined) => {
    const st = state.get(name);
    if (st === 'done') return;
    if (st === 'visiting')
      throw new BlkError('IMAGE_INVALID', `node '${name}' refers to itself through its children`);
    const n = byName.get(name);
    if (!n) throw new BlkError('IMAGE_INVALID', `node '${from}' refers to unknown node '${name}'`);
    state.set(name, 'visiting');
    for (const r of refsOf(n)) visit(r, name);
    state.set(name, 'done');
    order.push(n);
  };
  for (const name of byName.keys()) visit(name, undefined);

  const graph = new BlockGraph(policy);
  try {
    for (const n of order) await graph.openNode(n);
    return graph;
  } catch (e) {
    await graph.close().catch(() => {});
    throw e;
  }
}
