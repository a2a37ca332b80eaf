/**
 * What the qemu engine applied, kept next to the QMP socket: QEMU reports its
 * nodes and exports, but not in the manifest's terms (an `auto` driver, a
 * create-mountpoint, defaults), and the diff contract needs observed options
 * exactly as the steps gave them. A restarted agent reads this file, checks
 * each entry against QSD's own query results, and so plans nothing when
 * nothing changed.
 */
import { readFile, rename, writeFile } from 'node:fs/promises';
import type { ExportOptions, NodeOptions, ObservedNode } from '../../reconcile/model.js';

/** One node as applied: the manifest options, what we resolved, and the exact blockdev-add arguments. */
export interface AppliedNode {
  options: NodeOptions;
  resolved?: ObservedNode['resolved'];
  args: Record<string, unknown>;
  /** Nodes we opened for the backing chain the image names (top-down), removed with this node. */
  hidden?: string[];
  /** A file node's `dev:ino` when QSD opened it (drift when the path names another file). */
  fileKey?: string;
}

/** One export as applied. */
export interface AppliedExport {
  options: ExportOptions;
  /** We created the mountpoint file (create-mountpoint), so we remove it with the export. */
  createdMountpoint: boolean;
}

/** The state file: which QSD (pid) it describes, and what was applied to it. */
export interface QemuState {
  version: 1;
  pid: number;
  nodes: AppliedNode[];
  exports: AppliedExport[];
  /** The address this daemon's NBD server listens on, once started (type: nbd exports). */
  nbdServer?: string;
}

/** Nothing applied to any daemon. */
export function emptyState(pid = 0): QemuState {
  return { version: 1, pid, nodes: [], exports: [] };
}

/** Reads the state file; a missing or unreadable one is the empty state (QSD's contents then count as unknown). */
export async function loadState(path: string): Promise<QemuState> {
  try {
    const s = JSON.parse(await readFile(path, 'utf8')) as Partial<QemuState>;
    if (s.version === 1 && typeof s.pid === 'number' && Array.isArray(s.nodes) && Array.isArray(s.exports))
      return s as QemuState;
  } catch {
    // none yet, or torn: treat as empty
  }
  return emptyState();
}

/** Writes the state file atomically (temporary file, then rename). */
export async function saveState(path: string, state: QemuState): Promise<void> {
  const tmp = `${path}.tmp`;
  await writeFile(tmp, `${JSON.stringify(state, null, 1)}\n`, { mode: 0o600 });
  await rename(tmp, path);
}
