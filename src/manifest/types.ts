/**
 * Manifests after loading: every blockdev flattened into normalized node
 * options (inline children named, sizes as numbers, defaults filled) and every
 * export in long form. Option names keep QEMU's QAPI spelling, as in the YAML.
 */
import type { BlkError } from '../errors.js';

/** Where a node or an export was written: file, 1-based line and column, JSON pointer in the document. */
export interface SourcePos {
  file: string;
  line: number;
  col: number;
  path: string;
}

/** Format drivers beyond qcow2 and raw (QEMU's own drivers; the native engine reads them too). */
export type QemuOnlyDriver = 'vmdk' | 'vhdx' | 'vpc' | 'vdi' | 'qed';

/** Format drivers the native engine does not open (the qemu engine does): none since every format has a native reader. */
export const QEMU_ONLY_DRIVERS: readonly QemuOnlyDriver[] = [];

/** Format drivers the native engine opens read-only (a writable export over them needs the qemu engine). */
export const NATIVE_READ_ONLY_DRIVERS: readonly QemuOnlyDriver[] = ['vpc', 'vdi', 'qed', 'vmdk', 'vhdx'];

/** `auto`: the format is probed from the image's magic when the node is opened. */
export type NodeDriver = 'file' | 'raw' | 'qcow2' | 'partition' | QemuOnlyDriver | 'auto';

/** The engines a manifest can ask for. */
export type EngineName = 'native' | 'qemu';

/** What an engine may have to resolve when it applies a node (shorthand `format: auto`). */
export type Unresolved = 'driver';

/** QEMU's OnOffAuto (locking, allow-other). */
export type OnOffAuto = 'auto' | 'on' | 'off';

/** Normalized options of one block node; children are named by node-name, never inline. */
export interface NodeOptions {
  'node-name': string;
  driver: NodeDriver;
  /** true: always read-only; false: read-write while a writable export writes through the node. */
  'read-only': boolean;
  /** file: the host path (absolute). */
  filename?: string;
  /** file: QEMU-compatible image locking. */
  locking?: OnOffAuto;
  /** file: QEMU's force-share (read-only only): a reader that refuses others nothing. Absent: false. */
  'force-share'?: boolean;
  cache?: { direct: boolean; 'no-flush': boolean };
  /** Format drivers: the node-name of the protocol child. */
  file?: string;
  /** qcow2 (vmdk, qed): node-name of the backing node, null for none; absent: follow the image's own backing file. */
  backing?: string | null;
  /** raw: window start in bytes (0 unless given). */
  offset?: number;
  /** raw: window length in bytes; absent: to the end of the child. */
  size?: number;
  /** partition: the partition number (MBR or GPT, Linux numbering); the window comes from the table. */
  number?: number;
  /** qcow2: a read-only view of this internal snapshot (id, else name). */
  snapshot?: string;
  /** Options the engine fills in when it applies the node ("resolved when applied"). */
  unresolved?: Unresolved[];
}

/** What every export type has (long form; the shorthand fields stay for display). */
interface ExportCommon {
  id: string;
  'node-name': string;
  writable: boolean;
  /** ephemeral: writes go to a temporary qcow2 overlay over the (read-only) node; `writable` is then true. */
  overlay?: 'ephemeral';
  /** Shorthand only: the image the export was written with. */
  image?: string;
  /** Shorthand only: the requested format (auto: probed when applied). */
  format?: 'auto' | 'raw' | 'qcow2' | QemuOnlyDriver;
  /** Shorthand only: the partition exported. */
  partition?: number;
}

/** Normalized options of one FUSE export: a node as one raw file on `mountpoint`. */
export interface FuseExportConfig extends ExportCommon {
  type: 'fuse';
  mountpoint: string;
  'create-mountpoint': boolean;
  growable: boolean;
  'allow-other': OnOffAuto;
}

/** Normalized options of one NBD export: a node served by the host's NBD server under `name`. */
export interface NbdExportConfig extends ExportCommon {
  type: 'nbd';
  /** The NBD export name clients ask for (default: the id); unique per host. */
  name: string;
  /** Sent to clients that ask (NBD_INFO_DESCRIPTION, `nbdinfo --list`). */
  description?: string;
}

/** Normalized options of one export, by type. */
export type ExportOptions = FuseExportConfig | NbdExportConfig;

/** The mountpoint of a FUSE export; undefined for types that have none. */
export function mountpointOf(e: ExportOptions): string | undefined {
  return e.type === 'fuse' ? e.mountpoint : undefined;
}

/** A node as declared, with where it came from. */
export interface NodeSpec {
  options: NodeOptions;
  source: SourcePos;
  /** Set for nodes the user did not name: why the node exists ("inline file of fmt0", "shorthand export foo"). */
  generatedFor?: string;
}

/** An export as declared, with where it came from. */
export interface ExportSpec {
  options: ExportOptions;
  source: SourcePos;
  /** True when written as shorthand (`image:`). */
  shorthand: boolean;
}

/** One valid YAML document (one ExportSet). */
export interface ManifestDocument {
  file: string;
  /** 0-based index of the document in its file. */
  index: number;
  name: string;
  labels: Record<string, string>;
  /** Absent: the agent's default engine (--engine). */
  engine?: EngineName;
  /** Absent: every host. */
  hosts?: string[];
  nodes: NodeSpec[];
  exports: ExportSpec[];
  source: SourcePos;
}

/** One manifest file: valid as a whole, or refused with every problem found. */
export interface ManifestFile {
  file: string;
  valid: boolean;
  /** The documents that validated; when `valid` is false they do not count as desired state. */
  documents: ManifestDocument[];
  problems: BlkError[];
}
