/**
 * `blkexport fdstore --socket PATH`: the fd holder the agent starts for its
 * native exports (native/fd_holder.c). It keeps each export's FUSE connection
 * (and an image pin) while the agent restarts, crashes or is upgraded, and
 * hands them to the next agent. SIGTERM unmounts everything it holds.
 */
import { mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { nativeHelper } from '../../block/lock-native.js';
import { DEFAULT_FDSTORE_SOCKET } from '../../engine/native/keeper.js';
import { BlkError } from '../../errors.js';
import { parseCommandArgs } from '../args.js';

export const summary = "keep native exports' FUSE connections across agent restarts (started by the agent)";
export const usage = `usage: blkexport fdstore [--socket PATH] [--idle SEC]

Holds the /dev/fuse descriptors of the agent's native exports so that a
restarted, crashed or upgraded agent adopts the same mounts: clients see a
pause, never an error. The agent starts it when it mounts its first native
export; it is not usually run by hand. It exits when it holds nothing and no
request came for --idle seconds. SIGTERM/SIGINT unmount (lazily) everything it
holds, then exit: a stop of the whole service leaves nothing mounted.

options:
  --socket PATH   its Unix socket (default ${DEFAULT_FDSTORE_SOCKET}; mode 0600)
  --idle SEC      exit after SEC seconds empty and quiet (default 30)
`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('fdstore', args, {
    socket: { type: 'string', default: DEFAULT_FDSTORE_SOCKET },
    idle: { type: 'string', default: '30' },
  });
  if (positionals.length) throw new BlkError('USAGE', `unexpected argument '${positionals[0]}'`);
  const idle = Number(values.idle);
  if (!Number.isSafeInteger(idle) || idle < 1)
    throw new BlkError('USAGE', '--idle takes a whole number of seconds');
  const socket = resolve(values.socket as string);
  await mkdir(dirname(socket), { recursive: true, mode: 0o700 });
  // Blocks this (only) thread until the holder ends: it has nothing else to do.
  if (!nativeHelper().holderServe(socket, idle))
    process.stderr.write(`blkexport fdstore: another fd holder already serves ${socket}\n`);
  return 0;
}
