/**
 * Backing chains the qemu engine opens itself. QEMU always gets `backing`
 * explicitly (a node, or null); when the manifest leaves `backing` absent and
 * the image names a backing file, the chain is added as nodes of our own
 * naming, each file resolved with our path policy inside the allowed roots,
 * each format as recorded in the image (never probed).
 */
import { createHash } from 'node:crypto';
import { MAX_BACKING_DEPTH } from '../../block/limits.js';
import { type PathPolicy, resolveImplicitFile } from '../../block/path-policy.js';
import { BlkError } from '../../errors.js';
import { fuseMountOn, readMountTable } from '../../export/mount-table.js';
import { BACKING_FORMATS, checkImageHead, QEMU_FORMATS, readHead } from './blockdev.js';
import type { QmpClient } from './qmp.js';
import type { QsdNodeInfo } from './session.js';

/** A backing file as an image names it, with its recorded format. */
export interface NamedBacking {
  name: string;
  format: string | undefined;
}

/** The backing file a node's image names (QSD's image info), with its recorded format. */
export async function namedBacking(client: QmpClient, nodeName: string): Promise<NamedBacking | undefined> {
  const info = (await client.execute<QsdNodeInfo[]>('query-named-block-nodes', { flat: true })).find(
    (x) => x['node-name'] === nodeName,
  );
  const name = info?.image?.['backing-filename'];
  return name ? { name, format: info?.image?.['backing-filename-format'] } : undefined;
}

/** Where a chain is being added: for whom, under which policy, and the node-names added so far (top-down). */
export interface ChainContext {
  client: QmpClient;
  owner: string;
  policy: PathPolicy | undefined;
  hidden: string[];
}

/**
 * Adds the backing chain `named` (named by `image`) bottom-up, recording each
 * node in ctx.hidden (top-down); returns the node-name of the chain's top.
 */
export async function addBackingChain(
  ctx: ChainContext,
  image: string | undefined,
  named: NamedBacking,
  depth = 1,
): Promise<string> {
  const { client, owner } = ctx;
  const refuse = (why: string) =>
    new BlkError(
      'BACKING_POLICY',
      `node '${owner}': backing file '${named.name}' ${why}; name the backing node in the manifest (backing: NODE) or set backing: null`,
      image === undefined ? {} : { file: image, field: 'backing_file' },
    );
  if (!ctx.policy || image === undefined) throw refuse('is not followed by the qemu engine here');
  if (depth > MAX_BACKING_DEPTH)
    throw new BlkError('BACKING_CHAIN', `node '${owner}': backing chain longer than ${MAX_BACKING_DEPTH}`);
  if (!named.format || !QEMU_FORMATS.includes(named.format))
    throw refuse(`has no usable recorded format (${named.format ?? 'none'}); backing files are never probed`);
  const path = await resolveImplicitFile(ctx.policy, image, named.name, 'backing file', 'backing_file');
  if (fuseMountOn(await readMountTable(), path)) throw refuse(`(${path}) is covered by a FUSE mount`);
  const tag = `bk${createHash('sha1').update(owner).digest('hex').slice(0, 8)}d${depth}`;
  const fileName = `${tag}f`;
  await client.execute('blockdev-add', {
    driver: 'file',
    'node-name': fileName,
    filename: path,
    'read-only': true,
  });
  ctx.hidden.push(fileName);
  checkImageHead(named.format, await readHead(path), path);
  const args: Record<string, unknown> = {
    driver: named.format,
    'node-name': tag,
    file: fileName,
    'read-only': true,
  };
  if (BACKING_FORMATS.includes(named.format)) args.backing = null;
  await client.execute('blockdev-add', args);
  ctx.hidden.unshift(tag);
  const deeper = BACKING_FORMATS.includes(named.format) ? await namedBacking(client, tag) : undefined;
  if (deeper) {
    await client.execute('blockdev-del', { 'node-name': tag });
    ctx.hidden.shift();
    args.backing = await addBackingChain(ctx, path, deeper, depth + 1);
    await client.execute('blockdev-add', args);
    ctx.hidden.unshift(tag);
  }
  return tag;
}
