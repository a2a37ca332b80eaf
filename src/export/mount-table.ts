/**
 * The kernel's mount table, as this process sees it (/proc/self/mountinfo),
 * and how our own FUSE mounts are recognized in it: fstype `fuse.blkexport`,
 * source `blkexport:<pid>` (one-shot `mount`) or `blkexport-agent:<pid>`.
 */
import { readFileSync } from 'node:fs';
import { readlink, realpath } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';

export interface MountEntry {
  mountId: number;
  parentId: number;
  /** The mounted file system's device, `major:minor` (a FUSE mount's minor is its connection's number). */
  device: string;
  mountpoint: string;
  fstype: string;
  source: string;
  mountOptions: string;
  superOptions: string;
}

export const FUSE_SUBTYPE = 'blkexport';
export const FUSE_FSTYPE = `fuse.${FUSE_SUBTYPE}`;

export type MountOwner = { kind: 'mount' | 'agent'; pid: number };

/** Undoes mountinfo's octal escapes (\040 for space, \011, \012, \134). */
function unescapeMountField(s: string): string {
  // Most fields have nothing escaped: the table is parsed several times per agent pass, a thousand lines each.
  if (!s.includes('\\')) return s;
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}

/** Parses the text of /proc/<pid>/mountinfo. */
export function parseMountInfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const a = line.slice(0, sep).split(' ');
    const b = line.slice(sep + 3).split(' ');
    if (a.length < 6 || b.length < 3) continue;
    out.push({
      mountId: Number(a[0]),
      parentId: Number(a[1]),
      device: a[2]!,
      mountpoint: unescapeMountField(a[4]!),
      mountOptions: a[5]!,
      fstype: b[0]!,
      source: unescapeMountField(b[1]!),
      superOptions: b[2]!,
    });
  }
  return out;
}

/** The last table read, by its text: the agent reads it several times per pass, mostly unchanged. */
let last: { text: string; table: readonly MountEntry[]; at: number; generation: number } | undefined;
/** Bumped whenever this process may have changed a mount (recentMountTable's tables before are out of date). */
let generation = 0;

/** This process is about to mount, unmount or remount something: tables read before are out of date. */
export function mountTableChanging(): void {
  generation++;
}

/**
 * The mount table as read at most `maxAgeMs` ago, provided this process
 * changed no mount since (mountTableChanging); else read now. With a
 * thousand mounts a read costs the kernel milliseconds (tens with several
 * thousand), and one agent pass looks things up in it several times.
 * Mounts other processes make or remove in between are seen at the next
 * read, as they would be one moment after any read.
 */
export async function recentMountTable(maxAgeMs = 500): Promise<readonly MountEntry[]> {
  if (last && last.generation === generation && performance.now() - last.at <= maxAgeMs) return last.table;
  return readMountTable();
}

/**
 * Reads and parses this process's mount table. A text identical to the last
 * one read gives the same (frozen) table, and so the same look-up index.
 */
export async function readMountTable(): Promise<readonly MountEntry[]> {
  // One read(2) loop, not the promise API's: the kernel makes the text up as it is read (its size is
  // 0), and the promise API reads it in chunks, a round trip through the thread pool each.
  const at = performance.now();
  const text = readFileSync('/proc/self/mountinfo', 'utf8');
  const table = last?.text === text ? last.table : Object.freeze(parseMountInfo(text));
  last = { text, table, at, generation };
  return table;
}

/** The fsname we give a mount served by `kind` in process `pid`. */
export function fsnameFor(kind: MountOwner['kind'], pid: number): string {
  return `${kind === 'agent' ? 'blkexport-agent' : 'blkexport'}:${pid}`;
}

/** Who serves a mount of ours, from its source field; undefined for anything else. */
export function mountOwner(entry: MountEntry): MountOwner | undefined {
  if (entry.fstype !== FUSE_FSTYPE) return undefined;
  const m = /^(blkexport|blkexport-agent):(\d+)$/.exec(entry.source);
  if (!m) return undefined;
  return { kind: m[1] === 'blkexport-agent' ? 'agent' : 'mount', pid: Number(m[2]) };
}

/**
 * The FUSE mount on top of `path`, if any: opening or stat-ing `path` would
 * reach that mount's server (maybe this very process), not the file under it.
 */
export function fuseMountOn(entries: readonly MountEntry[], path: string): MountEntry | undefined {
  const top = topMountAt(entries, path);
  return top?.fstype.startsWith('fuse') ? top : undefined;
}

/**
 * Each table's index (mountpoint → topmost mount), built on its first look-up:
 * a scan per path is linear in the table, so quadratic over a thousand exports.
 * A table is not changed after it was read (readMountTable gives a fresh one).
 */
const indexOf = new WeakMap<readonly MountEntry[], Map<string, MountEntry>>();

/** The topmost mount on `mountpoint` (several can be stacked on one path), if any. */
export function topMountAt(entries: readonly MountEntry[], mountpoint: string): MountEntry | undefined {
  let index = indexOf.get(entries);
  if (!index) {
    index = new Map();
    for (const e of entries) index.set(e.mountpoint, e); // later entries are mounted on top
    indexOf.set(entries, index);
  }
  return index.get(mountpoint);
}

/**
 * The path the kernel's mount table names for `path`: symlinks resolved, as the mount itself resolved
 * them (a mount on a symlink covers its target). Never stats the final component, which
 * may be a FUSE mount whose server is stuck: the directory part goes through realpath, the last name
 * through readlink only (a bounded number of hops).
 */
export async function mountedPath(path: string): Promise<string> {
  let p = resolve(path);
  for (let hops = 0; hops < 40; hops++) {
    const dir = await realpath(dirname(p)).catch(() => dirname(p));
    p = join(dir, basename(p));
    let target: string;
    try {
      target = await readlink(p);
    } catch {
      return p; // not a symlink (EINVAL), or gone: the name itself
    }
    p = resolve(dir, target);
  }
  return p;
}
