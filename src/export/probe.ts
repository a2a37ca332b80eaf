/**
 * Checks an export from outside the serving process. Reading one's own FUSE
 * mount from the process that serves it can deadlock (docs/decisions/0004-process-model.md), so
 * the read happens in a child process with a deadline.
 */
import { execFile } from 'node:child_process';

export interface ProbeResult {
  ok: boolean;
  /** Size seen by stat in the child, when ok. */
  size?: number;
  reason?: string;
}

/** Stats `path` and reads its first 512 bytes from a child process; ok when both work within timeoutMs. */
export function probeFromChild(path: string, timeoutMs = 10_000): Promise<ProbeResult> {
  const script = 'stat -L -c %s -- "$1" && head -c 512 -- "$1" >/dev/null';
  return new Promise((resolve) => {
    execFile(
      'sh',
      ['-c', script, 'probe', path],
      { timeout: timeoutMs, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (err) {
          const reason = (err as { killed?: boolean }).killed
            ? `no answer within ${timeoutMs} ms`
            : stderr.trim() || err.message;
          resolve({ ok: false, reason });
        } else {
          resolve({ ok: true, size: Number(stdout.trim()) });
        }
      },
    );
  });
}
