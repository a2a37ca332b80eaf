/** Shared command-line parsing: node:util parseArgs with errors as BlkError('USAGE'). */
import { type ParseArgsConfig, parseArgs } from 'node:util';
import { BlkError } from '../errors.js';

type Options = NonNullable<ParseArgsConfig['options']>;

/** Parses `args` against `options`; unknown options and missing values become a USAGE error naming the command. */
export function parseCommandArgs<T extends Options>(command: string, args: string[], options: T) {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new BlkError('USAGE', `${(e as Error).message} (see blkexport ${command} --help)`);
  }
}
