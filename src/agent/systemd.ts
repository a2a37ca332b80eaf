/**
 * systemd readiness. Node has no Unix datagram sockets, so READY=1 goes
 * through `systemd-notify` (the unit sets NotifyAccess=all).
 */
import { execFile } from 'node:child_process';

/** Tells systemd the agent is ready, when started as a Type=notify service; never throws. */
export function notifySystemd(state: string): Promise<void> {
  if (!process.env.NOTIFY_SOCKET) return Promise.resolve();
  return new Promise((resolve) => {
    execFile('systemd-notify', [`--pid=${process.pid}`, state], () => resolve());
  });
}
