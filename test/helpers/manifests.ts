/** Manifest text for integration tests. */

/** One shorthand export (`- id: … image: …` plus options), indented for `spec.exports`. */
export function shorthand(
  id: string,
  image: string,
  opts: Record<string, string | boolean | number> = {},
): string {
  let s = `    - id: ${id}\n      image: ${image}\n`;
  for (const [k, v] of Object.entries(opts)) s += `      ${k}: ${v}\n`;
  return s;
}
