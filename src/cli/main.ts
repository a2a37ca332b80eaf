/**
 * The command dispatcher: `blkexport COMMAND [ARGS]`. Each command lives in
 * commands/<name>.ts and exports `summary`, `usage` and `run(args)`.
 */
import { describeError } from '../errors.js';

export interface Command {
  summary: string;
  usage: string;
  run(args: string[]): Promise<number>;
}

const COMMANDS = [
  'validate',
  'plan',
  'info',
  'mount',
  'nbd',
  'umount',
  'agent',
  'status',
  'create',
  'check',
  'fdstore',
] as const;

async function loadCommand(name: string): Promise<Command | undefined> {
  if (!(COMMANDS as readonly string[]).includes(name)) return undefined;
  try {
    return (await import(`./commands/${name}.js`)) as Command;
  } catch (e) {
    // A command listed but not built into this version.
    if (
      (e as { code?: string }).code === 'ERR_MODULE_NOT_FOUND' &&
      String(e).includes(`commands/${name}.js`)
    ) {
      return undefined;
    }
    throw e;
  }
}

async function printHelp(): Promise<void> {
  const lines = ['usage: blkexport COMMAND [ARGS]', '', 'commands:'];
  for (const name of COMMANDS) {
    const cmd = await loadCommand(name);
    if (cmd) lines.push(`  ${name.padEnd(10)} ${cmd.summary}`);
  }
  lines.push('', 'Run `blkexport COMMAND --help` for the options of a command.');
  console.log(lines.join('\n'));
}

/** Runs the command line; returns the exit status. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    await printHelp();
    return name === undefined ? 1 : 0;
  }
  if (name === '--version') {
    console.log('blkexport 0.1.0');
    return 0;
  }
  const cmd = await loadCommand(name);
  if (!cmd) {
    console.error(`blkexport: unknown command '${name}' (see blkexport --help)`);
    return 1;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    console.log(cmd.usage);
    return 0;
  }
  try {
    return await cmd.run(rest);
  } catch (e) {
    console.error(`blkexport ${name}: ${describeError(e)}`);
    if (process.env.BLKEXPORT_DEBUG) console.error(e);
    return 1;
  }
}
