/** Byte counts in manifests: integers, or strings with an optional binary suffix (`512`, `64K`, `20G`). */

const SUFFIX_SHIFT: Readonly<Record<string, number>> = { K: 10, M: 20, G: 30, T: 40, P: 50, E: 60 };

/** The largest byte count accepted: beyond it JS numbers stop being exact (2^53 + 1 would read as 2^53). */
export const MAX_SIZE = Number.MAX_SAFE_INTEGER;

/** Parses a size; returns the byte count, or a message saying why the value is refused. */
export function parseSize(value: unknown): { ok: true; bytes: number } | { ok: false; message: string } {
  if (typeof value === 'number') {
    if (!Number.isInteger(value) || value < 0) {
      return { ok: false, message: `size ${value} is not a non-negative integer` };
    }
    if (value > MAX_SIZE) return { ok: false, message: `size ${value} is larger than 2^53 - 1 bytes` };
    return { ok: true, bytes: value };
  }
  if (typeof value !== 'string') {
    return { ok: false, message: 'size must be an integer or a string like "64K" or "20G"' };
  }
  const m = /^([0-9]+)([KMGTPE]?)$/.exec(value);
  if (!m) {
    return {
      ok: false,
      message: `size "${value}" is not an integer with an optional binary suffix K, M, G, T, P or E (e.g. "64K", "20G")`,
    };
  }
  const digits = BigInt(m[1]!);
  const bytes = digits << BigInt(SUFFIX_SHIFT[m[2]!] ?? 0);
  if (bytes > BigInt(MAX_SIZE)) {
    return { ok: false, message: `size "${value}" is larger than 2^53 - 1 bytes` };
  }
  return { ok: true, bytes: Number(bytes) };
}

/** Formats a byte count with the largest exact binary suffix (`65536` → `64K`). */
export function formatSize(bytes: number): string {
  for (const [suffix, shift] of Object.entries(SUFFIX_SHIFT).reverse()) {
    const unit = 2 ** shift;
    if (bytes !== 0 && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return String(bytes);
}
