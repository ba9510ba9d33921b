/**
 * The CSI Node service on real block devices: a real `clonebd serve`, a real `clonebd csi` on its
 * gRPC socket, and what a kubelet would ask of them. Volumes are attached with `clonebd
 * attach-file` + losetup (no nbd kernel module here), formatted, mounted, bind-mounted, cloned,
 * grown (online, while published) and torn down.
 *
 * What each test proves is in its name. After every test, nothing of it may be left: no mount
 * under its temp dir, no loop device over its files or devices, no file server serving them; the
 * afterEach hook removes whatever a failed test left, so one failure does not cascade.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { afterEach, describe, expect, it, type TestContext } from 'vitest';
import type { CsiMessage } from '../../src/csi/rpc.js';
import { CsiClient, expectStatus, status, type CsiReply } from '../helpers/csi-client.js';
import { CLI_PATH, startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { isCi, makeTempDir, removeTempDirs, requireTools, run, runOk } from '../helpers/tools.js';

const MiB = 2 ** 20;
const NODE_ID = 'node-a';
const TOOLS = ['fusermount3', 'losetup', 'mount', 'umount', 'blkid', 'blockdev', 'mkfs.ext4', 'e2fsck', 'resize2fs', 'dumpe2fs', 'sync'] as const;
const FS_CAPABILITY = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: 'ext4', mount_flags: [] } };
const BLOCK_CAPABILITY = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, block: {} };

function requireRoot(ctx: TestContext): void {
  if (process.getuid?.() === 0) return;
  const reason = 'needs root (losetup, mount, FUSE)';
  if (isCi()) throw new Error(`${reason} (CI=true: run the e2e tests as root)`);
  console.warn(`skipping "${ctx.task.name}": ${reason}`);
  ctx.skip(reason);
}

// ---- the driver under test: `clonebd csi` on its socket, reached with a gRPC client

interface Driver {
  /** Controller.CreateVolume; resolves with the response's volume. */
  createVolume(name: string, size: number, options?: { source?: string; block?: boolean }): Promise<CsiReply>;
  /** Controller.ControllerExpandVolume. */
  expandVolume(volumeId: string, size: number): Promise<void>;
  node(rpc: string, request: CsiMessage): Promise<CsiReply>;
  /** SIGKILLs the driver process, as a crash would, and starts a new one on the same state. */
  restart(): Promise<void>;
  stop(): Promise<void>;
}

interface DriverProcess {
  child: ChildProcess;
  client: CsiClient;
  exited: Promise<void>;
}

const STOP_TIMEOUT_MS = 10_000;
const liveDrivers = new Set<ChildProcess>();
// A worker that dies mid-test must not leave a driver behind.
process.on('exit', () => {
  for (const child of liveDrivers) child.kill('SIGKILL');
});

async function spawnDriver(socket: string, pool: string, stateDir: string): Promise<DriverProcess> {
  const args = [CLI_PATH, 'csi', '--endpoint', `unix://${socket}`, '--pool', pool, '--node-id', NODE_ID, '--max-volumes', '64'];
  const child = spawn(process.execPath, [...args, '--state-dir', stateDir], { stdio: ['ignore', 'pipe', 'pipe'] });
  liveDrivers.add(child);
  const chunks: Buffer[] = [];
  child.stdout!.on('data', (chunk: Buffer) => chunks.push(chunk));
  child.stderr!.on('data', (chunk: Buffer) => chunks.push(chunk));
  const output = (): string => Buffer.concat(chunks).toString('utf8');
  let ended = false;
  const exited = new Promise<void>((resolve) => {
    child.on('exit', () => {
      ended = true;
      liveDrivers.delete(child);
      resolve();
    });
    child.on('error', () => {
      ended = true;
      resolve();
    });
  });
  const client = new CsiClient(`unix://${socket}`);
  try {
    // Ready when it says so on stdout; an exit before that is a failure with its output.
    const deadline = Date.now() + 20_000;
    while (!/"msg":"listening"/.test(output())) {
      if (ended) throw new Error(`clonebd csi exited before listening:\n${output()}`);
      if (Date.now() > deadline) throw new Error(`clonebd csi did not listen within 20 s:\n${output()}`);
      await new Promise<void>((resolve) => {
        const wake = (): void => resolve();
        child.stdout!.once('data', wake);
        void exited.then(wake);
        setTimeout(wake, 1000);
      });
    }
    await client.waitForReady();
  } catch (error) {
    client.close();
    child.kill('SIGKILL');
    await exited;
    throw error;
  }
  return { child, client, exited };
}

/** Sends `signal`, and SIGKILL when the driver has not exited after a bounded wait. */
async function endDriver(driver: DriverProcess, signal: NodeJS.Signals): Promise<void> {
  driver.client.close();
  if (driver.child.exitCode !== null || driver.child.signalCode !== null) return;
  driver.child.kill(signal);
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([
    driver.exited.then(() => false),
    new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS);
    }),
  ]);
  clearTimeout(timer);
  if (timedOut) {
    driver.child.kill('SIGKILL');
    await driver.exited;
  }
}

async function grpcDriver(server: ServerProcess, root: string): Promise<Driver> {
  const socket = join(root, 'csi.sock');
  const stateDir = join(root, 'state');
  let running = await spawnDriver(socket, server.pool, stateDir);
  return {
    async createVolume(name, size, options = {}) {
      const capability = options.block === true ? BLOCK_CAPABILITY : FS_CAPABILITY;
      const response = await running.client.call('Controller', 'CreateVolume', {
        name,
        capacity_range: { required_bytes: size },
        volume_capabilities: [capability],
        ...(options.source === undefined ? {} : { volume_content_source: { volume: { volume_id: options.source } } }),
      });
      return response.volume as CsiReply;
    },
    async expandVolume(volumeId, size) {
      await running.client.call('Controller', 'ControllerExpandVolume', {
        volume_id: volumeId,
        capacity_range: { required_bytes: size },
        volume_capability: FS_CAPABILITY,
      });
    },
    node(rpc, request) {
      return running.client.call('Node', rpc, request);
    },
    async restart() {
      await endDriver(running, 'SIGKILL');
      running = await spawnDriver(socket, server.pool, stateDir);
    },
    async stop() {
      await endDriver(running, 'SIGTERM');
    },
  };
}

// ---- what the node looks like

interface Env {
  root: string;
  server: ServerProcess;
  driver: Driver;
  /** Block devices the test saw the driver use: a loop device over one of them is ours. */
  devices: Set<string>;
  /**
   * The backing files of the loop devices the driver made, as `major:minor:inode`: a loop device
   * is recognised by its backing file even after that file's FUSE mount went away (its path then
   * shows differently), never by its number, which the next attach anywhere reuses.
   */
  backings: Set<string>;
}

let current: (Omit<Env, 'driver'> & { driver: Driver | undefined }) | undefined;

async function startEnv(ctx: TestContext): Promise<Env> {
  requireRoot(ctx);
  requireTools(ctx, ...TOOLS);
  const root = await makeTempDir('clonebd-csi-node-');
  const server = await startServerProcess({ args: ['--no-default-volume'] });
  current = { root, server, driver: undefined, devices: new Set(), backings: new Set() };
  current.driver = await grpcDriver(server, root);
  return current as Env;
}

interface LoopEntry {
  name: string;
  backFile: string;
  /** `major:minor:inode` of the backing file. */
  backing: string;
}

async function loopDevices(): Promise<LoopEntry[]> {
  const result = await runOk('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN']);
  if (result.stdout.trim() === '') return [];
  const parsed = JSON.parse(result.stdout) as { loopdevices?: Record<string, string | null | undefined>[] };
  return (parsed.loopdevices ?? []).map((entry) => ({
    name: String(entry.name),
    backFile: (entry['back-file'] ?? '').replace(/ \(deleted\)$/, ''),
    backing: `${String(entry['back-maj:min'] ?? '').trim()}:${String(entry['back-ino'] ?? '').trim()}`,
  }));
}

function isOurs(env: Env, loop: LoopEntry): boolean {
  return loop.backFile.startsWith(`${env.root}/`) || env.devices.has(loop.backFile) || env.backings.has(loop.backing);
}

/** Notes a device the driver handed out, and what backs it if it is a loop device. */
async function noteDevice(env: Env, device: string): Promise<void> {
  env.devices.add(device);
  const loop = (await loopDevices()).find((entry) => entry.name === device);
  if (loop !== undefined && loop.backFile.startsWith(`${env.root}/`)) env.backings.add(loop.backing);
}

function unescapeMount(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

async function mountsUnder(root: string): Promise<string[]> {
  const table = await readFile('/proc/self/mountinfo', 'utf8');
  return table
    .split('\n')
    .map((line) => unescapeMount(line.split(' ')[4] ?? ''))
    .filter((path) => path === root || path.startsWith(`${root}/`));
}

/** File servers of this test: `clonebd attach-file` (or nbdfuse) serving a directory under `root`. */
async function fileServersUnder(root: string): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const args = (await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')).split('\0');
    const server = args.includes('attach-file') || args.some((arg) => arg.endsWith('nbdfuse'));
    if (server && args.some((arg) => arg.startsWith(`${root}/`))) pids.push(Number(name));
  }
  return pids;
}

/** The pid of the `clonebd attach-file` serving `volumeId`: the user-space route's file server. */
async function fileServerOf(env: Env, volumeId: string): Promise<number> {
  for (const pid of await fileServersUnder(env.root)) {
    const args = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (args.includes('attach-file') && args[args.indexOf('--export') + 1] === volumeId) return pid;
  }
  throw new Error(`no attach-file serves ${volumeId}`);
}

/** Everything of this test still on the node: mounts, loop devices, file server processes. */
async function leftovers(env: Env): Promise<string[]> {
  const found: string[] = [];
  for (const path of await mountsUnder(env.root)) found.push(`mount ${path}`);
  for (const loop of await loopDevices()) {
    if (isOurs(env, loop)) found.push(`loop ${loop.name} over ${loop.backFile}`);
  }
  for (const pid of await fileServersUnder(env.root)) found.push(`file server pid ${pid}`);
  return found;
}

/** The last resort after a failed test: lazy unmounts, loop detaches (top-down), kills. */
async function forceCleanup(env: Env): Promise<void> {
  const mounts = (await mountsUnder(env.root)).sort((a, b) => b.length - a.length);
  const fuse = new Set(mounts.filter((path) => path.startsWith(join(env.root, 'state'))));
  for (const path of mounts.filter((candidate) => !fuse.has(candidate))) await run('umount', ['-l', path]);
  // Loop devices over loop devices (read-only publications) go before those they sit on.
  for (let round = 0; round < 3; round++) {
    for (const loop of await loopDevices()) if (isOurs(env, loop)) await run('losetup', ['-d', loop.name]);
  }
  for (const path of fuse) await run('fusermount3', ['-u', '-z', path]);
  for (const pid of await fileServersUnder(env.root)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
}

afterEach(async () => {
  const env = current;
  current = undefined;
  try {
    await env?.driver?.stop();
    if (env !== undefined) {
      const left = await leftovers(env as Env);
      if (left.length > 0) await forceCleanup(env as Env);
    }
  } finally {
    await stopAllServerProcesses();
    await removeTempDirs();
  }
});

/** The block device behind a mounted directory or a device file, as /dev/NAME. */
async function deviceOf(path: string): Promise<string> {
  const info = await stat(path, { bigint: true });
  const dev = info.isBlockDevice() ? info.rdev : info.dev;
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  const uevent = await readFile(`/sys/dev/block/${major}:${minor}/uevent`, 'utf8');
  const name = /^DEVNAME=(.*)$/m.exec(uevent)?.[1];
  if (name === undefined) throw new Error(`no DEVNAME for ${path}`);
  return `/dev/${name}`;
}

async function blockDeviceSize(device: string): Promise<number> {
  return Number((await runOk('blockdev', ['--getsize64', device])).stdout.trim());
}

const CAP_SYS_RESOURCE = 24;

/** Whether this process (and so the driver it starts) holds capability `bit`. */
async function hasCapability(bit: number): Promise<boolean> {
  const mask = /^CapEff:\s*([0-9a-f]+)$/m.exec(await readFile('/proc/self/status', 'utf8'))?.[1] ?? '0';
  return ((BigInt(`0x${mask}`) >> BigInt(bit)) & 1n) === 1n;
}

// ---- kubelet's side

async function createVolume(env: Env, name: string, size: number, options: { source?: string; block?: boolean } = {}): Promise<string> {
  const volume = await env.driver.createVolume(name, size, options);
  expect(typeof volume.volume_id).toBe('string');
  return String(volume.volume_id);
}

interface Staged {
  volumeId: string;
  staging: string;
}

async function stage(env: Env, volumeId: string, capability: object = FS_CAPABILITY): Promise<Staged> {
  const staging = join(env.root, 'staging', volumeId);
  await mkdir(staging, { recursive: true });
  await env.driver.node('NodeStageVolume', { volume_id: volumeId, staging_target_path: staging, volume_capability: capability });
  if ('mount' in capability) await noteDevice(env, await deviceOf(staging));
  return { volumeId, staging };
}

async function publish(env: Env, staged: Staged, name: string, options: { readonly?: boolean; capability?: object } = {}): Promise<string> {
  const parent = join(env.root, 'pods', name);
  await mkdir(parent, { recursive: true });
  const target = join(parent, 'volume');
  await env.driver.node('NodePublishVolume', {
    volume_id: staged.volumeId,
    staging_target_path: staged.staging,
    target_path: target,
    volume_capability: options.capability ?? FS_CAPABILITY,
    readonly: options.readonly === true,
  });
  await noteDevice(env, await deviceOf(target));
  return target;
}

async function unpublish(env: Env, volumeId: string, target: string): Promise<void> {
  await env.driver.node('NodeUnpublishVolume', { volume_id: volumeId, target_path: target });
}

async function unstage(env: Env, staged: Staged): Promise<void> {
  await env.driver.node('NodeUnstageVolume', { volume_id: staged.volumeId, staging_target_path: staged.staging });
}

type Tree = Map<string, string>;

async function writeTree(root: string, files: [string, number][]): Promise<void> {
  for (const [path, size] of files) {
    await mkdir(join(root, path, '..'), { recursive: true });
    await writeFile(join(root, path), randomBytes(size));
  }
  // Flush through the loop device and the file server to the server before anything clones it.
  await runOk('sync', ['-f', root]);
}

async function hashTree(root: string): Promise<Tree> {
  const tree: Tree = new Map();
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) {
        if (dir === root && entry.name === 'lost+found') continue;
        await walk(path);
      } else {
        tree.set(path.slice(root.length + 1), createHash('sha256').update(await readFile(path)).digest('hex'));
      }
    }
  };
  await walk(root);
  return tree;
}

async function expectCode(promise: Promise<unknown>, code: number): Promise<void> {
  await expect(promise).rejects.toMatchObject({ code });
}

interface Usage {
  unit: string;
  total: number;
  available?: number;
  used?: number;
}

async function usage(env: Env, volumeId: string, path: string, unit: string): Promise<Usage> {
  const response = await env.driver.node('NodeGetVolumeStats', { volume_id: volumeId, volume_path: path });
  const entry = (response.usage as Usage[]).find((candidate) => candidate.unit === unit);
  if (entry === undefined) throw new Error(`no ${unit} usage in ${JSON.stringify(response)}`);
  return entry;
}

describe('CSI node service', () => {
  it('stages and publishes a filesystem volume and its clone; the clone has the same files, then both change independently; nothing is left after unstaging', async (ctx) => {
    const env = await startEnv(ctx);
    const source = await createVolume(env, 'pv-source', 64 * MiB);
    const stagedSource = await stage(env, source);
    const sourceTarget = await publish(env, stagedSource, 'pod-source');
    await writeTree(sourceTarget, [
      ['a.txt', 4095],
      ['dir/b.bin', 300 * 1024],
      ['dir/deeper/c.bin', 2 * MiB],
    ]);
    const before = await hashTree(sourceTarget);

    // Cloned while the source stays mounted and published, as Kubernetes does.
    const clone = await createVolume(env, 'pv-clone', 64 * MiB, { source });
    const stagedClone = await stage(env, clone);
    const cloneTarget = await publish(env, stagedClone, 'pod-clone');
    expect(await hashTree(cloneTarget)).toEqual(before);
    expect(await deviceOf(cloneTarget)).not.toBe(await deviceOf(sourceTarget));

    await writeFile(join(sourceTarget, 'a.txt'), 'source only');
    await writeFile(join(cloneTarget, 'clone-only.txt'), 'clone only');
    await writeFile(join(cloneTarget, 'dir/b.bin'), 'clone overwrote this');
    const sourceAfter = await hashTree(sourceTarget);
    const cloneAfter = await hashTree(cloneTarget);

    // Detached and attached again, each shows what reached the server, not a page cache.
    await unpublish(env, source, sourceTarget);
    await unstage(env, stagedSource);
    await unpublish(env, clone, cloneTarget);
    await unstage(env, stagedClone);
    expect(await leftovers(env)).toEqual([]);

    const restagedSource = await stage(env, source);
    const restagedClone = await stage(env, clone);
    expect(await hashTree(restagedSource.staging)).toEqual(sourceAfter);
    expect(await hashTree(restagedClone.staging)).toEqual(cloneAfter);
    expect(sourceAfter.get('a.txt')).not.toBe(before.get('a.txt'));
    expect(sourceAfter.has('clone-only.txt')).toBe(false);
    expect(cloneAfter.get('a.txt')).toBe(before.get('a.txt'));
    expect(cloneAfter.get('dir/deeper/c.bin')).toBe(before.get('dir/deeper/c.bin'));

    await unstage(env, restagedSource);
    await unstage(env, restagedClone);
    expect(await leftovers(env)).toEqual([]);
  });

  it('unpublish and unstage are idempotent, also for what was never staged or published', async (ctx) => {
    const env = await startEnv(ctx);
    const volumeId = await createVolume(env, 'pv-idem', 64 * MiB);
    const staged = await stage(env, volumeId);
    // A repeated stage of an intact volume is answered without a second attach.
    await env.driver.node('NodeStageVolume', { volume_id: volumeId, staging_target_path: staged.staging, volume_capability: FS_CAPABILITY });
    const target = await publish(env, staged, 'pod');
    await publish(env, staged, 'pod');
    expect(await mountsUnder(target)).toHaveLength(1);

    await unpublish(env, volumeId, target);
    await unpublish(env, volumeId, target);
    await unstage(env, staged);
    await unstage(env, staged);
    expect(await leftovers(env)).toEqual([]);

    await unpublish(env, 'never-published', join(env.root, 'nowhere'));
    await env.driver.node('NodeUnstageVolume', { volume_id: 'never-staged', staging_target_path: join(env.root, 'nowhere') });
    await env.driver.node('NodeUnstageVolume', { volume_id: '../../etc', staging_target_path: join(env.root, 'nowhere') });
  });

  it('publishes a block volume as a device file; a read-only publication refuses writes, for block and filesystem volumes', async (ctx) => {
    const env = await startEnv(ctx);
    const volumeId = await createVolume(env, 'pv-block', 16 * MiB, { block: true });
    const staged = await stage(env, volumeId, BLOCK_CAPABILITY);
    const target = await publish(env, staged, 'pod-rw', { capability: BLOCK_CAPABILITY });
    expect((await stat(target)).isBlockDevice()).toBe(true);
    const data = randomBytes(64 * 1024);
    const device = await open(target, 'r+');
    try {
      await device.write(data, 0, data.length, 4096);
      await device.sync();
    } finally {
      await device.close();
    }
    expect((await usage(env, volumeId, target, 'BYTES')).total).toBe(16 * MiB);

    const readonlyTarget = await publish(env, staged, 'pod-ro', { capability: BLOCK_CAPABILITY, readonly: true });
    // Linux may open a read-only block device for writing and refuse the write itself.
    const refused = /^(EROFS|EACCES|EPERM)$/;
    const forWriting = await open(readonlyTarget, 'r+').catch((error: NodeJS.ErrnoException) => {
      expect(error.code).toMatch(refused);
      return undefined;
    });
    if (forWriting !== undefined) {
      try {
        await expect(forWriting.write(Buffer.alloc(4096, 1), 0, 4096, 0)).rejects.toMatchObject({ code: expect.stringMatching(refused) });
      } finally {
        await forWriting.close();
      }
    }
    const readonlyDevice = await open(readonlyTarget, 'r');
    try {
      const back = Buffer.alloc(data.length);
      await readonlyDevice.read(back, 0, back.length, 4096);
      expect(back.equals(data)).toBe(true);
    } finally {
      await readonlyDevice.close();
    }
    await unpublish(env, volumeId, readonlyTarget);
    await unpublish(env, volumeId, target);
    await unstage(env, staged);

    const fsVolume = await createVolume(env, 'pv-ro-fs', 64 * MiB);
    const fsStaged = await stage(env, fsVolume);
    const writable = await publish(env, fsStaged, 'pod-writer');
    await writeFile(join(writable, 'hello.txt'), 'hello');
    const readonly = await publish(env, fsStaged, 'pod-reader', { readonly: true });
    expect(await readFile(join(readonly, 'hello.txt'), 'utf8')).toBe('hello');
    await expect(writeFile(join(readonly, 'other.txt'), 'no')).rejects.toMatchObject({ code: 'EROFS' });
    // A publication that asks for the other mode on a published target is refused.
    await expectCode(publish(env, fsStaged, 'pod-reader'), status.ALREADY_EXISTS);
    await unpublish(env, fsVolume, readonly);
    await unpublish(env, fsVolume, writable);
    await unstage(env, fsStaged);
    expect(await leftovers(env)).toEqual([]);
  });

  it('reports filesystem stats, and NodeExpandVolume grows a published ext4 volume in place, its device online', async (ctx) => {
    const env = await startEnv(ctx);
    const volumeId = await createVolume(env, 'pv-grow', 64 * MiB);
    const staged = await stage(env, volumeId);
    const target = await publish(env, staged, 'pod');
    await writeTree(target, [['kept.bin', 3 * MiB]]);
    const files = await hashTree(target);
    const bytes = await usage(env, volumeId, target, 'BYTES');
    expect(bytes.total).toBeGreaterThan(50 * MiB);
    expect(bytes.total).toBeLessThanOrEqual(64 * MiB);
    expect(bytes.used).toBeGreaterThanOrEqual(3 * MiB);
    const inodes = await usage(env, volumeId, target, 'INODES');
    expect(inodes.used).toBeGreaterThanOrEqual(2);
    await expectCode(env.driver.node('NodeGetVolumeStats', { volume_id: volumeId, volume_path: join(env.root, 'elsewhere') }), status.NOT_FOUND);

    const device = await deviceOf(target);
    const fileServer = await fileServerOf(env, volumeId);
    await env.driver.expandVolume(volumeId, 128 * MiB);
    const online = env.driver.node('NodeExpandVolume', { volume_id: volumeId, volume_path: target, capacity_range: { required_bytes: 128 * MiB } });
    let again = target;
    if (await hasCapability(CAP_SYS_RESOURCE)) {
      expect((await online).capacity_bytes).toBe(128 * MiB);
    } else {
      // The device grows while published; resize2fs grows a mounted ext4 only with
      // CAP_SYS_RESOURCE, so a driver without it says so, and grows the filesystem once unpublished.
      const refused = await expectStatus(online, status.FAILED_PRECONDITION);
      expect(refused.details).toMatch(/CAP_SYS_RESOURCE/);
      expect(await blockDeviceSize(device)).toBe(128 * MiB);
      expect(await hashTree(target)).toEqual(files);
      await unpublish(env, volumeId, target);
      const expanded = await env.driver.node('NodeExpandVolume', {
        volume_id: volumeId,
        volume_path: staged.staging,
        staging_target_path: staged.staging,
        capacity_range: { required_bytes: 128 * MiB },
      });
      expect(expanded.capacity_bytes).toBe(128 * MiB);
      again = await publish(env, staged, 'pod');
    }
    // Grown in place: the same device and file server all along, never detached and attached again.
    expect(await deviceOf(again)).toBe(device);
    expect(await fileServerOf(env, volumeId)).toBe(fileServer);
    expect((await usage(env, volumeId, again, 'BYTES')).total).toBeGreaterThan(110 * MiB);
    expect(await hashTree(again)).toEqual(files);

    // Grown while unstaged: the next stage brings the filesystem up at the new size.
    await unpublish(env, volumeId, again);
    await unstage(env, staged);
    await env.driver.expandVolume(volumeId, 192 * MiB);
    const restaged = await stage(env, volumeId);
    expect((await usage(env, volumeId, restaged.staging, 'BYTES')).total).toBeGreaterThan(170 * MiB);
    expect(await hashTree(restaged.staging)).toEqual(files);

    // Node-only expansion (no ControllerExpandVolume): the node grows the daemon's volume itself.
    const nodeOnly = await env.driver.node('NodeExpandVolume', {
      volume_id: volumeId,
      volume_path: restaged.staging,
      capacity_range: { required_bytes: 224 * MiB },
    });
    expect(nodeOnly.capacity_bytes).toBe(224 * MiB);
    expect((await usage(env, volumeId, restaged.staging, 'BYTES')).total).toBeGreaterThan(200 * MiB);
    expect(await hashTree(restaged.staging)).toEqual(files);
    await unstage(env, restaged);

    // A clone made larger than its source gets its filesystem grown at stage.
    const clone = await createVolume(env, 'pv-grow-clone', 288 * MiB, { source: volumeId });
    const stagedClone = await stage(env, clone);
    expect((await usage(env, clone, stagedClone.staging, 'BYTES')).total).toBeGreaterThan(260 * MiB);
    expect(await hashTree(stagedClone.staging)).toEqual(files);
    await unstage(env, stagedClone);
    expect(await leftovers(env)).toEqual([]);
  });

  it('NodeExpandVolume grows a published XFS filesystem and a published block volume online, read-only publication included', async (ctx) => {
    const env = await startEnv(ctx);
    requireTools(ctx, 'mkfs.xfs', 'xfs_growfs');
    const xfs = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: 'xfs', mount_flags: [] } };
    // mkfs.xfs wants at least 300 MiB.
    const volumeId = await createVolume(env, 'pv-xfs-grow', 320 * MiB);
    const staged = await stage(env, volumeId, xfs);
    const target = await publish(env, staged, 'pod-xfs', { capability: xfs });
    await writeTree(target, [['x.bin', 2 * MiB], ['dir/y.bin', 100 * 1024]]);
    const files = await hashTree(target);
    const device = await deviceOf(target);
    const fileServer = await fileServerOf(env, volumeId);
    const before = (await usage(env, volumeId, target, 'BYTES')).total;
    await env.driver.expandVolume(volumeId, 448 * MiB);
    const expanded = await env.driver.node('NodeExpandVolume', {
      volume_id: volumeId,
      volume_path: target,
      volume_capability: xfs,
      capacity_range: { required_bytes: 448 * MiB },
    });
    expect(expanded.capacity_bytes).toBe(448 * MiB);
    expect(await deviceOf(target)).toBe(device);
    expect(await fileServerOf(env, volumeId)).toBe(fileServer);
    expect((await usage(env, volumeId, target, 'BYTES')).total).toBe(before + 128 * MiB);
    expect(await hashTree(target)).toEqual(files);
    await writeTree(target, [['after.bin', 1 * MiB]]);
    const grownFiles = await hashTree(target);
    // Attached afresh, the volume shows what reached the server.
    await unpublish(env, volumeId, target);
    await unstage(env, staged);
    const restaged = await stage(env, volumeId, xfs);
    expect(await hashTree(restaged.staging)).toEqual(grownFiles);
    await unstage(env, restaged);

    const blockId = await createVolume(env, 'pv-block-grow', 16 * MiB, { block: true });
    const blockStaged = await stage(env, blockId, BLOCK_CAPABILITY);
    const writable = await publish(env, blockStaged, 'pod-rw', { capability: BLOCK_CAPABILITY });
    const readonly = await publish(env, blockStaged, 'pod-ro', { capability: BLOCK_CAPABILITY, readonly: true });
    const early = randomBytes(64 * 1024);
    const late = randomBytes(64 * 1024);
    const writeAt = async (data: Buffer, offset: number): Promise<void> => {
      const handle = await open(writable, 'r+');
      try {
        await handle.write(data, 0, data.length, offset);
        await handle.sync();
      } finally {
        await handle.close();
      }
    };
    const readAt = async (path: string, offset: number, length: number): Promise<Buffer> => {
      await runOk('blockdev', ['--flushbufs', path]);
      const handle = await open(path, 'r');
      try {
        const data = Buffer.alloc(length);
        await handle.read(data, 0, length, offset);
        return data;
      } finally {
        await handle.close();
      }
    };
    await writeAt(early, 4096);
    await env.driver.expandVolume(blockId, 32 * MiB);
    const grownBlock = await env.driver.node('NodeExpandVolume', {
      volume_id: blockId,
      volume_path: writable,
      volume_capability: BLOCK_CAPABILITY,
      capacity_range: { required_bytes: 32 * MiB },
    });
    expect(grownBlock.capacity_bytes).toBe(32 * MiB);
    expect(await blockDeviceSize(writable)).toBe(32 * MiB);
    expect(await blockDeviceSize(readonly)).toBe(32 * MiB);
    expect((await usage(env, blockId, readonly, 'BYTES')).total).toBe(32 * MiB);
    await writeAt(late, 24 * MiB);
    expect((await readAt(readonly, 4096, early.length)).equals(early)).toBe(true);
    expect((await readAt(readonly, 24 * MiB, late.length)).equals(late)).toBe(true);
    await unpublish(env, blockId, readonly);
    await unpublish(env, blockId, writable);
    await unstage(env, blockStaged);
    expect(await leftovers(env)).toEqual([]);
  });

  it('a restarted driver finds what the earlier one staged: the volume stays usable, grows online and unstages cleanly', async (ctx) => {
    const env = await startEnv(ctx);
    const volumeId = await createVolume(env, 'pv-restart', 64 * MiB);
    const staged = await stage(env, volumeId);
    const target = await publish(env, staged, 'pod');
    await writeTree(target, [['before.bin', 100 * 1024]]);
    const fileServer = await fileServerOf(env, volumeId);

    await env.driver.restart();
    // The file server outlived the driver: the mounted filesystem still reads and writes.
    expect(await fileServerOf(env, volumeId)).toBe(fileServer);
    await writeTree(target, [['after.bin', 100 * 1024]]);
    expect([...(await hashTree(target)).keys()].sort()).toEqual(['after.bin', 'before.bin']);
    await env.driver.node('NodeStageVolume', { volume_id: volumeId, staging_target_path: staged.staging, volume_capability: FS_CAPABILITY });
    expect(await mountsUnder(staged.staging)).toHaveLength(1);

    // The new driver finds the file server from its record and /proc, and grows the device it serves.
    await env.driver.expandVolume(volumeId, 96 * MiB);
    const expand = env.driver.node('NodeExpandVolume', { volume_id: volumeId, volume_path: target, capacity_range: { required_bytes: 96 * MiB } });
    if (await hasCapability(CAP_SYS_RESOURCE)) await expand;
    else await expectStatus(expand, status.FAILED_PRECONDITION);
    expect(await blockDeviceSize(await deviceOf(target))).toBe(96 * MiB);
    expect(await fileServerOf(env, volumeId)).toBe(fileServer);

    await unpublish(env, volumeId, target);
    await unstage(env, staged);
    expect(await leftovers(env)).toEqual([]);
  });

  it('serialises concurrent calls for one volume: five parallel stages attach it once', async (ctx) => {
    const env = await startEnv(ctx);
    const volumeId = await createVolume(env, 'pv-race', 64 * MiB);
    const staging = join(env.root, 'staging', volumeId);
    await mkdir(staging, { recursive: true });
    const request = { volume_id: volumeId, staging_target_path: staging, volume_capability: FS_CAPABILITY };
    await Promise.all(Array.from({ length: 5 }, () => env.driver.node('NodeStageVolume', request)));
    expect(await mountsUnder(staging)).toHaveLength(1);
    expect((await loopDevices()).filter((loop) => loop.backFile.startsWith(`${env.root}/`))).toHaveLength(1);
    await noteDevice(env, await deviceOf(staging));
    await Promise.all(Array.from({ length: 3 }, () => unstage(env, { volumeId, staging })));
    expect(await leftovers(env)).toEqual([]);
  });

  it('answers NodeGetInfo and NodeGetCapabilities, and refuses bad requests with the spec codes', async (ctx) => {
    const env = await startEnv(ctx);
    const info = await env.driver.node('NodeGetInfo', {});
    expect(info.node_id).toBe(NODE_ID);
    expect(info.max_volumes_per_node).toBe(64);
    // The node reports the very topology its volumes are created with, so pods follow their volumes.
    const volume = await env.driver.createVolume('pv-topology', 64 * MiB);
    expect(volume.accessible_topology).toEqual([info.accessible_topology]);
    expect(Object.values((info.accessible_topology as { segments: Record<string, string> }).segments)).toEqual([NODE_ID]);
    const capabilities = await env.driver.node('NodeGetCapabilities', {});
    const types = (capabilities.capabilities as { rpc: { type: string } }[]).map((capability) => capability.rpc.type).sort();
    expect(types).toEqual(['EXPAND_VOLUME', 'GET_VOLUME_STATS', 'STAGE_UNSTAGE_VOLUME']);

    const volumeId = await createVolume(env, 'pv-bad', 64 * MiB);
    const staging = join(env.root, 'staging', 'bad');
    await mkdir(staging, { recursive: true });
    const good = { volume_id: volumeId, staging_target_path: staging, volume_capability: FS_CAPABILITY };
    const stageWith = (change: CsiMessage): Promise<CsiMessage> => env.driver.node('NodeStageVolume', { ...good, ...change });
    await expectCode(stageWith({ volume_id: '' }), status.INVALID_ARGUMENT);
    await expectCode(stageWith({ staging_target_path: '' }), status.INVALID_ARGUMENT);
    await expectCode(stageWith({ staging_target_path: 'relative/path' }), status.INVALID_ARGUMENT);
    await expectCode(stageWith({ staging_target_path: `${staging}\0x` }), status.INVALID_ARGUMENT);
    await expectCode(stageWith({ volume_capability: undefined }), status.INVALID_ARGUMENT);
    await expectCode(stageWith({ volume_capability: { access_mode: { mode: 'SINGLE_NODE_WRITER' } } }), status.INVALID_ARGUMENT);
    await expectCode(
      stageWith({ volume_capability: { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: 'btrfs', mount_flags: [] } } }),
      status.INVALID_ARGUMENT,
    );
    await expectCode(stageWith({ volume_id: 'no-such-volume' }), status.NOT_FOUND);
    await expectCode(
      env.driver.node('NodePublishVolume', {
        volume_id: volumeId,
        staging_target_path: staging,
        target_path: join(env.root, 'target'),
        volume_capability: FS_CAPABILITY,
      }),
      status.FAILED_PRECONDITION,
    );
    await expectCode(env.driver.node('NodeUnpublishVolume', { volume_id: volumeId }), status.INVALID_ARGUMENT);
    await expectCode(env.driver.node('NodeGetVolumeStats', { volume_id: volumeId, volume_path: staging }), status.NOT_FOUND);
    expect(await leftovers(env)).toEqual([]);
  });

  it('formats an XFS volume; its clone mounts beside it despite the shared filesystem UUID', async (ctx) => {
    const env = await startEnv(ctx);
    requireTools(ctx, 'mkfs.xfs', 'xfs_growfs');
    const xfs = { access_mode: { mode: 'SINGLE_NODE_WRITER' }, mount: { fs_type: 'xfs', mount_flags: ['noatime'] } };
    // mkfs.xfs wants at least 300 MiB.
    const volumeId = await createVolume(env, 'pv-xfs', 320 * MiB);
    const staged = await stage(env, volumeId, xfs);
    const target = await publish(env, staged, 'pod-xfs', { capability: xfs });
    await writeTree(target, [['x.bin', 256 * 1024]]);
    const files = await hashTree(target);
    const sourceTotal = (await usage(env, volumeId, target, 'BYTES')).total;
    const clone = await createVolume(env, 'pv-xfs-clone', 384 * MiB, { source: volumeId });
    const stagedClone = await stage(env, clone, xfs);
    expect(await hashTree(stagedClone.staging)).toEqual(files);
    // Larger than its source, the clone's filesystem is grown at stage (statfs leaves out the log).
    expect((await usage(env, clone, stagedClone.staging, 'BYTES')).total).toBe(sourceTotal + 64 * MiB);
    const mountOptions = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').find((line) => line.split(' ')[4] === staged.staging);
    expect(mountOptions).toMatch(/noatime/);
    await unstage(env, stagedClone);
    await unpublish(env, volumeId, target);
    await unstage(env, staged);
    expect(await leftovers(env)).toEqual([]);
  });
});
