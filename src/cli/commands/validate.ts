/**
 * `blkexport validate PATH...`: checks manifest files and directories the way
 * the agent loads them, and prints every problem as FILE:LINE:COL: message.
 */
import { statSync } from 'node:fs';
import { BlkError } from '../../errors.js';
import { loadManifestPaths } from '../../manifest/directory.js';
import { manifestToJson } from '../../manifest/report.js';
import { parseCommandArgs } from '../args.js';

export const summary = 'check manifests: every error with file:line:col; exit 1 if any';
export const usage = `usage: blkexport validate [-o text|json] [--host NAME] PATH...

Checks manifest files (*.yaml, *.yml) and directories of them:
YAML syntax, duplicate keys, the schema (schema/manifest.schema.json), and
the rules the schema cannot express (references resolve, no cycles, no
writable export over a read-only node, absolute paths, sizes up to 2^53 - 1).
node-names, export ids, mountpoints and manifest names must be unique across
a set; when two manifests collide, the one that sorts later is refused. Each
directory is one set (read one level deep, hidden files skipped, like the
agent reads --manifests); the files named directly form one more set.

Every problem is printed as FILE:LINE:COL: message (at /json/path).
Exit status: 0 when every manifest is valid, 1 otherwise.

options:
  -o, --output FMT   text (default) or json: {"manifests": [{"file", "name", "valid", "errors": [...]}]}
  --host NAME        check collisions as host NAME sees them (only manifests whose
                     hosts: include NAME); default: manifests whose hosts could overlap
`;

/** Runs `blkexport validate`. */
export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('validate', args, {
    output: { type: 'string', short: 'o', default: 'text' },
    host: { type: 'string' },
  });
  if (values.output !== 'text' && values.output !== 'json') {
    throw new BlkError('USAGE', `unknown output format '${values.output}' (text or json)`);
  }
  if (positionals.length === 0) throw new BlkError('USAGE', 'no PATH given (see blkexport validate --help)');
  const opts = values.host === undefined ? {} : { hostname: values.host };
  const isDir = (p: string) => {
    try {
      return statSync(p).isDirectory();
    } catch {
      return false;
    }
  };
  const dirs = positionals.filter(isDir);
  const loose = positionals.filter((p) => !isDir(p));
  const files = [
    ...(loose.length > 0 ? loadManifestPaths(loose, opts) : []),
    ...dirs.flatMap((d) => loadManifestPaths([d], opts)),
  ];
  const invalid = files.filter((f) => !f.valid);
  if (values.output === 'json') {
    console.log(JSON.stringify({ manifests: files.map(manifestToJson) }, null, 2));
  } else {
    for (const f of files) {
      if (f.valid)
        console.log(`${f.file}: ok (${f.documents.map((d) => d.name).join(', ') || 'no documents'})`);
      for (const p of f.problems) console.error(p.format());
    }
    const problems = invalid.reduce((n, f) => n + f.problems.length, 0);
    console.log(
      files.length === 0
        ? 'no manifests found'
        : `${files.length} manifest file(s): ${files.length - invalid.length} valid, ${invalid.length} invalid` +
            (problems > 0 ? ` (${problems} problem(s))` : ''),
    );
  }
  return invalid.length > 0 || files.length === 0 ? 1 : 0;
}
