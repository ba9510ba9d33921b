/**
 * Attaches a clonebd export as a block device on this node, grows it, and detaches it again.
 *
 * Two ways, chosen per attach:
 * - kernel nbd, when the node has /dev/nbd* (the nbd module is loaded): `nbd-client -unix SOCKET
 *   /dev/nbdN -name VOLUME`. With netlink (nbd-client's default) the client exits once the kernel
 *   holds the connection, so nothing of ours has to stay running; `nbd-client -d` detaches.
 * - user space otherwise:
 *
 *     daemon ──POOL/nbd.sock── clonebd attach-file ── STATE/fuse/VOLUME/disk ── losetup ── /dev/loopN
 *
 *   `clonebd attach-file` (our own FUSE file server, src/fuse/) is spawned detached (its own
 *   session, not a child the driver waits for) and outlives a restart of the driver; its pid, the
 *   FUSE directory, the file's identity and the loop device are kept in the volume's record.
 *   Teardown runs top-down: detach every loop device backed by the file, `fusermount3 -u` the
 *   directory (the server then exits by itself), make sure the process is gone. Records made by
 *   earlier versions name nbdfuse instead; they are torn down the same way.
 *
 * A loop device is recognised by its backing file's path, or by its number *and* its backing
 * file's device and inode together (a FUSE file whose mount went away shows another path), never
 * by its number alone: the number is reused by the next attach anywhere on the node. Neither is
 * trusted across a reboot (see Attachment.bootId). A process is signalled only while /proc says
 * it is a file server (attach-file on our directory, or nbdfuse on our file).
 *
 * Growing while attached. On the user-space way, SIGHUP makes attach-file re-read the export's
 * size on a fresh NBD connection and grow the file; once `stat` shows the new size, `losetup -c`
 * grows the loop device, with filesystems mounted on it. The kernel's nbd client cannot follow:
 * the kernel learns a new size only through the NBD_SET_SIZE ioctl (or netlink's reconfigure),
 * which needs native code Node does not have, and nbd-client offers no command for it. A device
 * attached that way, or by nbdfuse, keeps its size until it is attached afresh (see
 * NodeExpandVolume in node.ts).
 */
import { spawn } from 'node:child_process';
import { mkdir, open, readdir, readFile, rm, rmdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { OperationError } from '../util/errors.js';
import { describeFailure, runChecked, runCommand, toolPath } from './node-exec.js';
import { blockDeviceSize, isMountPoint } from './node-mount.js';
import type { Attachment, FileAttachment, FileIdentity, StateStore } from './node-state.js';

const READY_TIMEOUT_MS = 30_000;
const EXIT_TIMEOUT_MS = 15_000;
const GROW_TIMEOUT_MS = 30_000;
const POLL_MS = 25;
/**
 * The file server's libuv pool: attach-file keeps all but two of its threads blocked in reads of
 * /dev/fuse, one request each.
 */
const FILE_SERVER_THREADS = 8;
/** This program's CLI, which the driver runs as: the file server is its `attach-file` command. */
const CLI_PATH = fileURLToPath(new URL('../cli/main.js', import.meta.url));

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it returns true; false when the deadline passes first. */
async function waitFor(check: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return true;
    if (Date.now() >= deadline) return false;
    await delay(POLL_MS);
  }
}

/** `work`'s result, or undefined when it fails or takes longer than `ms`. */
async function within<T>(ms: number, work: Promise<T>): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([work.catch(() => undefined), expired]);
  } finally {
    clearTimeout(timer);
  }
}

let bootIdCache: string | undefined;

/** The kernel's id of the running boot. */
export async function currentBootId(): Promise<string> {
  bootIdCache ??= (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
  return bootIdCache;
}

/** The nbd devices the kernel offers, when the nbd module is loaded. */
export async function kernelNbdDevices(): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir('/sys/block');
  } catch {
    return [];
  }
  return names
    .filter((name) => /^nbd\d+$/.test(name))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

async function nbdDeviceConnected(name: string): Promise<boolean> {
  // The kernel publishes the pid file only while a connection is set up on the device.
  return exists(`/sys/block/${name}/pid`);
}

/**
 * Connects the export on the first free /dev/nbdN. `claim` is called with the device before
 * nbd-client runs, so the record names it should the driver die half-way.
 */
export async function attachKernelNbd(
  nbdSocket: string,
  volumeId: string,
  claim: (device: string) => Promise<void>,
): Promise<string> {
  const failures: string[] = [];
  for (const name of await kernelNbdDevices()) {
    const device = `/dev/${name}`;
    if ((await nbdDeviceConnected(name)) || !(await exists(device))) continue;
    await claim(device);
    const result = await runCommand('nbd-client', ['-unix', nbdSocket, device, '-name', volumeId, '-block-size', '4096']);
    if (result.code === 0) return device;
    failures.push(describeFailure(result));
    // Another user may have taken the device between the check and the connect: try the next one.
    if (failures.length >= 4) break;
  }
  throw new OperationError('EIO', `no nbd device could be connected${failures.length > 0 ? `: ${failures.join('; ')}` : ''}`);
}

async function detachKernelNbd(device: string): Promise<void> {
  const name = device.replace(/^\/dev\//, '');
  if (!(await nbdDeviceConnected(name))) return;
  await runChecked('nbd-client', ['-d', device]);
}

interface LoopEntry {
  name: string;
  backFile: string;
  identity: FileIdentity;
}

async function listLoopDevices(): Promise<LoopEntry[]> {
  const result = await runChecked('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN']);
  if (result.stdout.trim() === '') return [];
  const parsed = JSON.parse(result.stdout) as { loopdevices?: Record<string, unknown>[] };
  return (parsed.loopdevices ?? []).map((entry) => {
    const [major, minor] = String(entry['back-maj:min'] ?? '').trim().split(':');
    return {
      name: String(entry.name),
      // losetup marks a backing file that was removed or whose mount went away with " (deleted)".
      backFile: String(entry['back-file'] ?? '').replace(/ \(deleted\)$/, ''),
      identity: { major: Number(major), minor: Number(minor), ino: Number(String(entry['back-ino'] ?? '').trim()) },
    };
  });
}

function sameIdentity(a: FileIdentity, b: FileIdentity): boolean {
  return a.major === b.major && a.minor === b.minor && a.ino === b.ino;
}

/** A loop device recorded as ours: its name and the identity of its backing file. */
interface KnownLoop {
  name: string;
  identity: FileIdentity;
}

/** The loop devices backed by `file`: by path, or the one recorded, if its backing file is still the same. */
async function loopsBackedBy(file: string, known: KnownLoop | undefined): Promise<string[]> {
  return (await listLoopDevices())
    .filter(
      (entry) =>
        entry.backFile === file || (known !== undefined && entry.name === known.name && sameIdentity(entry.identity, known.identity)),
    )
    .map((entry) => entry.name);
}

/** Detaches the loop devices backed by `file` and waits until the kernel has let go of them. */
export async function detachLoopsBackedBy(file: string, known?: KnownLoop): Promise<void> {
  for (const loop of await loopsBackedBy(file, known)) {
    const result = await runCommand('losetup', ['--detach', loop]);
    // A device that went away meanwhile is what we wanted.
    if (result.code !== 0 && (await loopsBackedBy(file, known)).includes(loop)) {
      throw new OperationError('EIO', describeFailure(result));
    }
  }
  // A device still open elsewhere (udev probing it) is only marked autoclear: wait for it to go.
  const released = await waitFor(async () => (await loopsBackedBy(file, known)).length === 0, EXIT_TIMEOUT_MS);
  if (!released) throw new OperationError('EBUSY', `a loop device backed by ${file} is still in use`);
}

function knownLoop(attachment: FileAttachment): KnownLoop | undefined {
  const { loopDevice, identity } = attachment;
  return loopDevice === undefined || identity === undefined ? undefined : { name: loopDevice, identity };
}

/** A read-only loop device over `device`, for a read-only publication of a block volume. */
export async function attachReadonlyLoop(device: string): Promise<string> {
  const result = await runChecked('losetup', ['--find', '--show', '--read-only', device]);
  return result.stdout.trim();
}

/** Linux's dev_t encoding (major: bits 8-19 and 32-43, minor: bits 0-7 and 20-31). */
function splitDev(dev: bigint): { major: number; minor: number } {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return { major: Number(major), minor: Number(minor) };
}

/**
 * The file server processes of a FUSE directory, found in /proc: `clonebd attach-file` with
 * `--mountpoint DIR` (kind `fuse`), or, for records of earlier versions, nbdfuse serving DIR/disk.
 * A zombie has an empty cmdline, so it is not one.
 */
async function fileServers(fuseDir: string, file: string): Promise<{ pid: number; kind: FileAttachment['kind'] }[]> {
  const found: { pid: number; kind: FileAttachment['kind'] }[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    const args = cmdline.split('\0');
    const mountpointAt = args.indexOf('--mountpoint');
    if (args.includes('attach-file') && mountpointAt > 0 && args[mountpointAt + 1] === fuseDir) {
      found.push({ pid: Number(name), kind: 'fuse' });
    } else if (args.some((arg) => arg === 'nbdfuse' || arg.endsWith('/nbdfuse')) && args.includes(file)) {
      found.push({ pid: Number(name), kind: 'nbdfuse' });
    }
  }
  return found;
}

async function fileServerPids(fuseDir: string, file: string): Promise<number[]> {
  return (await fileServers(fuseDir, file)).map((server) => server.pid);
}

interface ServedFile {
  fuseDir: string;
  file: string;
  pid: number;
  identity: FileIdentity;
}

/** Where a volume's file server lives, before anything is started. */
export function fileAttachmentPaths(store: StateStore, volumeId: string): { fuseDir: string; file: string } {
  const fuseDir = join(store.fuseRoot, volumeId);
  return { fuseDir, file: join(fuseDir, 'disk') };
}

function pidFile(store: StateStore, volumeId: string): string {
  return join(store.logRoot, `${volumeId}.pid`);
}

function logFile(store: StateStore, volumeId: string): string {
  return join(store.logRoot, `${volumeId}.log`);
}

async function readLog(store: StateStore, volumeId: string): Promise<string> {
  return (await readFile(logFile(store, volumeId), 'utf8').catch(() => '')).trim();
}

async function fileIdentity(file: string): Promise<{ size: bigint; identity: FileIdentity }> {
  const info = await stat(file, { bigint: true });
  return { size: info.size, identity: { ...splitDev(info.dev), ino: Number(info.ino) } };
}

/**
 * Starts `clonebd attach-file` for the export and waits until it serves a file of `size` bytes.
 * The caller has recorded the FUSE directory first, so a crash from here on is undone by `detach`.
 */
export async function startFileServer(store: StateStore, nbdSocket: string, volumeId: string, size: number): Promise<ServedFile> {
  const { fuseDir, file } = fileAttachmentPaths(store, volumeId);
  await mkdir(fuseDir, { recursive: true, mode: 0o700 });
  const pidPath = pidFile(store, volumeId);
  await rm(pidPath, { force: true });
  const log = await open(logFile(store, volumeId), 'w', 0o600);
  let exitStatus: string | undefined;
  let pid: number | undefined;
  try {
    // The pid file is written once the file is served, which is the readiness signal.
    const args = [CLI_PATH, 'attach-file', '--socket', nbdSocket, '--export', volumeId, '--mountpoint', fuseDir, '--pid-file', pidPath];
    const child = spawn(process.execPath, args, {
      detached: true,
      stdio: ['ignore', log.fd, log.fd],
      env: { ...process.env, UV_THREADPOOL_SIZE: String(FILE_SERVER_THREADS) },
    });
    child.on('error', (error) => {
      exitStatus = `not started: ${error.message}`;
    });
    child.on('exit', (code, signal) => {
      exitStatus = signal === null ? `exit ${code}` : `killed by ${signal}`;
    });
    child.unref();
    pid = child.pid;
  } finally {
    await log.close();
  }
  const ready = await waitFor(async () => {
    if (exitStatus !== undefined) return true;
    const text = await readFile(pidPath, 'utf8').catch(() => '');
    return text.trim() !== '';
  }, READY_TIMEOUT_MS);
  if (exitStatus !== undefined || !ready || pid === undefined) {
    const why = exitStatus !== undefined ? `ended (${exitStatus})` : `did not serve ${file} within ${READY_TIMEOUT_MS} ms`;
    throw new OperationError('EIO', `the file server for ${volumeId} ${why}: ${await readLog(store, volumeId)}`);
  }
  const served = await fileIdentity(file);
  if (served.size !== BigInt(size)) {
    throw new OperationError('EIO', `the file server serves ${file} with ${served.size} bytes, the export has ${size}`);
  }
  return { fuseDir, file, pid, identity: served.identity };
}

/**
 * Grows a `fuse` attachment to at least `size` bytes while it is in use: SIGHUP to its file server
 * (which re-reads the export's size), a wait until the file shows the size, then `losetup -c` on
 * its loop device. Resolves with the loop device's new size.
 */
export async function growFileAttachment(store: StateStore, volumeId: string, attachment: FileAttachment, size: number): Promise<number> {
  const { file, fuseDir, loopDevice } = attachment;
  if (attachment.kind !== 'fuse' || loopDevice === undefined) {
    throw new OperationError('ENOTSUP', `${volumeId} is attached by ${attachment.kind}, which cannot grow in use`);
  }
  if (!(await loopsBackedBy(file, knownLoop(attachment))).includes(loopDevice)) {
    throw new OperationError('EIO', `${loopDevice} is no longer backed by ${file}`);
  }
  // SIGHUP would end an nbdfuse: only attach-file is signalled.
  const pids = (await fileServers(fuseDir, file)).filter((server) => server.kind === 'fuse').map((server) => server.pid);
  if (pids.length === 0) throw new OperationError('EIO', `no file server serves ${file}`);
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGHUP');
    } catch {
      // it exited meanwhile: the wait below fails with its log
    }
  }
  let shown: bigint | undefined;
  const deadline = Date.now() + GROW_TIMEOUT_MS;
  const grown = await waitFor(async () => {
    // A hung file server would hang the stat: it gets only the time left.
    const left = Math.max(0, deadline - Date.now());
    shown = await within(left, fileIdentity(file).then((served) => served.size));
    return shown !== undefined && shown >= BigInt(size);
  }, GROW_TIMEOUT_MS);
  if (!grown) {
    const log = await readLog(store, volumeId);
    throw new OperationError('EIO', `${file} shows ${shown ?? 'no'} bytes, not ${size}, ${GROW_TIMEOUT_MS} ms after SIGHUP: ${log}`);
  }
  await runChecked('losetup', ['--set-capacity', loopDevice]);
  return blockDeviceSize(loopDevice);
}

/** `losetup -c` on `loop` if it is still backed by `backFile` (a read-only loop device over a grown one). */
export async function refreshLoopIfBackedBy(loop: string, backFile: string): Promise<void> {
  const entry = (await listLoopDevices()).find((candidate) => candidate.name === loop);
  if (entry === undefined || entry.backFile !== backFile) return;
  await runChecked('losetup', ['--set-capacity', loop]);
}

/** `losetup --find --show FILE`. */
export async function attachLoop(file: string): Promise<string> {
  const result = await runChecked('losetup', ['--find', '--show', file]);
  return result.stdout.trim();
}

async function stopFileServer(fuseDir: string, file: string): Promise<void> {
  if (await isMountPoint(fuseDir)) {
    const result = await runCommand('fusermount3', ['-u', fuseDir]);
    if (result.code !== 0 && (await isMountPoint(fuseDir))) {
      throw new OperationError(/busy/i.test(result.stderr) ? 'EBUSY' : 'EIO', describeFailure(result));
    }
  }
  // Once its directory is unmounted the file server exits by itself. One that does not (it never
  // got as far as mounting, or hangs on a daemon that went away) is ended; the pids come from
  // /proc, not from the record, so a process started just before a crash is found too.
  const gone = async (): Promise<boolean> => (await fileServerPids(fuseDir, file)).length === 0;
  if (await waitFor(gone, EXIT_TIMEOUT_MS)) return;
  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    for (const pid of await fileServerPids(fuseDir, file)) {
      try {
        process.kill(pid, signal);
      } catch {
        // it exited meanwhile
      }
    }
    if (await waitFor(gone, EXIT_TIMEOUT_MS)) return;
  }
  throw new OperationError('EIO', `the file server of ${fuseDir} does not exit`);
}

/** Undoes `attach` step by step; safe to call again, and on an attachment that never completed. */
export async function detach(store: StateStore, volumeId: string, attachment: Attachment): Promise<void> {
  const sameBoot = attachment.bootId === (await currentBootId());
  if (attachment.kind === 'nbd') {
    if (sameBoot) await detachKernelNbd(attachment.device);
    return;
  }
  if (sameBoot) await detachLoopsBackedBy(attachment.file, knownLoop(attachment));
  // The FUSE directory and the processes are found by our own paths, which hold across boots.
  await stopFileServer(attachment.fuseDir, attachment.file);
  await rmdir(attachment.fuseDir).catch((error: NodeJS.ErrnoException) => {
    if (error.code !== 'ENOENT') throw new OperationError('EIO', `cannot remove ${attachment.fuseDir}`, { cause: error });
  });
  await rm(pidFile(store, volumeId), { force: true });
  await rm(logFile(store, volumeId), { force: true });
}

/** Detaches `loop` if it is still backed by `backFile`; a loop device that moved on is left alone. */
export async function detachLoopIfBackedBy(loop: string, backFile: string): Promise<void> {
  const entry = (await listLoopDevices()).find((candidate) => candidate.name === loop);
  if (entry === undefined || entry.backFile !== backFile) return;
  const result = await runCommand('losetup', ['--detach', loop]);
  if (result.code !== 0 && (await listLoopDevices()).some((candidate) => candidate.name === loop && candidate.backFile === backFile)) {
    throw new OperationError('EIO', describeFailure(result));
  }
}

/** The attachment still gives `device` for our export: its connection or its file server and loop device are in place. */
export async function attachmentIntact(attachment: Attachment, device: string): Promise<boolean> {
  if (attachment.bootId !== (await currentBootId())) return false;
  if (attachment.kind === 'nbd') {
    return attachment.device === device && (await nbdDeviceConnected(device.replace(/^\/dev\//, '')));
  }
  if (attachment.loopDevice !== device) return false;
  if (!(await loopsBackedBy(attachment.file, knownLoop(attachment))).includes(device)) return false;
  return (await fileServerPids(attachment.fuseDir, attachment.file)).length > 0;
}
