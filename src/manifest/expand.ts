/**
 * Expands one schema-valid document into normalized nodes and exports:
 * inline children get a node-name, sizes become numbers, defaults are filled,
 * and shorthand exports (`image:`) become the long form's graph.
 */
import { MAX_SIZE, parseSize } from './size.js';
import type {
  ExportOptions,
  ExportSpec,
  ManifestDocument,
  NbdExportConfig,
  NodeDriver,
  NodeOptions,
  NodeSpec,
  OnOffAuto,
  QemuOnlyDriver,
  SourcePos,
} from './types.js';

/** Finds the source position of a JSON pointer in the document being expanded. */
export type Locate = (pointer: string, at?: 'key' | 'value') => SourcePos;

/** A problem found after the schema passed, still as a pointer into the document. */
export interface DocumentProblem {
  pointer: string;
  at: 'key' | 'value';
  message: string;
}

/** The blockdev shape the schema admits (driver-specific fields optional). */
interface RawBlockdev {
  driver: 'file' | 'raw' | 'qcow2' | 'partition' | QemuOnlyDriver;
  'node-name'?: string;
  filename?: string;
  'read-only'?: boolean;
  locking?: OnOffAuto;
  'force-share'?: boolean;
  cache?: { direct?: boolean; 'no-flush'?: boolean };
  file?: string | RawBlockdev;
  backing?: string | RawBlockdev | null;
  offset?: number | string;
  size?: number | string;
  number?: number;
  snapshot?: string;
}

interface RawExport {
  type?: 'fuse' | 'nbd';
  id: string;
  'node-name'?: string;
  image?: string;
  format?: 'auto' | 'raw' | 'qcow2' | QemuOnlyDriver;
  partition?: number;
  snapshot?: string;
  mountpoint?: string;
  'create-mountpoint'?: boolean;
  writable?: boolean;
  growable?: boolean;
  'allow-other'?: OnOffAuto;
  overlay?: 'ephemeral';
  /** nbd: the NBD export name (default: the id). */
  name?: string;
  /** nbd: free text sent to clients. */
  description?: string;
}

/** The document shape the schema admits. */
export interface RawDocument {
  apiVersion: 'blkexport/v1';
  kind: 'ExportSet';
  metadata: { name: string; labels?: Record<string, string> };
  spec: { engine?: 'native' | 'qemu'; hosts?: string[]; blockdevs?: RawBlockdev[]; exports?: RawExport[] };
}

/** Drivers whose images can name a backing file (the `backing` option). */
const HAS_BACKING: readonly string[] = ['qcow2', 'vmdk', 'qed'];

/** Node-names of the nodes a shorthand export expands to. */
export function shorthandNodeNames(id: string): { file: string; format: string; partition: string } {
  return { file: `${id}-file`, format: `${id}-fmt`, partition: `${id}-part` };
}

/** A file node's own options: the path and how it locks. */
function fileOptions(b: RawBlockdev, opts: NodeOptions): void {
  opts.filename = b.filename!;
  opts.locking = b.locking ?? 'auto';
  if (b['force-share']) opts['force-share'] = true;
}

class Expander {
  readonly nodes: NodeSpec[] = [];
  readonly exports: ExportSpec[] = [];
  readonly problems: DocumentProblem[] = [];

  constructor(private readonly locate: Locate) {}

  size(pointer: string, value: number | string | undefined): number | undefined {
    if (value === undefined) return undefined;
    const r = parseSize(value);
    if (r.ok) return r.bytes;
    this.problems.push({ pointer, at: 'value', message: r.message });
    return undefined;
  }

  /** Adds a blockdev (and its inline children, first); returns its node-name. */
  blockdev(b: RawBlockdev, pointer: string, fallbackName: string, generatedFor?: string): string {
    const name = b['node-name'] ?? fallbackName;
    const child = (ref: string | RawBlockdev | null | undefined, role: 'file' | 'backing') => {
      if (ref === undefined || ref === null || typeof ref === 'string') return ref;
      return this.blockdev(ref, `${pointer}/${role}`, `${name}-${role}`, `inline ${role} of ${name}`);
    };
    const opts: NodeOptions = { 'node-name': name, driver: b.driver, 'read-only': b['read-only'] ?? false };
    if (b.driver === 'file') {
      fileOptions(b, opts);
    } else {
      const file = child(b.file, 'file');
      if (file !== undefined && file !== null) opts.file = file;
    }
    if (HAS_BACKING.includes(b.driver) && b.backing !== undefined)
      opts.backing = child(b.backing, 'backing') ?? null;
    if (b.driver === 'raw') {
      opts.offset = this.size(`${pointer}/offset`, b.offset) ?? 0;
      const size = this.size(`${pointer}/size`, b.size);
      if (size !== undefined) opts.size = size;
      if (size !== undefined && opts.offset + size > MAX_SIZE) {
        this.problems.push({
          pointer: `${pointer}/size`,
          at: 'value',
          message: `offset + size (${opts.offset} + ${size}) is larger than 2^53 - 1 bytes`,
        });
      }
    }
    if (b.driver === 'partition') opts.number = b.number!;
    if (b.snapshot !== undefined) opts.snapshot = b.snapshot; // the schema allows it on qcow2 only
    if (b.cache) opts.cache = { direct: b.cache.direct ?? false, 'no-flush': b.cache['no-flush'] ?? false };
    const spec: NodeSpec = { options: opts, source: this.locate(pointer) };
    if (generatedFor !== undefined && b['node-name'] === undefined) spec.generatedFor = generatedFor;
    this.nodes.push(spec);
    return name;
  }

  /**
   * An overlay export is writable by definition: `writable:` may be left out
   * or say true; `writable: false` contradicts it, and a size change of a
   * throwaway view has no meaning (`growable: true` is refused).
   */
  private overlayProblems(e: RawExport, pointer: string): void {
    if (e.overlay === undefined) return;
    if (e.writable === false)
      this.problems.push({
        pointer: `${pointer}/writable`,
        at: 'value',
        message:
          'overlay: ephemeral is a writable view (writes go to a throwaway overlay); writable: false contradicts it: leave writable: out, or drop overlay: for a read-only export',
      });
    if (e.growable === true)
      this.problems.push({
        pointer: `${pointer}/growable`,
        at: 'value',
        message:
          "overlay: ephemeral keeps the image's size (the overlay is a qcow2 image of the same size): growable: true is refused",
      });
  }

  /**
   * An export's options, keys in one fixed order (`overlay` only when set).
   * Object literals, not spreads: a spread with a conditional part cost about
   * ten times as much, per export of a 20000-export manifest.
   */
  private exportOptions(e: RawExport, nodeName: string, mountpoint: string | undefined): ExportOptions {
    const overlay = e.overlay;
    const writable = overlay !== undefined || (e.writable ?? false);
    if (e.type === 'nbd') {
      const nbd: NbdExportConfig = {
        type: 'nbd',
        id: e.id,
        writable,
        'node-name': nodeName,
        name: e.name ?? e.id,
      };
      if (overlay !== undefined) nbd.overlay = overlay;
      if (e.description !== undefined) nbd.description = e.description;
      return nbd;
    }
    const createMountpoint = e['create-mountpoint'] ?? false;
    const growable = e.growable ?? false;
    const allowOther = e['allow-other'] ?? 'auto';
    if (overlay === undefined)
      return {
        type: 'fuse',
        id: e.id,
        'create-mountpoint': createMountpoint,
        writable,
        growable,
        'allow-other': allowOther,
        'node-name': nodeName,
        mountpoint: mountpoint!,
      };
    return {
      type: 'fuse',
      id: e.id,
      'create-mountpoint': createMountpoint,
      writable,
      growable,
      'allow-other': allowOther,
      overlay,
      'node-name': nodeName,
      mountpoint: mountpoint!,
    };
  }

  export(e: RawExport, pointer: string): void {
    const overlay = e.overlay;
    this.overlayProblems(e, pointer);
    const source = this.locate(pointer);
    if (e.image === undefined) {
      const options = this.exportOptions(e, e['node-name']!, e.mountpoint);
      this.exports.push({ options, source, shorthand: false });
      return;
    }
    const writable = overlay !== undefined || (e.writable ?? false);
    const names = shorthandNodeNames(e.id);
    // An overlay reads the image read-only, sharing it as QEMU's force-share does (a running VM may hold it).
    const readOnly = overlay !== undefined || !writable;
    const format = e.format ?? 'auto';
    const why = `shorthand export ${e.id}`;
    const file: NodeOptions = {
      'node-name': names.file,
      driver: 'file',
      'read-only': readOnly,
      filename: e.image,
      locking: 'auto',
    };
    if (overlay !== undefined) file['force-share'] = true;
    this.nodes.push({ options: file, source, generatedFor: why });
    const fmt: NodeOptions = {
      'node-name': names.format,
      driver: format as NodeDriver,
      'read-only': readOnly,
      file: names.file,
    };
    if (format === 'auto') fmt.unresolved = ['driver'];
    if (format === 'raw') fmt.offset = 0;
    if (e.snapshot !== undefined) {
      fmt.snapshot = e.snapshot;
      if (format !== 'auto' && format !== 'qcow2') {
        this.problems.push({
          pointer: `${pointer}/snapshot`,
          at: 'key',
          message: `snapshot: internal snapshots are a qcow2 feature, and this export's format is ${format}`,
        });
      }
    }
    this.nodes.push({ options: fmt, source, generatedFor: why });
    let top = names.format;
    if (e.partition !== undefined) {
      this.nodes.push({
        options: {
          'node-name': names.partition,
          driver: 'partition',
          'read-only': readOnly,
          file: names.format,
          number: e.partition,
        },
        source,
        generatedFor: why,
      });
      top = names.partition;
    }
    const options = this.exportOptions(e, top, e.mountpoint ?? e.image);
    options.image = e.image;
    options.format = format;
    if (e.partition !== undefined) options.partition = e.partition;
    this.exports.push({ options, source, shorthand: true });
  }
}

/** Expands a schema-valid document; size problems (beyond 2^53) come back as problems. */
export function expandDocument(
  data: RawDocument,
  file: string,
  index: number,
  locate: Locate,
): { document: ManifestDocument; problems: DocumentProblem[] } {
  const x = new Expander(locate);
  (data.spec.blockdevs ?? []).forEach((b, i) => {
    x.blockdev(b, `/spec/blockdevs/${i}`, b['node-name']!);
  });
  (data.spec.exports ?? []).forEach((e, i) => {
    x.export(e, `/spec/exports/${i}`);
  });
  const document: ManifestDocument = {
    file,
    index,
    name: data.metadata.name,
    labels: data.metadata.labels ?? {},
    nodes: x.nodes,
    exports: x.exports,
    source: locate(''),
  };
  if (data.spec.engine !== undefined) document.engine = data.spec.engine;
  if (data.spec.hosts !== undefined) document.hosts = data.spec.hosts;
  return { document, problems: x.problems };
}
