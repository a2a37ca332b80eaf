/** `unix:PATH` / `tcp:HOST:PORT` listen addresses (pure). */
import { isAbsolute } from 'node:path';
import { BlkError } from '../../errors.js';

export type NbdListen = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** Parses a listen address; a bracketed IPv6 host is allowed (`tcp:[::1]:10809`). */
export function parseListen(s: string): NbdListen {
  if (s.startsWith('unix:')) {
    const path = s.slice(5);
    if (!isAbsolute(path)) throw new BlkError('USAGE', `unix socket path '${path}' must be absolute`);
    return { kind: 'unix', path };
  }
  if (s.startsWith('tcp:')) {
    const rest = s.slice(4);
    const m = /^(?:\[([^\]]+)\]|([^:]+)):([0-9]{1,5})$/.exec(rest);
    const port = m ? Number(m[3]) : Number.NaN;
    if (!m || port > 65535) throw new BlkError('USAGE', `expected tcp:HOST:PORT, not '${s}'`);
    return { kind: 'tcp', host: (m[1] ?? m[2])!, port };
  }
  throw new BlkError('USAGE', `expected unix:PATH or tcp:HOST:PORT, not '${s}'`);
}

/** The address as the command line spells it. */
export function formatListen(l: NbdListen): string {
  return l.kind === 'unix'
    ? `unix:${l.path}`
    : `tcp:${l.host.includes(':') ? `[${l.host}]` : l.host}:${l.port}`;
}
