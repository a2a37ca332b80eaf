/**
 * Normalized node options, the shape the engine hands to openGraph/openNode.
 * Names are camelCase spellings of QEMU's QAPI options (node-name → nodeName,
 * read-only → readOnly); the manifest layer does the translation.
 */

export interface NodeOptions {
  driver: string;
  nodeName?: string;
  readOnly?: boolean;
  /** `file` driver: the host path. */
  filename?: string;
  /** `file` driver: QEMU-compatible image locking (default auto: lock when OFD locks exist). */
  locking?: 'auto' | 'on' | 'off';
  /**
   * `file` driver: QEMU's `force-share` (read-only nodes only): lock as a
   * reader that refuses others nothing, so an image a VM holds writable opens.
   */
  forceShare?: boolean;
  /** Format and filter drivers: the child, as a node-name or inline options. */
  file?: string | NodeOptions;
  /** qcow2: a node-name, inline options, `null` for none; absent = follow the image's own backing file. */
  backing?: string | NodeOptions | null;
  /** raw: window start in the child. */
  offset?: number;
  /** raw: window length. */
  size?: number;
  /** partition: the partition of the child's MBR/GPT to show (Linux numbering: MBR logicals from 5, GPT by slot). */
  number?: number;
  /** qcow2: a read-only view of this internal snapshot (its id, else its name). */
  snapshot?: string;
  /** qcow2: bound of the L2-table cache in bytes. */
  l2CacheBytes?: number;
  /**
   * file (internal, for files named inside images): after opening, the file
   * the fd really reaches must lie inside one of these real directories
   * (closes the window between resolving a name and opening it).
   */
  confineTo?: readonly string[];
}
