/**
 * The scope of an incremental pass: which nodes and exports a change of some
 * manifest files can touch. Pure. Names are unique across the host's
 * manifests (collisions are checked host-wide before this), and a document's
 * node graph never leaves the document (references resolve within it), so a
 * changed document touches its own names, old and new, plus one cross-manifest
 * link: a node whose image file is another export's mountpoint (an export
 * stacked on an export), in either direction. The scope is closed over that
 * link. Everything outside it is left as the last pass made it; the periodic
 * full pass still looks at everything.
 */
import type { ManifestFile } from '../manifest/types.js';
import type { Desired, ExportOptions, NodeOptions, Observed, Scope } from '../reconcile/model.js';

export type PassScope = Scope;

/** Names and paths collected so far. */
class Collected {
  readonly nodes = new Set<string>();
  readonly exports = new Set<string>();
  /** Image files of collected nodes. */
  readonly files = new Set<string>();
  /** Mountpoints of collected exports. */
  readonly mounts = new Set<string>();

  add(nodes: readonly { options: NodeOptions }[], exports: readonly { options: ExportOptions }[]): void {
    for (const n of nodes) {
      this.nodes.add(n.options['node-name']);
      if (n.options.filename !== undefined) this.files.add(n.options.filename);
    }
    for (const e of exports) {
      this.exports.add(e.options.id);
      if (e.options.type === 'fuse') this.mounts.add(e.options.mountpoint);
    }
  }

  /** True when the document shares a name with what is collected, or stacks on it, or under it. */
  touches(doc: Desired): boolean {
    return (
      doc.nodes.some(
        (n) =>
          this.nodes.has(n.options['node-name']) ||
          (n.options.filename !== undefined && this.mounts.has(n.options.filename)),
      ) ||
      doc.exports.some(
        (e) =>
          this.exports.has(e.options.id) ||
          (e.options.type === 'fuse' && this.files.has(e.options.mountpoint)),
      )
    );
  }
}

/** The desired state by document (metadata.name, the origin's `manifest`). */
function byDocument(all: Desired): Map<string, Desired> {
  const out = new Map<string, Desired>();
  const of = (name: string): Desired => {
    const d = out.get(name) ?? { nodes: [], exports: [] };
    out.set(name, d);
    return d;
  };
  for (const n of all.nodes) of(n.origin.manifest).nodes.push(n);
  for (const e of all.exports) of(e.origin.manifest).exports.push(e);
  return out;
}

/**
 * The scope of a change: `changed` holds the versions of the changed files
 * before and after (every document, whichever host it names); `all` is the
 * host's whole desired state after the change.
 */
export function scopeOfChange(changed: readonly ManifestFile[], all: Desired): PassScope {
  const c = new Collected();
  for (const f of changed) for (const d of f.documents) c.add(d.nodes, d.exports);
  const docs = byDocument(all);
  for (let grew = true; grew; ) {
    grew = false;
    for (const [name, doc] of docs) {
      if (!c.touches(doc)) continue;
      docs.delete(name);
      c.add(doc.nodes, doc.exports);
      grew = true;
    }
  }
  return { nodes: c.nodes, exports: c.exports };
}

/** The part of `desired` in `scope`. */
export function desiredInScope(desired: Desired, scope: PassScope): Desired {
  return {
    nodes: desired.nodes.filter((n) => scope.nodes.has(n.options['node-name'])),
    exports: desired.exports.filter((e) => scope.exports.has(e.options.id)),
  };
}

/** The part of `observed` in `scope`. */
export function observedInScope(observed: Observed, scope: PassScope): Observed {
  return {
    nodes: observed.nodes.filter((n) => scope.nodes.has(n.options['node-name'])),
    exports: observed.exports.filter((e) => scope.exports.has(e.options.id)),
  };
}
