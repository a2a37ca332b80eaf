/** Talks to a running agent over its control socket. */
import { request } from 'node:http';
import { BlkError } from '../errors.js';

/** Sends one request to the agent; rejects with BlkError('AGENT') when nothing answers. */
export function callAgent(
  socketPath: string,
  method: 'GET' | 'POST',
  path: string,
  timeoutMs = 30_000,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => {
        body += d;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new BlkError('AGENT', `no answer within ${timeoutMs} ms`)));
    req.on('error', (e) =>
      reject(
        new BlkError(
          'AGENT',
          `no agent answers on ${socketPath}: ${(e as NodeJS.ErrnoException).code ?? e.message}`,
        ),
      ),
    );
    req.end();
  });
}

/** GETs a JSON document from the agent. */
export async function getAgentJson<T>(socketPath: string, path: string): Promise<T> {
  const r = await callAgent(socketPath, 'GET', path);
  if (r.status !== 200)
    throw new BlkError('AGENT', `agent answered ${r.status} for ${path}: ${r.body.trim()}`);
  return JSON.parse(r.body) as T;
}
