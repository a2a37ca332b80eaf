/**
 * The agent's NBD server configuration, checked before anything starts
 * (plain TCP, half a TLS setup, PSK mixed with x509, an unknown group), and
 * how the qemu engine maps it to QSD's single NBD server address.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { checkNbdHostConfig, groupId, nbdHostAddresses } from '../../src/engine/native/nbd-host.js';
import { DEFAULT_NBD_SOCKET } from '../../src/engine/nbd-one-shot.js';
import { nbdExportArgs, qsdNbdAddress } from '../../src/engine/qemu/nbd.js';
import { parseListen } from '../../src/export/nbd/listen.js';
import { tempDir } from '../helpers/tools.js';

const tcp = parseListen('tcp:127.0.0.1:10809');
const unix = parseListen('unix:/run/x/nbd.sock');

test('plain TCP is refused unless --nbd-insecure-tcp; TLS of either kind allows it', () => {
  assert.throws(
    () => checkNbdHostConfig({ listen: [unix, tcp], insecureTcp: false }),
    /refusing to serve tcp:127\.0\.0\.1:10809 without TLS: give TLS credentials, or --nbd-insecure-tcp/,
  );
  checkNbdHostConfig({ listen: [tcp], insecureTcp: true });
  checkNbdHostConfig({ listen: [tcp], insecureTcp: false, tls: { psk: '/k.psk' } });
  checkNbdHostConfig({ listen: [tcp], insecureTcp: false, tls: { cert: '/c', key: '/k' } });
  checkNbdHostConfig({ listen: [unix], insecureTcp: false });
});

test('half an x509 setup, or PSK with x509, is refused', () => {
  assert.throws(
    () => checkNbdHostConfig({ listen: [], insecureTcp: false, tls: { cert: '/c' } }),
    /needs both --nbd-tls-cert and --nbd-tls-key/,
  );
  assert.throws(
    () => checkNbdHostConfig({ listen: [], insecureTcp: false, tls: { psk: '/p', ca: '/ca' } }),
    /--nbd-tls-psk and the x509 options .* exclude each other/,
  );
});

test('socket groups: by name from the group file, or a number; an unknown name is refused', (t) => {
  const dir = tempDir(t, 'blkexport-nbd-host-');
  const file = join(dir, 'group');
  writeFileSync(file, 'root:x:0:\nnbdusers:x:1234:alice,bob\nbroken:x:zz:\n');
  assert.equal(groupId('nbdusers', file), 1234);
  assert.equal(groupId('77', file), 77);
  assert.throws(() => groupId('broken', file), /--nbd-socket-group broken: no such group/);
  assert.throws(() => groupId('nobody-here', file), /no such group/);
});

test('no --nbd-listen: the default socket', () => {
  assert.deepEqual(nbdHostAddresses({ listen: [], insecureTcp: false }), [
    { kind: 'unix', path: DEFAULT_NBD_SOCKET },
  ]);
});

test('qemu engine: one address maps to QMP SocketAddressLegacy; more than one is refused with the reason', () => {
  assert.deepEqual(qsdNbdAddress({ listen: [unix], insecureTcp: false }).addr, {
    type: 'unix',
    data: { path: '/run/x/nbd.sock' },
  });
  assert.deepEqual(qsdNbdAddress({ listen: [tcp], insecureTcp: true }).addr, {
    type: 'inet',
    data: { host: '127.0.0.1', port: '10809' },
  });
  assert.deepEqual(qsdNbdAddress({ listen: [], insecureTcp: false }).addr, {
    type: 'unix',
    data: { path: DEFAULT_NBD_SOCKET },
  });
  assert.throws(
    () => qsdNbdAddress({ listen: [unix, tcp], insecureTcp: true }),
    /the qemu engine serves NBD on one address .* and the agent has 2: unix:\/run\/x\/nbd\.sock, tcp:127\.0\.0\.1:10809/,
  );
  assert.deepEqual(
    nbdExportArgs({
      type: 'nbd',
      id: 'w',
      'node-name': 'w-fmt',
      writable: false,
      name: 'web',
      description: 'd',
    }),
    { type: 'nbd', id: 'w', 'node-name': 'w-fmt', name: 'web', description: 'd', writable: false },
  );
});
