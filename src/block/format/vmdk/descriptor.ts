/**
 * The VMDK text descriptor: `key = "value"` lines (version, CID, parentCID,
 * createType, parentFileNameHint, ddb.*) and extent lines
 * (`RW 4194304 FLAT "disk-f001.vmdk" 0`). A pure parser: the text comes
 * from an untrusted image, so its size is bounded before it gets here, every
 * number is checked, and every refusal names the file, the line and the field.
 *
 * Like QEMU, the first occurrence of a key counts and lines that are neither
 * comments, keys nor extent lines are ignored; unlike QEMU, an extent line
 * that does not parse is refused instead of skipped (skipping one shifts
 * every later extent).
 */
import { BlkError } from '../../../errors.js';

/** Largest descriptor read (QEMU reads at most 1 MiB - 1 bytes). */
export const MAX_DESCRIPTOR_BYTES = 1024 * 1024 - 1;
/** Most extent lines in one descriptor (a 2 TiB twoGbMaxExtent* disk has 1024). */
export const MAX_EXTENTS = 4096;
/** Longest parent or extent file name (QEMU's PATH_MAX bound). */
export const MAX_NAME_BYTES = 4095;
/** Sectors a byte count must fit in: the guest size stays below 2^53. */
const MAX_SECTORS = Math.floor(Number.MAX_SAFE_INTEGER / 512);

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';
export type ExtentType = 'FLAT' | 'SPARSE' | 'ZERO' | 'VMFS' | 'VMFSSPARSE' | 'SESPARSE';

export interface ExtentLine {
  /** 1-based line number in the descriptor. */
  line: number;
  access: ExtentAccess;
  sectors: number;
  type: ExtentType;
  /** The file name as written (absent for ZERO extents). */
  filename?: string;
  /** FLAT: where the extent starts in its file, in sectors (VMFS: 0). */
  offsetSectors: number;
}

export interface Descriptor {
  version?: number;
  cid?: number;
  parentCid?: number;
  createType?: string;
  parentFileNameHint?: string;
  /** Line numbers of the keys above, for error messages. */
  lines: Record<string, number>;
  extents: ExtentLine[];
}

/** createType values QEMU opens from a descriptor file (vmfsSparse and seSparse are refused per extent). */
export const DESCRIPTOR_CREATE_TYPES: readonly string[] = [
  'monolithicFlat',
  'vmfs',
  'vmfsSparse',
  'twoGbMaxExtentSparse',
  'twoGbMaxExtentFlat',
];

const EXTENT_TYPES: readonly string[] = ['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'SESPARSE'];
const ACCESS: readonly string[] = ['RW', 'RDONLY', 'NOACCESS'];
// access, sectors, type, then an optional "file name" and an optional offset.
const EXTENT_RE =
  /^(\S+)[ \t]+([+-]?[0-9]+)[ \t]+(\S+)(?:[ \t]+"([^"\r\n]*)"(?:[ \t]+([+-]?[0-9]+))?)?[ \t]*$/;
const KEY_RE = /^([A-Za-z][A-Za-z0-9_.]*)[ \t]*=[ \t]*(.*)$/;

/** The descriptor text of `bytes`: up to the first NUL (a C string, as QEMU reads it), as latin1. */
export function descriptorText(bytes: Buffer): string {
  const nul = bytes.indexOf(0);
  return bytes.toString('latin1', 0, nul < 0 ? bytes.length : nul);
}

function unquote(v: string): string {
  const t = v.trim();
  return t.length >= 2 && t.startsWith('"') && t.endsWith('"') ? t.slice(1, -1) : t;
}

/**
 * Parses descriptor text found in `file`; throws IMAGE_INVALID /
 * IMAGE_UNSUPPORTED naming line and field. `keysOnly`: the descriptor of a
 * monolithic sparse file, of which QEMU reads only the CIDs and the parent
 * name (its extent line and version are not used, so not checked).
 */
export function parseDescriptor(text: string, file: string, keysOnly = false): Descriptor {
  if (text.length > MAX_DESCRIPTOR_BYTES) {
    throw new BlkError('IMAGE_INVALID', `descriptor of ${text.length} bytes is too large`, {
      file,
      field: 'descriptor',
    });
  }
  const d: Descriptor = { lines: {}, extents: [] };
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) continue;
    const first = line.split(/[ \t]/, 1)[0]!;
    if (ACCESS.includes(first)) {
      if (keysOnly) continue;
      if (d.extents.length >= MAX_EXTENTS) {
        throw new BlkError('IMAGE_UNSUPPORTED', `more than ${MAX_EXTENTS} extents`, {
          file,
          line: i + 1,
          field: 'extent',
        });
      }
      d.extents.push(parseExtentLine(line, i + 1, file));
      continue;
    }
    const kv = KEY_RE.exec(line);
    if (kv && !(keysOnly && kv[1] === 'version')) setKey(d, kv[1]!, kv[2]!, i + 1, file);
  }
  return d;
}

function setKey(d: Descriptor, key: string, raw: string, line: number, file: string): void {
  if (d.lines[key] !== undefined) return; // the first occurrence counts, as with QEMU's strstr
  const bad = (why: string) => new BlkError('IMAGE_INVALID', `${key}: ${why}`, { file, line, field: key });
  const value = unquote(raw);
  switch (key) {
    case 'version': {
      if (!/^[0-9]{1,9}$/.test(value)) throw bad(`'${printable(value)}' is not a version number`);
      const v = Number(value);
      if (v < 1 || v > 3) {
        throw new BlkError('IMAGE_UNSUPPORTED', `descriptor version ${v} is not supported (1 to 3)`, {
          file,
          line,
          field: key,
        });
      }
      d.version = v;
      break;
    }
    case 'CID':
    case 'parentCID': {
      // QEMU reads these with sscanf("%x"): hex digits, an optional 0x.
      const m = /^(?:0[xX])?([0-9a-fA-F]{1,8})$/.exec(value);
      if (!m) throw bad(`'${printable(value)}' is not a 32-bit hex number`);
      if (key === 'CID') d.cid = Number.parseInt(m[1]!, 16);
      else d.parentCid = Number.parseInt(m[1]!, 16);
      break;
    }
    case 'createType':
      if (value.length > 127) throw bad('longer than 127 characters');
      d.createType = value;
      break;
    case 'parentFileNameHint':
      if (!raw.trim().startsWith('"') || !raw.trim().endsWith('"') || raw.trim().length < 2)
        throw bad('the name must be quoted');
      if (value.length > MAX_NAME_BYTES) throw bad(`name longer than ${MAX_NAME_BYTES} bytes`);
      d.parentFileNameHint = value;
      break;
    default:
      return;
  }
  d.lines[key] = line;
}

function sectorsField(s: string | undefined, what: string, line: number, file: string, min: number): number {
  const bad = (why: string) =>
    new BlkError('IMAGE_INVALID', `extent ${what} ${why}`, { file, line, field: `extent ${what}` });
  if (s === undefined) throw bad('is missing');
  if (!/^\+?[0-9]{1,16}$/.test(s)) throw bad(`'${s}' is not a sector count`);
  const n = Number(s);
  if (n < min || n > MAX_SECTORS) throw bad(`${n} is outside ${min}..${MAX_SECTORS}`);
  return n;
}

function parseExtentLine(line: string, no: number, file: string): ExtentLine {
  const m = EXTENT_RE.exec(line);
  const place = (field: string) => ({ file, line: no, field });
  if (!m) throw new BlkError('IMAGE_INVALID', `invalid extent line: ${printable(line)}`, place('extent'));
  const [, access, sectors, type, name, offset] = m;
  if (!EXTENT_TYPES.includes(type!)) {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      `extent type '${printable(type!)}' is not supported`,
      place('type'),
    );
  }
  if (type === 'SESPARSE') {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      'seSparse extents (ESXi space-efficient sparse) are not supported',
      place('type'),
    );
  }
  const e: ExtentLine = {
    line: no,
    access: access as ExtentAccess,
    sectors: sectorsField(sectors, 'size', no, file, 1),
    type: type as ExtentType,
    offsetSectors: 0,
  };
  if (type === 'ZERO') {
    if (name !== undefined)
      throw new BlkError('IMAGE_INVALID', 'a ZERO extent names no file', place('filename'));
    return e;
  }
  if (name === undefined || name === '')
    throw new BlkError('IMAGE_INVALID', `a ${type} extent needs a quoted file name`, place('filename'));
  if (name.length > MAX_NAME_BYTES)
    throw new BlkError(
      'IMAGE_INVALID',
      `extent file name longer than ${MAX_NAME_BYTES} bytes`,
      place('filename'),
    );
  e.filename = name;
  if (type === 'FLAT') e.offsetSectors = sectorsField(offset, 'offset', no, file, 0);
  else if (offset !== undefined)
    throw new BlkError('IMAGE_INVALID', `a ${type} extent takes no offset`, place('extent offset'));
  return e;
}

/** A string from an image, safe to print. */
export function printable(s: string): string {
  const t = s.length > 80 ? `${s.slice(0, 80)}...` : s;
  return t.replace(/[\x00-\x1f\x7f-\xff]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
