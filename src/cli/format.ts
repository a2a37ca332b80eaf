/** Human-readable figures for command output. */

/** 1073741824 → "1 GiB (1073741824 bytes)"; exact binary units only when they divide evenly. */
export function formatBytes(n: number): string {
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let unit = '';
  for (const u of units) {
    if (v < 1024) break;
    v /= 1024;
    unit = u;
  }
  if (!unit) return `${n} bytes`;
  const shown = Number.isInteger(v) ? String(v) : v.toFixed(1);
  return `${shown} ${unit} (${n} bytes)`;
}
