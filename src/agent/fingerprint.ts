/**
 * What a terminal failure waits for: a change of the files it involved (an
 * image replaced or rewritten, a mountpoint created). One line per path of
 * what stat says (identity, size, times), or that it is missing. A path a
 * FUSE mount covers is not stat-ed (that would ask the mount's server, maybe
 * this process, not the file); it counts as unchanged while covered.
 */
import { stat } from 'node:fs/promises';
import { fuseMountOn, readMountTable } from '../export/mount-table.js';

/** A string that changes when any of `paths` is created, removed, replaced or written. */
export async function fingerprint(paths: readonly string[]): Promise<string> {
  const table = await readMountTable();
  const lines = await Promise.all(
    paths.map(async (p) => {
      const top = fuseMountOn(table, p);
      if (top) return `${p} covered by ${top.source}`;
      const st = await stat(p, { bigint: true }).catch(() => undefined);
      return st ? `${p} ${st.dev}:${st.ino} ${st.size} ${st.mtimeNs} ${st.ctimeNs}` : `${p} missing`;
    }),
  );
  return lines.join('\n');
}
