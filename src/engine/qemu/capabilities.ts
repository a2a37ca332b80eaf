/**
 * What the qemu engine changes in place: a node's `read-only` (QMP
 * blockdev-reopen), and no export option: QEMU 7.2 cannot change a FUSE
 * export, so the plan replaces it (a remount; descriptors opened before get
 * ENOTCONN). QEMU reopens a file node by its name, and when one of QSD's own
 * exports is mounted over that name QSD would open its own mount and wait on
 * itself, so such an export is replaced around the reopen.
 */
import type { EngineCapabilities } from '../../reconcile/model.js';

const FUSE_REOPENABLE: readonly string[] = ['writable', 'growable', 'allow-other'];

export const qemuCapabilities: EngineCapabilities = {
  engine: 'qemu',
  nodeMutable: () => ['read-only'],
  exportMutable: () => [],
  exportRemounted: (type) => (type === 'fuse' ? FUSE_REOPENABLE : []),
  reopenUnderOwnMount: false,
};
