/**
 * `blkexport agent --manifests DIR`: the host agent. Reconciles, watches the
 * directory, serves the control socket, and on SIGTERM/SIGINT flushes and
 * unmounts every export before exiting 0.
 */
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { Agent } from '../../agent/agent.js';
import { DEFAULT_SOCKET, startControlServer } from '../../agent/control-server.js';
import { DEFAULT_MAX_EXPORTS } from '../../agent/limits.js';
import { createLogger, type LogFormat } from '../../agent/log.js';
import { createAgentMetrics } from '../../agent/metrics.js';
import { cleanStaleAgentMounts } from '../../agent/stale.js';
import { notifySystemd } from '../../agent/systemd.js';
import { watchManifests } from '../../agent/watch.js';
import { makePathPolicy, type PathPolicy } from '../../block/path-policy.js';
import { NativeEngine } from '../../engine/native/engine.js';
import { ConnectionKeeper, DEFAULT_FDSTORE_SOCKET } from '../../engine/native/keeper.js';
import { liveAgentMounts, ownerGone } from '../../engine/native/live-mounts.js';
import {
  checkNbdHostConfig,
  NbdHost,
  type NbdHostConfig,
  type NbdTlsFiles,
  nbdHostAddresses,
} from '../../engine/native/nbd-host.js';
import { DEFAULT_NBD_SOCKET } from '../../engine/nbd-one-shot.js';
import { DEFAULT_AGENT_OVERLAY_DIR } from '../../engine/overlays.js';
import { DEFAULT_QSD_DIR } from '../../engine/qemu/daemon.js';
import { QemuEngine } from '../../engine/qemu/engine.js';
import { BlkError, describeError } from '../../errors.js';
import { formatListen, parseListen } from '../../export/nbd/listen.js';
import { parseCommandArgs } from '../args.js';

export const summary = 'the host agent: reconcile a manifest directory, watch it, serve until SIGTERM';
export const usage = `usage: blkexport agent --manifests DIR [options]

Makes the exports described by the manifests in DIR exist, and keeps them so:
on start, on every change of a manifest (live within 2 s), on SIGHUP, and every
--resync seconds. A manifest that stops validating keeps its last good version
in force.

Native exports outlive the agent process (Linux 6.9 or later): their FUSE
connections are kept by the fd holder (blkexport fdstore, started on demand),
and the next agent adopts them, so a crash, a kill -9 or a handover costs the
exports' users a pause, never an I/O error.

signals:
  SIGTERM, SIGINT   stop: flush and unmount every export, then exit 0
  SIGUSR2           hand over: flush every export, leave the mounts to the fd
                    holder, exit 75; the next agent started adopts them
  SIGHUP            reconcile now

options:
  --manifests DIR          the manifest directory (*.yaml, *.yml)
  --socket PATH            control socket (default ${DEFAULT_SOCKET})
  --allow-root DIR         images, backing files and mountpoints must lie in DIR (repeatable)
  --allow-any-path         no confinement (explicit opt-in; one of the two is required)
  --resync SEC             periodic full pass, also repairs drift (default 30)
  --max-exports N          serve at most N exports; more are refused with a reason (default ${DEFAULT_MAX_EXPORTS})
  --engine native|qemu     the engine of manifests that do not name one (default native)
  --qsd-dir DIR            qemu engine: qemu-storage-daemon's pidfile, QMP socket and state file
                           (default ${DEFAULT_QSD_DIR}); one daemon per directory, re-attached on restart
  --fdstore PATH           the fd holder's socket (default ${DEFAULT_FDSTORE_SOCKET})
  --fdstore-external       never start the fd holder: another process runs it (a sidecar
                           container: in a pod the holder must outlive the agent's container)
  --overlay-dir DIR        where overlay: ephemeral exports keep their overlay files (default
                           ${DEFAULT_AGENT_OVERLAY_DIR}); the agent's own: at start it deletes
                           the overlays a previous agent left, except those of exports it adopts
  --nbd-listen ADDR        where the host's NBD server listens for type: nbd exports:
                           unix:PATH or tcp:HOST:PORT (repeatable; default unix:${DEFAULT_NBD_SOCKET});
                           the server starts with the first NBD export
  --nbd-tls-cert FILE      NBD over TLS (x509): the server's certificate ...
  --nbd-tls-key FILE       ... and its key
  --nbd-tls-ca FILE        ... and a CA: clients must present a certificate it signed
  --nbd-tls-psk FILE       NBD over TLS with pre-shared keys (identity:hexkey lines, as psktool writes)
  --nbd-insecure-tcp       serve tcp: addresses without TLS (refused otherwise)
  --nbd-socket-group GROUP the NBD Unix sockets are mode 0660 for GROUP (default 0600, owner only)
  --log-format text|json   log lines on stderr (default text)
  --hostname NAME          the host name manifests' hosts: are matched against (default: this host's)
`;

/** The host NBD server from the --nbd-* flags, checked (plain TCP, half a TLS setup) before anything starts. */
function nbdHostFromFlags(values: Record<string, unknown>): NbdHost {
  const str = (k: string) => values[k] as string | undefined;
  const file = (k: string) => (str(k) === undefined ? undefined : resolve(str(k)!));
  const tls: NbdTlsFiles = {};
  for (const [flag, key] of [
    ['nbd-tls-cert', 'cert'],
    ['nbd-tls-key', 'key'],
    ['nbd-tls-ca', 'ca'],
    ['nbd-tls-psk', 'psk'],
  ] as const) {
    const f = file(flag);
    if (f !== undefined) tls[key] = f;
  }
  const config: NbdHostConfig = {
    listen: (values['nbd-listen'] as string[]).map(parseListen),
    tls,
    insecureTcp: values['nbd-insecure-tcp'] as boolean,
  };
  const group = str('nbd-socket-group');
  if (group !== undefined) config.socketGroup = group;
  checkNbdHostConfig(config);
  return new NbdHost(config);
}

/** Deletes the overlays a previous agent left (a crash), but for those of exports about to be adopted. */
async function cleanOverlays(native: NativeEngine, log: ReturnType<typeof createLogger>): Promise<void> {
  const gone = await native.cleanOverlayLeftovers().catch((e) => {
    log.error('cleaning leftover overlays failed', { dir: native.overlayDir, error: describeError(e) });
    return [] as string[];
  });
  for (const f of gone) log.warn('deleted the overlay file a previous agent left', { file: f });
}

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('agent', args, {
    manifests: { type: 'string' },
    socket: { type: 'string', default: DEFAULT_SOCKET },
    'allow-root': { type: 'string', multiple: true, default: [] },
    'allow-any-path': { type: 'boolean', default: false },
    resync: { type: 'string', default: '30' },
    'max-exports': { type: 'string', default: String(DEFAULT_MAX_EXPORTS) },
    engine: { type: 'string', default: 'native' },
    'qsd-dir': { type: 'string', default: DEFAULT_QSD_DIR },
    fdstore: { type: 'string', default: DEFAULT_FDSTORE_SOCKET },
    'fdstore-external': { type: 'boolean', default: false },
    'overlay-dir': { type: 'string', default: DEFAULT_AGENT_OVERLAY_DIR },
    'log-format': { type: 'string', default: 'text' },
    hostname: { type: 'string' },
    'nbd-listen': { type: 'string', multiple: true, default: [] },
    'nbd-tls-cert': { type: 'string' },
    'nbd-tls-key': { type: 'string' },
    'nbd-tls-ca': { type: 'string' },
    'nbd-tls-psk': { type: 'string' },
    'nbd-insecure-tcp': { type: 'boolean', default: false },
    'nbd-socket-group': { type: 'string' },
  });
  if (positionals.length) throw new BlkError('USAGE', `unexpected argument '${positionals[0]}'`);
  if (!values.manifests) throw new BlkError('USAGE', '--manifests DIR is required');
  const format = values['log-format'] as string;
  if (format !== 'text' && format !== 'json') throw new BlkError('USAGE', '--log-format is text or json');
  const defaultEngine = values.engine;
  if (defaultEngine !== 'native' && defaultEngine !== 'qemu')
    throw new BlkError('USAGE', `--engine ${defaultEngine}: native or qemu`);
  const resyncSec = Number(values.resync);
  if (!Number.isFinite(resyncSec) || resyncSec <= 0)
    throw new BlkError('USAGE', '--resync takes a positive number of seconds');
  const maxExports = Number(values['max-exports']);
  if (!Number.isSafeInteger(maxExports) || maxExports < 0)
    throw new BlkError('USAGE', '--max-exports takes a whole number');
  const rootsGiven = (values['allow-root'] as string[]).map((r) => resolve(r));
  if (rootsGiven.length === 0 && !values['allow-any-path']) {
    throw new BlkError(
      'USAGE',
      'refusing to start without --allow-root DIR (or an explicit --allow-any-path): a manifest must not be able to mount over any file of the host',
    );
  }
  let policy: PathPolicy = { allowedRoots: 'any' };
  if (!values['allow-any-path']) {
    policy = await makePathPolicy(rootsGiven);
    if (policy.allowedRoots !== 'any' && policy.allowedRoots.length === 0) {
      throw new BlkError('USAGE', `none of the allowed roots exists: ${rootsGiven.join(', ')}`);
    }
  }
  const nbd = nbdHostFromFlags(values);
  const log = createLogger(format as LogFormat);
  const dir = resolve(values.manifests);
  const socketPath = resolve(values.socket as string);
  const host = (values.hostname as string | undefined) ?? hostname();

  const bin = new URL('../../../bin/blkexport', import.meta.url).pathname;
  const fdstore = resolve(values.fdstore as string);
  const keeper = new ConnectionKeeper(
    fdstore,
    values['fdstore-external'] ? undefined : [bin, 'fdstore', '--socket', fdstore],
  );
  const native = new NativeEngine({
    policy,
    keeper,
    overlayDir: resolve(values['overlay-dir'] as string),
    nbd,
    log: (level, msg, fields) => (level === 'warn' ? log.warn(msg, fields) : log.info(msg, fields)),
  });
  let agentRef: Agent | undefined;
  // QSD is started only when a step needs it; an agent with no qemu manifests never runs it.
  const qemu = new QemuEngine({
    dir: resolve(values['qsd-dir'] as string),
    policy,
    onLost: (why) => {
      log.warn('qemu-storage-daemon lost; reconciling', { why });
      void agentRef?.requestPass('qemu-storage-daemon lost');
    },
    log: (msg, fields) => log.info(msg, fields),
    nbd: nbd.config,
  });
  const engines = [native, qemu];
  const agent = new Agent(
    {
      manifests: dir,
      hostname: host,
      roots: policy.allowedRoots,
      defaultEngine,
      maxExports,
      nbdAddresses: () => nbd.addresses(),
    },
    engines,
    log,
  );
  agentRef = agent;
  const metrics = createAgentMetrics(() => {
    const live = new Map(engines.flatMap((en) => en.exports().map((e) => [e.id, e] as const)));
    return agent.status().exports.map((e) => ({
      id: e.id,
      state: e.state,
      engine: e.engine,
      type: live.get(e.id)?.type,
      stats: live.get(e.id)?.stats,
      connections: live.get(e.id)?.connections,
    }));
  });
  agent.onPass = (r, ok) => metrics.observePass(r.durationMs / 1000, ok ? 'ok' : 'error');

  const server = await startControlServer(socketPath, {
    status: () => agent.status(),
    observed: () => agent.observed(),
    metrics: async () => ({ contentType: metrics.contentType, body: await metrics.text() }),
    reconcile: async () => {
      const r = await agent.requestPass('POST /reconcile');
      return { ...r, status: agent.status() };
    },
  });
  log.info('agent starting', {
    manifests: dir,
    socket: socketPath,
    hostname: host,
    roots: policy.allowedRoots,
    engine: defaultEngine,
    nbd: nbdHostAddresses(nbd.config).map(formatListen),
  });

  // Connections a previous agent left in the fd holder are adopted, not cleaned as stale.
  const held = await native.loadHeld().catch((e) => {
    log.error('reading the fd holder failed; its mounts are left alone', { error: describeError(e) });
    return [] as string[];
  });
  await cleanOverlays(native, log);
  // A mount whose agent is gone may still be alive: another agent's fd holder keeps it.
  const alive = await liveAgentMounts(new Set(held)).catch((e) => {
    log.error('probing agent mounts failed; none is cleaned', { error: describeError(e) });
    return undefined;
  });
  for (const m of alive ?? []) {
    if (ownerGone(m)) {
      log.info(
        'left alone a mount whose agent is gone: its FUSE connection is still alive (kept by another fd holder)',
        {
          mountpoint: m.mountpoint,
          source: m.source,
        },
      );
    }
  }
  const spared = new Set([...held, ...(alive ?? []).map((m) => m.mountpoint)]);
  const stale =
    alive === undefined
      ? []
      : await cleanStaleAgentMounts(spared).catch((e) => {
          log.error('cleaning stale mounts failed', { error: describeError(e) });
          return [];
        });
  for (const m of stale) {
    log.warn('cleaned a stale mount of a previous agent', {
      mountpoint: m.mountpoint,
      source: m.source,
      why: 'its FUSE connection is gone (the mount answers ENOTCONN)',
    });
  }

  // The watch is up before the first pass reads the directory: a manifest saved in between is not missed.
  const watcher = watchManifests(dir, (files) => void agent.requestPass('manifest change', files), {
    log: (msg, fields) => log.warn(msg, fields),
  });
  await watcher.ready;
  const first = await agent.requestPass('start');
  log.info('first pass done', { steps: first.steps, failed: first.failed, ms: Math.round(first.durationMs) });

  const resync = setInterval(() => void agent.requestPass('resync'), resyncSec * 1000);

  return new Promise<number>((resolveExit) => {
    let stopping = false;
    /** Stops watching and serving around `work` (a stop or a handover); the exit code: 0, or 1 when it failed. */
    const shutDown = async (what: string, work: () => Promise<void>): Promise<number> => {
      clearInterval(resync);
      let code = 0;
      try {
        await watcher.close();
        await work();
      } catch (e) {
        log.error(`${what} failed`, { error: describeError(e) });
        code = 1;
      }
      await server.close();
      return code;
    };
    const stop = async (sig: string) => {
      if (stopping) return;
      stopping = true;
      log.info('stopping: flushing and unmounting every export', { signal: sig });
      await notifySystemd('STOPPING=1');
      const code = await shutDown('stopping', () => agent.stop());
      log.info('stopped', { code });
      resolveExit(code);
    };
    const handover = async () => {
      if (stopping) return;
      stopping = true;
      log.info('handing over: flushing every export and leaving the mounts to the next agent', {
        signal: 'SIGUSR2',
        fdstore,
      });
      const code = await shutDown('handing over', () => agent.handover());
      log.info('handed over', { code });
      // The mounts stay, so their threads would keep this process alive: exit now. 75
      // (EX_TEMPFAIL) tells a supervisor to start the next agent (systemd: RestartForceExitStatus).
      process.exit(code === 0 ? 75 : code);
    };
    process.on('SIGUSR2', () => void handover());
    process.on('SIGTERM', () => void stop('SIGTERM'));
    process.on('SIGINT', () => void stop('SIGINT'));
    process.on('SIGHUP', () => {
      log.info('SIGHUP: reloading');
      void agent.requestPass('SIGHUP');
    });
    // Ready only once the signals are ours: a supervisor may send SIGTERM the moment it reads READY=1.
    void notifySystemd('READY=1');
  });
}
