/**
 * What the guest is asked to do and what the host expects back, kept apart from QEMU so it can be
 * checked on its own.
 *
 * A job is one export attached on its own /dev/nbdN through its own virtio-serial port. The guest
 * (guest-init.sh) reports `STEP <job>.<step> ok|fail <detail>` lines; the host holds its own list
 * of the steps each job must pass, in order, so a guest that skips a step fails as surely as one
 * that reports a failure.
 */
import type { NbdTarget } from '../../native-free/index.js';

interface JobBase {
  /** Names the port and the steps: [a-z0-9-]. */
  name: string;
  exportName: string;
  /** Where QEMU's chardev connects: the server's TCP address or a Unix socket. */
  target: NbdTarget;
}

export type GuestJob =
  /** mkfs.ext4, mount, write and fsync, fsck, detach, reattach and reread, fio randrw and verify. */
  | (JobBase & { kind: 'fs' })
  /** The `fs` job after checking that the export's first `bytes` hash to `sha256`. */
  | (JobBase & { kind: 'clone'; sha256: string; bytes: number })
  /**
   * A server restart the host performs on request while `client` has the export attached, with
   * a read and a write started while the server is down:
   *   nbd-client  Debian's newest (sid's), over netlink with -persist, -timeout timeoutSeconds
   *               and -dead-timeout holdSeconds: the kernel holds the I/O for holdSeconds waiting
   *               for a new connection. The I/O must complete, or fail no sooner; then the
   *               device must give back its data (attached again if the I/O failed).
   *   qemu-nbd    qemu-nbd -c, its NBD driver with reconnect-delay=holdSeconds (timeoutSeconds
   *               is not used: the kernel's socket to qemu-nbd never breaks, and qemu-nbd sets
   *               no request timeout): the I/O must complete with the right data, the device
   *               staying attached.
   */
  | (JobBase & { kind: 'restart'; client: RestartClient; timeoutSeconds: number; holdSeconds: number });

export type RestartClient = 'nbd-client' | 'qemu-nbd';

export type HostRequest = 'stop-server' | 'start-server';

const FS_STEPS = [
  'mkfs',
  'mount',
  'write',
  'umount',
  'fsck',
  'detach',
  'reattach',
  'mount-again',
  'read',
  'umount-again',
  'fio-randrw',
  'fio-verify',
  'disconnect',
] as const;

const RESTART_STEPS = [
  'attach',
  'write',
  'server-stopped',
  'link-down',
  'io-held',
  'server-started',
  'held-io',
  'reattach',
  'read',
  'write-again',
  'read-again',
  'disconnect',
] as const;

function jobSteps(job: GuestJob): string[] {
  switch (job.kind) {
    case 'fs':
      return ['bridge', 'attach', ...FS_STEPS];
    case 'clone':
      return ['bridge', 'attach', 'source-data', ...FS_STEPS];
    case 'restart':
      return ['bridge', ...RESTART_STEPS];
  }
}

/** Every step the guest must report as ok, in order. */
export function expectedSteps(jobs: readonly GuestJob[]): string[] {
  return ['boot', 'modules', ...jobs.flatMap((job) => jobSteps(job).map((step) => `${job.name}.${step}`)), 'end'];
}

const JOB_NAME = /^[a-z0-9][a-z0-9-]{0,31}$/;
const EXPORT_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;

/** The kernel command line words that hand the jobs to the guest. */
export function jobArguments(jobs: readonly GuestJob[]): string[] {
  const names = new Set<string>();
  let afterRestart = false;
  return jobs.map((job) => {
    if (!JOB_NAME.test(job.name)) throw new Error(`job name ${JSON.stringify(job.name)} must match ${JOB_NAME}`);
    if (names.has(job.name)) throw new Error(`two jobs named ${job.name}`);
    names.add(job.name);
    // QEMU reads nothing from a chardev whose guest port is closed, and a TCP peer's close raises
    // no hangup: over TCP, a job whose port sat idle through a restart would start on the old
    // server's dead connection (its handshake then fails). A Unix socket's hangup is seen.
    if (afterRestart && !('path' in job.target)) {
      throw new Error(`job ${job.name} comes after a restart job, so it must reach the server through a Unix socket`);
    }
    if (job.kind === 'restart') afterRestart = true;
    // The command line is split at spaces and the job at commas.
    if (!EXPORT_NAME.test(job.exportName)) throw new Error(`export name ${JSON.stringify(job.exportName)} cannot be passed to the guest`);
    const fields: (string | number)[] = [job.name, job.kind, job.exportName];
    if (job.kind === 'clone') {
      if (!/^[0-9a-f]{64}$/.test(job.sha256)) throw new Error('sha256 must be 64 lowercase hex digits');
      if (!Number.isSafeInteger(job.bytes) || job.bytes <= 0) throw new Error('bytes must be a positive integer');
      fields.push(job.sha256, job.bytes);
    } else if (job.kind === 'restart') {
      for (const [key, value] of [['timeoutSeconds', job.timeoutSeconds], ['holdSeconds', job.holdSeconds]] as const) {
        if (!Number.isSafeInteger(value) || value <= 0) throw new Error(`${key} must be a positive integer`);
      }
      fields.push(job.client, job.timeoutSeconds, job.holdSeconds);
    }
    return `clonebd.job=${fields.join(',')}`;
  });
}

export interface StepReport {
  name: string;
  ok: boolean;
  detail: string;
  /** When the host saw it, from QEMU's start. */
  atMs?: number;
}

// Kernel messages can share a line with ours, so the marker may start anywhere on it.
const STEP_LINE = /STEP (\S+) (ok|fail)(?: (.*))?$/;
const HOST_LINE = /^HOST (stop-server|start-server) (\S+)$/;

export function parseStepLine(line: string): StepReport | undefined {
  const match = STEP_LINE.exec(line);
  if (match === null) return undefined;
  return { name: match[1]!, ok: match[2] === 'ok', detail: (match[3] ?? '').trim() };
}

export function parseHostLine(line: string): { request: HostRequest; job: string } | undefined {
  const match = HOST_LINE.exec(line.trim());
  if (match === null) return undefined;
  return { request: match[1] as HostRequest, job: match[2]! };
}

/** Removes the terminal control sequences QEMU and the guest's tty put on the console. */
export function cleanConsoleLine(line: string): string {
  return line.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[c()][0-9A-Za-z]?|\r/g, '');
}

export type Verdict = { ok: true } | { ok: false; reason: string };

/**
 * Passes when the guest reported every expected step as ok, in order, and nothing else; otherwise
 * names the first failed, unexpected or missing step.
 */
export function judgeSteps(expected: readonly string[], seen: readonly StepReport[]): Verdict {
  const failed = seen.find((step) => !step.ok);
  if (failed !== undefined) return { ok: false, reason: `step ${failed.name} failed: ${failed.detail || '(no detail)'}` };
  for (let index = 0; index < expected.length; index++) {
    const want = expected[index]!;
    const got = seen[index];
    if (got === undefined) {
      const last = seen.at(-1);
      return { ok: false, reason: `step ${want} missing (last step: ${last === undefined ? 'none' : last.name})` };
    }
    if (got.name !== want) return { ok: false, reason: `step ${got.name} came where ${want} was expected` };
  }
  if (seen.length > expected.length) return { ok: false, reason: `unexpected step ${seen[expected.length]!.name} after the end` };
  return { ok: true };
}
