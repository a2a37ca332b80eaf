/**
 * The control socket is root-only: created 0600 (another user cannot even
 * connect), and when its mode is loosened by hand, the peer credentials of
 * each connection still keep other users out with 403.
 */
import assert from 'node:assert/strict';
import { chmodSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import { test } from 'node:test';
import { agentDir, startAgent } from '../helpers/agent.js';
import { needTools, run } from '../helpers/tools.js';

const CLIENT = `
const http = require('node:http');
const req = http.request({ socketPath: process.argv[1], path: '/status' }, (res) => {
  let body = '';
  res.on('data', (d) => (body += d));
  res.on('end', () => console.log(res.statusCode + ' ' + body.trim().replace(/\\s+/g, ' ')));
});
req.on('error', (e) => console.log('error ' + e.code));
req.end();
`;

/** GET /status as user nobody (uid 65534); returns "STATUS body" or "error CODE". */
function getAsNobody(socket: string): string {
  const r = run('setpriv', [
    '--reuid=65534',
    '--regid=65534',
    '--clear-groups',
    process.execPath,
    '-e',
    CLIENT,
    socket,
  ]);
  return r.stdout.trim() || r.stderr;
}

test('control socket: 0600, and peer credentials refuse other users with 403 even when the mode is loosened', async (t) => {
  if (process.getuid?.() !== 0) {
    if (process.env.CI === 'true')
      assert.fail('CI runs as root: this test needs root to act as another user');
    t.skip('needs root to act as another user');
    return;
  }
  if (!needTools(t, 'setpriv', '/dev/fuse')) return;
  const d = agentDir(t);
  const agent = await startAgent(t, d);
  assert.equal(statSync(agent.socket).mode & 0o777, 0o600);
  // Let nobody reach the socket's directory, so only the socket's own protection is tested.
  chmodSync(dirname(agent.socket), 0o711);
  assert.equal(getAsNobody(agent.socket), 'error EACCES');

  chmodSync(agent.socket, 0o666);
  const answer = getAsNobody(agent.socket);
  assert.match(answer, /^403 .*uid 65534 may not use the agent's control socket/);
  // Root still talks to it.
  const s = await agent.get<{ agent: { passes: number } }>('/status');
  assert.ok(s.agent.passes > 0);
});
