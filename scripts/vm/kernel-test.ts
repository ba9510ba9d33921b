/**
 * The kernel attach test as one command (see USAGE). Without --export it brings its own server:
 * the built `clonebd serve` on a temporary pool, with a plain volume, a clone of a volume written
 * before the clone and overwritten after it, and a volume attached across restarts of that
 * server, once by sid's nbd-client and once by qemu-nbd.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { NbdClient, parseNbdUri, type NbdTarget } from '../../native-free/index.js';
import { BUILT_CLI, startClonebd, type ClonebdProcess } from '../clonebd-process.js';
import type { GuestJob } from './guest-plan.js';
import { DEFAULT_CACHE_DIR, DEFAULT_TIMEOUT_MS, runKernelTest, type KernelTestOptions, type KernelTestResult } from './kernel-vm.js';
import { DEBIAN_ARCHIVE } from './suite-packages.js';

/**
 * The restart jobs' timeouts. -timeout: a request unanswered this long is retried on the next
 * connection (or failed), so it only matters for requests in flight when the server went away.
 * The hold (nbd-client -dead-timeout, qemu-nbd reconnect-delay): how long I/O waits for a new
 * connection; a restart plus the chardev's and the client's reconnect take a few seconds here.
 */
const RESTART_TIMEOUT_SECONDS = 10;
const RESTART_HOLD_SECONDS = 15;

const USAGE = `Usage: node dist/scripts/vm/kernel-test.js [options]

Boots Debian's kernel (linux-image-amd64) in qemu-system-x86_64 without KVM and attaches clonebd
exports through the real nbd.ko with Debian's nbd-client: mkfs.ext4, mount, write and fsync,
e2fsck, detach and reattach, fio randrw and write+verify, each step checked on the serial console.

Without --export, starts its own server (dist/src/cli/main.js serve) on a temporary pool and runs
four jobs: a 5 GiB volume, a clone whose data must be its source's at clone time, and two
restarts of the server with I/O started while it is down: under Debian's newest nbd-client
(sid's, over netlink with -persist -timeout ${RESTART_TIMEOUT_SECONDS} -dead-timeout ${RESTART_HOLD_SECONDS}), whose I/O must
complete or fail no sooner than the dead-connection timeout, and under qemu-nbd -c with
reconnect-delay=${RESTART_HOLD_SECONDS}, whose I/O must complete.

  --export URI     nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH of a running server;
                   repeatable. Runs the volume job on each. The server must run with
                   --handshake-timeout 0 (the VM connects long before it handshakes).
  --cache DIR      downloaded and unpacked packages (default ${DEFAULT_CACHE_DIR})
  --timeout SEC    the whole run (default ${DEFAULT_TIMEOUT_MS / 1000})
  --console FILE   also write the guest's console to FILE
  --verbose        print the console as it arrives

Needs root or a user apt-get download works for, and: qemu-system-x86_64, apt-get, dpkg, ldd,
gpgv with debian-archive-keyring, and the guest tools installed on this machine for their shared
libraries (nbd-client, socat, e2fsprogs, fio, qemu-utils). Sid's nbd-client and the libraries it
loads come from ${DEBIAN_ARCHIVE} (checked against the signed index) with sid's own loader.
`;

const MiB = 2 ** 20;
const GiB = 2 ** 30;

async function writeExport(target: NbdTarget, exportName: string, data: Buffer): Promise<void> {
  const client = await NbdClient.connect(target, { exportName });
  try {
    await client.write(0, data, { fua: true });
    await client.flush();
  } finally {
    await client.disconnect();
  }
}

/** Runs the three jobs against a server of its own; stops it and removes the pool afterwards. */
async function runSelfContained(options: Omit<KernelTestOptions, 'jobs' | 'onHostRequest'>): Promise<KernelTestResult> {
  const work = await mkdtemp(join(tmpdir(), 'clonebd-kernel-test-'));
  const pool = join(work, 'pool');
  const serveArgs = ['--handshake-timeout', '0'];
  let server: ClonebdProcess = await startClonebd(BUILT_CLI, pool, serveArgs);
  try {
    const tcp = { host: '127.0.0.1', port: server.port };
    await server.admin.createVolume('plain', 5 * GiB);
    await server.admin.createVolume('source', GiB);
    const before = randomBytes(8 * MiB);
    await writeExport(tcp, 'source', before);
    await server.admin.clone('source', 'clone');
    await writeExport(tcp, 'source', randomBytes(8 * MiB));
    await server.admin.createVolume('restart', GiB);
    const jobs: GuestJob[] = [
      { kind: 'fs', name: 'plain', exportName: 'plain', target: tcp },
      {
        kind: 'clone',
        name: 'clone',
        exportName: 'clone',
        target: tcp,
        sha256: createHash('sha256').update(before).digest('hex'),
        bytes: before.length,
      },
      // The pool's own socket keeps its path across the restart; a TCP port would not.
      ...(['nbd-client', 'qemu-nbd'] as const).map(
        (client): GuestJob => ({
          kind: 'restart',
          name: client === 'nbd-client' ? 'restart' : 'restart-qemu',
          exportName: 'restart',
          target: { path: server.socket },
          client,
          timeoutSeconds: RESTART_TIMEOUT_SECONDS,
          holdSeconds: RESTART_HOLD_SECONDS,
        }),
      ),
    ];
    return await runKernelTest({
      ...options,
      jobs,
      onHostRequest: async (request) => {
        if (request === 'stop-server') await server.stop();
        else server = await startClonebd(BUILT_CLI, pool, serveArgs);
      },
    });
  } finally {
    await server.stop();
    await rm(work, { recursive: true, force: true });
  }
}

function exportJobs(uris: readonly string[]): GuestJob[] {
  return uris.map((uri, index) => {
    const { target, exportName } = parseNbdUri(uri);
    return { kind: 'fs', name: `export${index}`, exportName, target };
  });
}

function report(result: KernelTestResult): string {
  const width = Math.max(...result.steps.map((step) => step.name.length));
  const lines = result.steps.map(
    (step) => `${(((step.atMs ?? 0) / 1000).toFixed(1) + ' s').padStart(7)}  ${step.name.padEnd(width)}  ${step.ok ? 'ok' : 'FAIL'}  ${step.detail}`,
  );
  lines.push(
    `${result.kernelPackage}, sid nbd-client ${result.sidClientVersion}: booted in ${(result.bootMs / 1000).toFixed(1)} s, VM ${(result.vmMs / 1000).toFixed(1)} s, ` +
      `${(result.totalMs / 1000).toFixed(1)} s in all`,
  );
  return `${lines.join('\n')}\n`;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      export: { type: 'string', multiple: true, default: [] },
      cache: { type: 'string', default: DEFAULT_CACHE_DIR },
      timeout: { type: 'string', default: String(DEFAULT_TIMEOUT_MS / 1000) },
      console: { type: 'string' },
      verbose: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return;
  }
  const timeoutSeconds = Number(values.timeout);
  if (!Number.isFinite(timeoutSeconds) || timeoutSeconds <= 0) throw new Error(`--timeout wants seconds, not ${values.timeout}`);
  const consoleFile = values.console === undefined ? undefined : createWriteStream(values.console);
  const options = {
    cacheDir: values.cache,
    timeoutMs: timeoutSeconds * 1000,
    log: (message: string) => process.stderr.write(`kernel-test: ${message}\n`),
    onConsole: (line: string) => {
      consoleFile?.write(`${line}\n`);
      if (values.verbose) process.stderr.write(`${line}\n`);
    },
  };
  try {
    const result =
      values.export.length === 0 ? await runSelfContained(options) : await runKernelTest({ ...options, jobs: exportJobs(values.export) });
    process.stdout.write(report(result));
  } finally {
    consoleFile?.end();
  }
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((error: unknown) => {
    process.stderr.write(`kernel-test: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exit(1);
  });
}
