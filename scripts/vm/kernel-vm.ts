/**
 * Boots Debian's kernel in QEMU (software emulation: no KVM) with a small initramfs and lets the
 * guest attach clonebd exports through the real nbd.ko and nbd-client (or qemu-nbd).
 *
 * The guest has no network. Each job's virtio-serial port is backed by a QEMU socket chardev
 * that connects to the server (TCP on 127.0.0.1 or a Unix socket) and, with reconnect=1,
 * connects again a second after the server closes it: that is how a detach and reattach, or a
 * server restart, gives the guest a new server connection, also for a client that reconnects by
 * itself while the server is still down (the guest's relay waits for the new server's greeting).
 * Over TCP, a chardev whose guest port is closed does not notice the server going away, so jobs
 * after a restart go through a Unix socket (guest-plan's jobArguments insists). The server must not time out idle
 * handshakes (`--handshake-timeout 0`): the chardev connects as soon as QEMU starts and the guest
 * may only read the greeting much later.
 *
 * The host reads the serial console (QEMU's stdout) line by line: STEP lines are collected and
 * judged against the plan; HOST lines are requests (stop or start the server) answered on the
 * console. A run ends when QEMU exits (the guest powers off), or is killed on the run's deadline
 * or shortly after a failed step.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  fetchPackages,
  libraryClosure,
  parseLdd,
  resolveKernelPackage,
  resolveModules,
  runCommand,
  unpackPackage,
} from './assets.js';
import {
  cleanConsoleLine,
  expectedSteps,
  jobArguments,
  judgeSteps,
  parseHostLine,
  parseStepLine,
  type GuestJob,
  type HostRequest,
  type StepReport,
} from './guest-plan.js';
import { writeCpio, type CpioEntry } from './initramfs.js';
import { fetchSuitePackages } from './suite-packages.js';

export const DEFAULT_CACHE_DIR = join(homedir(), '.cache', 'clonebd', 'vm');
export const DEFAULT_TIMEOUT_MS = 5 * 60_000;
/** After a failed step the guest prints its diagnostics and powers off; this long at most. */
const AFTER_FAILURE_MS = 30_000;
const CONSOLE_TAIL_LINES = 60;

/** Userland packages; the kernel package is resolved at run time. */
const GUEST_PACKAGES = ['busybox-static', 'nbd-client', 'socat', 'e2fsprogs', 'fio', 'qemu-utils'] as const;

/**
 * Loaded in this order after their dependencies. crc32c_generic provides the "crypto-crc32c"
 * that ext4 and jbd2 name only as a soft dependency (an alias).
 */
const GUEST_MODULES = ['virtio_pci', 'virtio_console', 'nbd', 'crc32c_generic', 'ext4'] as const;

/** Guest path → path inside the named package. */
const GUEST_BINARIES: readonly { pkg: (typeof GUEST_PACKAGES)[number]; from: string; to: string }[] = [
  { pkg: 'busybox-static', from: 'bin/busybox', to: '/bin/busybox' },
  { pkg: 'nbd-client', from: 'sbin/nbd-client', to: '/sbin/nbd-client' },
  { pkg: 'socat', from: 'usr/bin/socat', to: '/usr/bin/socat' },
  { pkg: 'e2fsprogs', from: 'sbin/mke2fs', to: '/sbin/mke2fs' },
  { pkg: 'e2fsprogs', from: 'sbin/e2fsck', to: '/sbin/e2fsck' },
  { pkg: 'fio', from: 'usr/bin/fio', to: '/usr/bin/fio' },
  { pkg: 'qemu-utils', from: 'usr/bin/qemu-nbd', to: '/usr/bin/qemu-nbd' },
];

/**
 * Debian's newest nbd-client, from sid, for the restart job. It wants a newer glibc, libnl and
 * GnuTLS than bookworm has, so it comes with the libraries it loads, all from sid, in a tree of
 * its own (/sid/lib) and runs under sid's dynamic loader by way of a wrapper script; the
 * bookworm tools never see those libraries, nor it theirs. debconf is a dependency of the
 * package's maintainer scripts, not of the program.
 */
const SID_CLIENT = {
  suite: 'sid',
  package: 'nbd-client',
  binary: 'usr/sbin/nbd-client',
  skip: ['debconf'],
  guestDir: '/sid',
  wrapper: '/usr/sbin/nbd-client-sid',
} as const;
const LOADER = 'ld-linux-x86-64.so.2';
const LIBRARY_DIRS = ['usr/lib/x86_64-linux-gnu', 'lib/x86_64-linux-gnu'] as const;

/**
 * The sid nbd-client's guest files. Which libraries it needs is asked of sid's own loader, run
 * here with only the unpacked sid packages on its path (and no ld.so.cache): every library must
 * resolve inside them, as it will in the guest.
 */
async function sidClientEntries(cacheDir: string, log: (message: string) => void): Promise<{ entries: CpioEntry[]; version: string }> {
  const fetched = await fetchSuitePackages(cacheDir, SID_CLIENT.suite, [SID_CLIENT.package], { skip: SID_CLIENT.skip, log });
  const client = fetched[0]!;
  const libraryDirs = fetched.flatMap((pkg) => LIBRARY_DIRS.map((dir) => join(pkg.root, dir))).filter((dir) => existsSync(dir));
  const loader = libraryDirs.map((dir) => join(dir, LOADER)).find((path) => existsSync(path));
  if (loader === undefined) throw new Error(`no ${LOADER} in the ${SID_CLIENT.suite} packages ${fetched.map((pkg) => pkg.name).join(' ')}`);
  const binary = join(client.root, SID_CLIENT.binary);
  const result = await runCommand(loader, ['--inhibit-cache', '--library-path', libraryDirs.join(':'), '--list', binary]);
  const text = result.stdout + result.stderr;
  const { paths, missing } = parseLdd(text);
  if (result.code !== 0 || missing.length > 0 || /not found/.test(text)) {
    throw new Error(`${SID_CLIENT.suite}'s ${LOADER} cannot load ${SID_CLIENT.binary} from the ${SID_CLIENT.suite} packages:\n${text.trim()}`);
  }
  const outside = paths.filter((path) => !fetched.some((pkg) => path.startsWith(`${pkg.root}/`)));
  if (outside.length > 0) throw new Error(`${SID_CLIENT.suite}'s ${LOADER} would load ${outside.join(', ')} from this machine`);
  const dir = SID_CLIENT.guestDir;
  const wrapper = `#!/bin/sh\nexec ${dir}/lib/${LOADER} --inhibit-cache --library-path ${dir}/lib ${dir}/sbin/nbd-client "$@"\n`;
  return {
    version: client.version,
    entries: [
      ...paths.map((path): CpioEntry => ({ kind: 'file', path: `${dir}/lib/${basename(path)}`, source: path })),
      { kind: 'file', path: `${dir}/sbin/nbd-client`, source: binary },
      { kind: 'file', path: SID_CLIENT.wrapper, source: Buffer.from(wrapper) },
    ],
  };
}

/** The committed guest script: beside this module in scripts/vm, or three levels up from dist. */
function guestInitPath(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  const candidates = [join(here, 'guest-init.sh'), join(here, '..', '..', '..', 'scripts', 'vm', 'guest-init.sh')];
  const found = candidates.find((path) => existsSync(path));
  if (found === undefined) throw new Error(`guest-init.sh not found (looked at ${candidates.join(', ')})`);
  return found;
}

interface GuestImage {
  kernel: string;
  kernelPackage: string;
  initrd: string;
  initrdBytes: number;
  modules: string[];
  /** The version of sid's nbd-client in the guest. */
  sidClientVersion: string;
}

/**
 * Fetches (or finds in the cache) the kernel and the guest's packages and writes the initramfs
 * to `workDir`.
 */
async function buildGuestImage(cacheDir: string, workDir: string, log: (message: string) => void): Promise<GuestImage> {
  const kernelPackage = await resolveKernelPackage();
  const packages = [kernelPackage, ...GUEST_PACKAGES];
  const debs = await fetchPackages(cacheDir, packages, log);
  const unpacked = new Map<string, string>();
  for (const [index, pkg] of packages.entries()) unpacked.set(pkg, await unpackPackage(cacheDir, debs[index]!));
  const kernelRoot = unpacked.get(kernelPackage)!;
  const version = kernelPackage.replace(/^linux-image-/, '');
  const kernel = join(kernelRoot, 'boot', `vmlinuz-${version}`);
  if (!existsSync(kernel)) throw new Error(`${kernelPackage} has no boot/vmlinuz-${version}`);
  const modules = await resolveModules(join(kernelRoot, 'lib', 'modules', version), GUEST_MODULES);

  const binaries = GUEST_BINARIES.map((binary) => ({ ...binary, source: join(unpacked.get(binary.pkg)!, binary.from) }));
  const libraries = await libraryClosure(binaries.map((binary) => binary.source));
  const sidClient = await sidClientEntries(cacheDir, log);

  const entries: CpioEntry[] = [
    { kind: 'file', path: '/init', source: guestInitPath() },
    { kind: 'chardev', path: '/dev/console', major: 5, minor: 1 },
    { kind: 'symlink', path: '/bin/sh', target: 'busybox' },
    { kind: 'symlink', path: '/sbin/mkfs.ext4', target: 'mke2fs' },
    { kind: 'file', path: '/etc/mke2fs.conf', source: join(unpacked.get('e2fsprogs')!, 'etc', 'mke2fs.conf'), mode: 0o644 },
    ...['/proc', '/sys', '/run', '/tmp', '/mnt'].map((path): CpioEntry => ({ kind: 'dir', path })),
    ...binaries.map((binary): CpioEntry => ({ kind: 'file', path: binary.to, source: binary.source })),
    ...libraries.map((path): CpioEntry => ({ kind: 'file', path, source: path })),
    ...modules.map((module): CpioEntry => ({ kind: 'file', path: `/lib/modules/${module.name}.ko`, source: module.path, mode: 0o644 })),
    {
      kind: 'file',
      path: '/lib/modules/order',
      source: Buffer.from(modules.map((module) => `${module.name}\n`).join('')),
      mode: 0o644,
    },
    ...sidClient.entries,
  ];
  const initrd = join(workDir, 'initrd.cpio');
  const initrdBytes = await writeCpio(initrd, entries);
  return {
    kernel,
    kernelPackage,
    initrd,
    initrdBytes,
    modules: modules.map((module) => module.name),
    sidClientVersion: sidClient.version,
  };
}

export interface KernelTestOptions {
  jobs: readonly GuestJob[];
  /** Where downloaded and unpacked packages are kept. Default ~/.cache/clonebd/vm. */
  cacheDir?: string;
  /** The whole run, image building included. Default 5 minutes. */
  timeoutMs?: number;
  /** Carries out a guest's request (restart jobs); the guest waits for it to resolve. */
  onHostRequest?: (request: HostRequest, job: string) => Promise<void>;
  /** Progress messages. */
  log?: (message: string) => void;
  /** Every console line as it arrives. */
  onConsole?: (line: string) => void;
}

export interface KernelTestResult {
  kernelPackage: string;
  /** The version of sid's nbd-client, which the restart job uses. */
  sidClientVersion: string;
  steps: StepReport[];
  /** From QEMU's start to the guest's `boot` step. */
  bootMs: number;
  /** From QEMU's start to its exit. */
  vmMs: number;
  /** Everything, image building included. */
  totalMs: number;
}

export class KernelTestError extends Error {
  readonly steps: readonly StepReport[];
  readonly consoleTail: string;

  constructor(reason: string, steps: readonly StepReport[], consoleTail: string) {
    super(`${reason}\n--- console tail\n${consoleTail}`);
    this.name = 'KernelTestError';
    this.steps = steps;
    this.consoleTail = consoleTail;
  }
}

function chardevTarget(job: GuestJob): string {
  // QEMU option values escape commas by doubling them.
  const escape = (text: string): string => text.replace(/,/g, ',,');
  return 'path' in job.target ? `path=${escape(job.target.path)}` : `host=${job.target.host},port=${job.target.port}`;
}

function qemuArguments(image: { kernel: string; initrd: string }, jobs: readonly GuestJob[]): string[] {
  const args = [
    '-machine', 'q35',
    '-accel', 'tcg',
    '-m', '1024',
    '-smp', '1',
    '-nographic',
    '-nic', 'none',
    '-no-reboot',
    '-kernel', image.kernel,
    '-initrd', image.initrd,
    '-append', ['console=ttyS0', 'panic=-1', 'loglevel=4', ...jobArguments(jobs)].join(' '),
    '-device', 'virtio-serial-pci',
  ];
  jobs.forEach((job, index) => {
    args.push('-chardev', `socket,id=job${index},${chardevTarget(job)},reconnect=1`);
    args.push('-device', `virtserialport,chardev=job${index},name=clonebd.${job.name}`);
  });
  return args;
}

const liveVms = new Set<ChildProcess>();
let exitHookInstalled = false;

function track(child: ChildProcess): void {
  liveVms.add(child);
  child.once('exit', () => liveVms.delete(child));
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const vm of liveVms) vm.kill('SIGKILL');
  });
}

/**
 * Builds the guest, boots it, and resolves when every expected step passed; otherwise rejects
 * with a KernelTestError naming the first failed or missing step, with the console's tail.
 */
export async function runKernelTest(options: KernelTestOptions): Promise<KernelTestResult> {
  const started = performance.now();
  const deadline = started + (options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
  const log = options.log ?? ((): void => undefined);
  const expected = expectedSteps(options.jobs);
  const workDir = await mkdtemp(join(tmpdir(), 'clonebd-vm-'));
  try {
    const image = await buildGuestImage(options.cacheDir ?? DEFAULT_CACHE_DIR, workDir, log);
    log(
      `${image.kernelPackage}, nbd-client ${image.sidClientVersion} from ${SID_CLIENT.suite}, ` +
        `initramfs ${(image.initrdBytes / 2 ** 20).toFixed(0)} MiB, modules ${image.modules.join(' ')}`,
    );
    const run = await bootAndWatch(image, options, deadline);
    const totalMs = performance.now() - started;
    const tail = run.console.slice(-CONSOLE_TAIL_LINES).join('\n');
    if (run.stopReason !== undefined) throw new KernelTestError(run.stopReason, run.steps, tail);
    const verdict = judgeSteps(expected, run.steps);
    if (!verdict.ok) throw new KernelTestError(verdict.reason, run.steps, tail);
    return { kernelPackage: image.kernelPackage, sidClientVersion: image.sidClientVersion, steps: run.steps, bootMs: run.bootMs, vmMs: run.vmMs, totalMs };
  } finally {
    await rm(workDir, { recursive: true, force: true });
  }
}

interface VmRun {
  steps: StepReport[];
  console: string[];
  bootMs: number;
  vmMs: number;
  /** Why the host ended the run early (deadline, host request failure), if it did. */
  stopReason: string | undefined;
}

function bootAndWatch(image: GuestImage, options: KernelTestOptions, deadline: number): Promise<VmRun> {
  const started = performance.now();
  const child = spawn('qemu-system-x86_64', qemuArguments(image, options.jobs), { stdio: ['pipe', 'pipe', 'pipe'] });
  track(child);
  const steps: StepReport[] = [];
  const consoleLines: string[] = [];
  const stderr: string[] = [];
  let pending = '';
  let bootMs = 0;
  let stopReason: string | undefined;
  let requests = Promise.resolve();

  const stop = (reason: string): void => {
    stopReason ??= reason;
    child.kill('SIGKILL');
  };
  const overall = setTimeout(
    () => stop(`timed out after ${((deadline - started) / 1000).toFixed(0)} s in the VM (last step: ${steps.at(-1)?.name ?? 'none'})`),
    Math.max(0, deadline - performance.now()),
  );
  let afterFailure: NodeJS.Timeout | undefined;

  const answer = (request: HostRequest, job: string): void => {
    requests = requests.then(async () => {
      let reply = `${request} done`;
      try {
        if (options.onHostRequest === undefined) throw new Error('no handler for host requests');
        await options.onHostRequest(request, job);
      } catch (error) {
        reply = `${request} failed`;
        consoleLines.push(`host: ${request} for ${job} failed: ${error instanceof Error ? error.message : String(error)}`);
      }
      if (child.stdin!.writable) child.stdin!.write(`${reply}\n`);
    });
  };

  const onLine = (raw: string): void => {
    const line = cleanConsoleLine(raw);
    consoleLines.push(line);
    options.onConsole?.(line);
    const step = parseStepLine(line);
    if (step !== undefined) {
      const atMs = performance.now() - started;
      if (step.name === 'boot') bootMs = atMs;
      steps.push({ ...step, atMs });
      if (!step.ok && afterFailure === undefined) {
        afterFailure = setTimeout(() => stop(`step ${step.name} failed: ${step.detail}`), AFTER_FAILURE_MS);
      }
      return;
    }
    const host = parseHostLine(line);
    if (host !== undefined) answer(host.request, host.job);
  };

  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    pending += chunk;
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      onLine(pending.slice(0, newline));
      pending = pending.slice(newline + 1);
    }
  });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => stderr.push(chunk));
  child.stdin!.on('error', () => undefined);

  return new Promise((resolve, reject) => {
    child.on('error', (error) => {
      clearTimeout(overall);
      clearTimeout(afterFailure);
      reject(new Error(`cannot start qemu-system-x86_64: ${error.message}`, { cause: error }));
    });
    child.on('close', (code, signal) => {
      clearTimeout(overall);
      clearTimeout(afterFailure);
      if (pending !== '') onLine(pending);
      const qemuErrors = stderr.join('').trim();
      if (code !== 0 && stopReason === undefined) {
        stopReason = `qemu exited with ${code ?? signal}${qemuErrors === '' ? '' : `:\n${qemuErrors}`}`;
      }
      resolve({ steps, console: consoleLines, bootMs, vmMs: performance.now() - started, stopReason });
    });
  });
}
