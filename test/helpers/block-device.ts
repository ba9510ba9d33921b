/**
 * Attaches an NBD export as a real block device from user space, for machines without the nbd
 * kernel module, and tears it down again:
 *
 *   server ──NBD── nbdfuse ── FUSE file WORK/fuse/disk ── losetup ── /dev/loopN ── ext4 at a mountpoint
 *
 * How the kernel's requests reach the server on this path:
 * - discard (fstrim, mkfs): loop punches a hole in its backing file; nbdfuse turns the
 *   fallocate(PUNCH_HOLE) into NBD_CMD_TRIM.
 * - flush (sync, umount): loop fsyncs its backing file; nbdfuse turns the fsync into NBD_CMD_FLUSH.
 *
 * Teardown runs strictly top-down (umount, losetup -d, fusermount3 -u, nbdfuse exits) and goes on
 * past a failed step, so one stuck layer does not leave the others behind; the failures are thrown
 * together at the end. Every device attached here is registered until it is detached, so an
 * afterEach can detach what a failed test left, and `leftovers` reports anything of ours that is
 * still in /proc/mounts, still backing a loop device, or still running.
 *
 * A loop device is identified by its backing file's (st_dev, st_ino), not by path or by /dev/loopN:
 * the number is reused by the next attach anywhere on the machine, and a dead FUSE mount shows its
 * file under a different path.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { findTool, run, runOk, describeResult } from './tools.js';

const READY_TIMEOUT_MS = 20_000;
const TEARDOWN_TIMEOUT_MS = 15_000;
const POLL_MS = 20;

/** The external tools this module runs; a test should `requireTools` them first. */
export const BLOCK_DEVICE_TOOLS = [
  'nbdfuse',
  'fusermount3',
  'losetup',
  'mount',
  'umount',
  'mkfs.ext4',
  'e2fsck',
  'dumpe2fs',
  'fstrim',
  'sync',
  'nbdinfo',
  'filefrag',
] as const;

function tool(name: string): string {
  return findTool(name) ?? name;
}

/** Polls `condition` until it returns a value other than undefined; throws `describe()` at the deadline. */
export async function pollUntil<T>(
  condition: () => Promise<T | undefined>,
  timeoutMs: number,
  describe: () => string,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value !== undefined) return value;
    if (Date.now() >= deadline) throw new Error(`gave up after ${timeoutMs} ms: ${describe()}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

interface FileIdentity {
  major: number;
  minor: number;
  ino: bigint;
}

/** Linux's dev_t encoding (major: bits 8-19 and 32-43, minor: bits 0-7 and 20-31). */
function splitDev(dev: bigint): { major: number; minor: number } {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return { major: Number(major), minor: Number(minor) };
}

interface LoopEntry {
  name: string;
  backFile: string;
  major: number;
  minor: number;
  ino: bigint;
}

async function listLoopDevices(): Promise<LoopEntry[]> {
  const result = await runOk(tool('losetup'), ['--list', '--json', '--output', 'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN']);
  if (result.stdout.trim() === '') return [];
  const parsed = JSON.parse(result.stdout) as { loopdevices?: Record<string, unknown>[] };
  return (parsed.loopdevices ?? []).map((entry) => {
    const [major, minor] = String(entry['back-maj:min'] ?? '').trim().split(':');
    return {
      name: String(entry.name),
      backFile: String(entry['back-file'] ?? ''),
      major: Number(major),
      minor: Number(minor),
      ino: BigInt(String(entry['back-ino'] ?? '0').trim() || '0'),
    };
  });
}

function backedBy(entry: LoopEntry, identity: FileIdentity): boolean {
  return entry.major === identity.major && entry.minor === identity.minor && entry.ino === identity.ino;
}

/** Decodes the octal escapes /proc/mounts uses for spaces and the like in paths. */
function unescapeMountPath(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

async function mountedPaths(): Promise<Set<string>> {
  const table = await readFile('/proc/mounts', 'utf8');
  return new Set(
    table
      .split('\n')
      .filter((line) => line !== '')
      .map((line) => unescapeMountPath(line.split(' ')[1] ?? '')),
  );
}

export interface AttachedDevice {
  readonly uri: string;
  /** The FUSE mountpoint nbdfuse serves. */
  readonly fuseDir: string;
  /** The export as a file inside `fuseDir`. */
  readonly file: string;
  /** `/dev/loopN`. */
  readonly loop: string;
  /** Where the filesystem is mounted, while it is. */
  readonly mountpoint: string | undefined;
  /** nbdfuse's stderr so far, for failure messages. */
  nbdfuseStderr(): string;
  mount(dir: string, options?: readonly string[]): Promise<void>;
  unmount(): Promise<void>;
  /** Idempotent, complete teardown; throws the failed steps together after attempting all of them. */
  detach(): Promise<void>;
}

interface Registered {
  device: AttachedDevice;
  workDir: string;
  /** Every directory the filesystem was ever mounted on. */
  mountpoints: Set<string>;
  identity: FileIdentity | undefined;
  nbdfuse: ChildProcess;
}

const attached = new Set<Registered>();
/** Everything ever attached by this module, kept after detach so `leftovers` can check it. */
const history: Registered[] = [];

/**
 * `nbdfuse WORK/fuse/disk URI`, waits until the file has `size` bytes, then `losetup --find --show`.
 * `workDir` must exist; the FUSE mountpoint is made inside it.
 */
export async function attachBlockDevice(uri: string, size: number, workDir: string): Promise<AttachedDevice> {
  const fuseDir = join(workDir, 'fuse');
  const file = join(fuseDir, 'disk');
  await mkdir(fuseDir, { recursive: true });

  const nbdfuse = spawn(tool('nbdfuse'), [file, uri], { stdio: ['ignore', 'ignore', 'pipe'] });
  const stderrChunks: Buffer[] = [];
  nbdfuse.stderr!.on('data', (chunk: Buffer) => stderrChunks.push(chunk));
  const nbdfuseStderr = (): string => Buffer.concat(stderrChunks).toString('utf8');
  let exitStatus: string | undefined;
  const exited = new Promise<void>((resolve) => {
    nbdfuse.on('exit', (code, signal) => {
      exitStatus = signal === null ? `exit ${code}` : `killed by ${signal}`;
      resolve();
    });
    nbdfuse.on('error', (error) => {
      stderrChunks.push(Buffer.from(`spawn failed: ${error.message}\n`));
      if (nbdfuse.pid === undefined) {
        exitStatus = 'not started';
        resolve();
      }
    });
  });

  let loop: string | undefined;
  let mountpoint: string | undefined;
  let detaching: Promise<void> | undefined;
  const registered: Registered = {
    workDir,
    mountpoints: new Set(),
    identity: undefined,
    nbdfuse,
    device: {
      uri,
      fuseDir,
      file,
      get loop() {
        if (loop === undefined) throw new Error(`${file} has no loop device`);
        return loop;
      },
      get mountpoint() {
        return mountpoint;
      },
      nbdfuseStderr,
      async mount(dir, options = []) {
        if (mountpoint !== undefined) throw new Error(`${registered.device.loop} is already mounted at ${mountpoint}`);
        await mkdir(dir, { recursive: true });
        registered.mountpoints.add(dir);
        await runOk(tool('mount'), ['-t', 'ext4', ...options, registered.device.loop, dir]);
        mountpoint = dir;
      },
      async unmount() {
        if (mountpoint === undefined) return;
        await runOk(tool('umount'), [mountpoint]);
        mountpoint = undefined;
      },
      detach() {
        detaching ??= teardown();
        return detaching;
      },
    },
  };
  attached.add(registered);
  history.push(registered);

  const teardown = async (): Promise<void> => {
    const failures: string[] = [];
    const step = async (what: string, action: () => Promise<void>): Promise<void> => {
      try {
        await action();
      } catch (error) {
        failures.push(`${what}: ${error instanceof Error ? error.message : String(error)}`);
      }
    };
    if (mountpoint !== undefined) {
      const dir = mountpoint;
      await step(`umount ${dir}`, async () => {
        const result = await run(tool('umount'), [dir]);
        if (result.code !== 0) {
          // Leave nothing mounted even so; the failure is still reported.
          await run(tool('umount'), ['--lazy', dir]);
          throw new Error(describeResult(result));
        }
      });
      mountpoint = undefined;
    }
    const identity = registered.identity;
    if (loop !== undefined && identity !== undefined) {
      const device = loop;
      await step(`losetup -d ${device}`, async () => {
        const entries = await listLoopDevices();
        if (entries.some((entry) => entry.name === device && backedBy(entry, identity))) {
          await runOk(tool('losetup'), ['--detach', device]);
        }
        // A device still open (udev probing it, say) is only marked autoclear; wait for it to go.
        await pollUntil(
          async () => ((await listLoopDevices()).some((entry) => backedBy(entry, identity)) ? undefined : true),
          TEARDOWN_TIMEOUT_MS,
          () => `${device} still backed by ${file}`,
        );
      });
    }
    await step(`fusermount3 -u ${fuseDir}`, async () => {
      if ((await mountedPaths()).has(fuseDir)) {
        const result = await run(tool('fusermount3'), ['-u', fuseDir]);
        if (result.code !== 0) {
          nbdfuse.kill('SIGTERM');
          await run(tool('fusermount3'), ['-u', '-z', fuseDir]);
          throw new Error(describeResult(result));
        }
      }
    });
    await step('nbdfuse exit', async () => {
      if (exitStatus !== undefined) return;
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        exited.then(() => false),
        new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(true), TEARDOWN_TIMEOUT_MS);
        }),
      ]);
      clearTimeout(timer);
      if (timedOut) {
        nbdfuse.kill('SIGKILL');
        await exited;
        throw new Error(`nbdfuse did not exit within ${TEARDOWN_TIMEOUT_MS} ms of its unmount; killed`);
      }
    });
    attached.delete(registered);
    if (failures.length > 0) {
      throw new Error(`teardown of ${uri} failed:\n${failures.join('\n')}\n--- nbdfuse stderr\n${nbdfuseStderr()}`);
    }
  };

  try {
    // nbdfuse serves the file only once it has connected; until then the directory is empty.
    const fileStat = await pollUntil(
      async () => {
        if (exitStatus !== undefined) {
          throw new Error(`nbdfuse ${file} ${uri} ended (${exitStatus}) before serving the file:\n${nbdfuseStderr()}`);
        }
        const info = await stat(file, { bigint: true }).catch(() => undefined);
        return info !== undefined && info.size === BigInt(size) ? info : undefined;
      },
      READY_TIMEOUT_MS,
      () => `${file} did not appear with ${size} bytes\n--- nbdfuse stderr\n${nbdfuseStderr()}`,
    );
    registered.identity = { ...splitDev(fileStat.dev), ino: fileStat.ino };
    const result = await runOk(tool('losetup'), ['--find', '--show', file]);
    loop = result.stdout.trim();
    return registered.device;
  } catch (error) {
    await registered.device.detach().catch(() => undefined);
    throw error;
  }
}

/** Detaches every device this module attached and has not detached yet. */
export async function detachAllBlockDevices(): Promise<void> {
  const results = await Promise.allSettled([...attached].map((entry) => entry.device.detach()));
  const errors = results.flatMap((result) => (result.status === 'rejected' ? [result.reason as unknown] : []));
  if (errors.length > 0) throw new AggregateError(errors, 'block device teardown failed');
}

/**
 * What this module ever attached and is still around: mounts inside its work directories or on
 * the mountpoints it used, loop devices backed by its files, nbdfuse processes still running. Empty when all
 * is torn down.
 */
export async function leftovers(): Promise<string[]> {
  const found: string[] = [];
  const mounts = await mountedPaths();
  const loops = await listLoopDevices();
  for (const entry of history) {
    for (const path of mounts) {
      const ours = path === entry.workDir || path.startsWith(`${entry.workDir}/`) || entry.mountpoints.has(path);
      if (ours && !found.includes(`mounted: ${path}`)) found.push(`mounted: ${path}`);
    }
    const identity = entry.identity;
    if (identity !== undefined) {
      for (const loop of loops.filter((candidate) => backedBy(candidate, identity))) {
        found.push(`loop device ${loop.name} backed by ${entry.device.file} (${loop.backFile})`);
      }
    }
    if (entry.nbdfuse.exitCode === null && entry.nbdfuse.signalCode === null && entry.nbdfuse.pid !== undefined) {
      found.push(`nbdfuse pid ${entry.nbdfuse.pid} for ${entry.device.uri} still running`);
    }
  }
  return found;
}

/**
 * `mkfs.ext4` with 4 KiB blocks, so every discard is whole 4 KiB blocks (a small filesystem would
 * get 1 KiB blocks, and a discard that splits a 4 KiB block can only zero it, not free it); and
 * without lazy initialisation, so no kernel thread writes to the device after mount.
 */
export async function makeExt4(device: string): Promise<void> {
  const options = ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0'];
  await runOk(tool('mkfs.ext4'), [...options, device], {
    timeoutMs: 60_000,
  });
}

export interface FsckReport {
  /** The superblock said `needs_recovery`, and the journal was replayed before the check. */
  replayedJournal: boolean;
}

/**
 * Checks an unmounted ext4 the way a crash-consistent image is checked: when the superblock says
 * `needs_recovery` (an image of a filesystem that was mounted), the journal is replayed first with
 * `e2fsck -E journal_only` (the same replay the kernel does at mount); then `e2fsck -fn` must find
 * nothing to fix (exit 0). Throws with e2fsck's output otherwise.
 */
export async function checkExt4(device: string): Promise<FsckReport> {
  const header = await runOk(tool('dumpe2fs'), ['-h', device]);
  const features = /^Filesystem features:\s*(.*)$/m.exec(header.stdout)?.[1]?.split(/\s+/) ?? [];
  const replayedJournal = features.includes('needs_recovery');
  if (replayedJournal) {
    // Exit 1 means "errors corrected": the replay itself counts as a correction.
    const replay = await run(tool('e2fsck'), ['-E', 'journal_only', '-y', device], { timeoutMs: 60_000 });
    if (replay.code !== 0 && replay.code !== 1) throw new Error(`journal replay failed\n${describeResult(replay)}`);
  }
  const check = await run(tool('e2fsck'), ['-f', '-n', device], { timeoutMs: 60_000 });
  if (check.code !== 0) throw new Error(`e2fsck found problems\n${describeResult(check)}`);
  return { replayedJournal };
}

/** Byte ranges of the export and how the server reports them (`nbdinfo --map`, base:allocation). */
export interface MapExtent {
  offset: number;
  length: number;
  /** base:allocation flags: bit 0 hole, bit 1 zero. */
  type: number;
}

export async function allocationMap(uri: string): Promise<MapExtent[]> {
  const result = await runOk(tool('nbdinfo'), ['--map', '--json', uri]);
  return (JSON.parse(result.stdout) as MapExtent[]).map(({ offset, length, type }) => ({ offset, length, type }));
}

/** Bytes of [offset, offset+length) the map reports as allocated data (neither hole nor zero). */
export function dataBytesIn(map: readonly MapExtent[], offset: number, length: number): number {
  let total = 0;
  for (const extent of map) {
    if (extent.type !== 0) continue;
    const start = Math.max(offset, extent.offset);
    const end = Math.min(offset + length, extent.offset + extent.length);
    if (end > start) total += end - start;
  }
  return total;
}

/** The physical byte ranges a file occupies on its block device (`filefrag -e`, in fs blocks). */
export async function physicalExtents(path: string): Promise<{ offset: number; length: number }[]> {
  const result = await runOk(tool('filefrag'), ['-e', '-b1', path]);
  const extents: { offset: number; length: number }[] = [];
  // Rows: "   0:        0..   65535:    1081344..   1146879:  65536:  last,eof" (byte units with -b1).
  for (const match of result.stdout.matchAll(/^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+):/gm)) {
    extents.push({ offset: Number(match[1]), length: Number(match[3]) });
  }
  if (extents.length === 0) throw new Error(`no extents for ${path}\n${describeResult(result)}`);
  return extents;
}

/** sha256 of every regular file under `root` by relative path, skipping ext4's lost+found. */
export async function hashTree(root: string): Promise<Map<string, string>> {
  const hashes = new Map<string, string>();
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) {
        if (dir === root && entry.name === 'lost+found') continue;
        await walk(path);
      } else if (entry.isFile()) {
        hashes.set(relative(root, path), createHash('sha256').update(await readFile(path)).digest('hex'));
      } else {
        hashes.set(relative(root, path), `not a regular file`);
      }
    }
  };
  await walk(root);
  return hashes;
}
