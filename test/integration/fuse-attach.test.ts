/**
 * `clonebd attach-file` against a real `clonebd serve` and the real kernel: the export served as a
 * FUSE file, a loop device over it, ext4 on that, and the volume grown underneath while everything
 * stays attached. Needs root (mount, losetup); the argument checks do not.
 *
 * Every test leaves nothing behind: afterEach unwinds what a failed test left (filesystem mounts,
 * loop devices over our file, the FUSE mount, the file server), and each test checks itself that
 * its teardown left no mount, loop device or process.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, stat, statfs, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, type TestContext } from 'vitest';
import { AdminClient } from '../../src/control/admin-client.js';
import { allocationMap, checkExt4, dataBytesIn, hashTree, makeExt4, pollUntil } from '../helpers/block-device.js';
import { spawnCli, type CliProcess } from '../helpers/cli-process.js';
import { CLI_PATH, startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { describeResult, isCi, makeTempDir, removeTempDirs, requireTools, run, runOk } from '../helpers/tools.js';

const MiB = 2 ** 20;
const TOOLS = ['mount', 'umount', 'losetup', 'blockdev', 'mkfs.ext4', 'e2fsck', 'dumpe2fs', 'resize2fs', 'fstrim', 'nbdinfo', 'sync'] as const;
const THREADS = { UV_THREADPOOL_SIZE: '8' };
const CAP_SYS_RESOURCE = 24;

function requireRoot(ctx: TestContext): void {
  if (process.getuid?.() === 0) return;
  const reason = 'needs root (mount, losetup)';
  if (isCi()) throw new Error(`${reason} (CI=true: run the integration tests as root)`);
  console.warn(`skipping "${ctx.task.name}": ${reason}`);
  ctx.skip(reason);
}

async function hasCapability(bit: number): Promise<boolean> {
  const mask = /^CapEff:\s*([0-9a-f]+)$/m.exec(await readFile('/proc/self/status', 'utf8'))?.[1] ?? '0';
  return ((BigInt(`0x${mask}`) >> BigInt(bit)) & 1n) === 1n;
}

function unescapeMount(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

async function mounts(): Promise<{ path: string; fsType: string }[]> {
  const table = await readFile('/proc/self/mountinfo', 'utf8');
  return table
    .split('\n')
    .filter((line) => line.includes(' - '))
    .map((line) => ({ path: unescapeMount(line.split(' ')[4] ?? ''), fsType: line.split(' - ')[1]!.split(' ')[0]! }));
}

async function mountsUnder(root: string): Promise<string[]> {
  return (await mounts()).map((entry) => entry.path).filter((path) => path === root || path.startsWith(`${root}/`));
}

async function loopsOver(root: string): Promise<string[]> {
  const result = await runOk('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE']);
  if (result.stdout.trim() === '') return [];
  const parsed = JSON.parse(result.stdout) as { loopdevices?: { name: string; 'back-file'?: string | null }[] };
  return (parsed.loopdevices ?? []).filter((entry) => (entry['back-file'] ?? '').startsWith(`${root}/`)).map((entry) => entry.name);
}

async function deviceSize(device: string): Promise<number> {
  return Number((await runOk('blockdev', ['--getsize64', device])).stdout.trim());
}

interface Env {
  root: string;
  server: ServerProcess;
  admin: AdminClient;
  servers: CliProcess[];
}

let current: Env | undefined;

afterEach(async () => {
  const env = current;
  current = undefined;
  try {
    if (env !== undefined) {
      // Top-down: filesystems, loop devices, then the FUSE mounts (which ends the file servers).
      for (const path of (await mountsUnder(env.root)).filter((path) => !path.endsWith('/fuse')).reverse()) await run('umount', ['-l', path]);
      for (const loop of await loopsOver(env.root)) await run('losetup', ['-d', loop]);
      for (const path of await mountsUnder(env.root)) await run('umount', ['-l', path]);
      await Promise.all(env.servers.map((server) => server.stop()));
    }
  } finally {
    await stopAllServerProcesses();
    await removeTempDirs();
  }
});

async function startEnv(ctx: TestContext, volumeSize: number): Promise<Env> {
  requireRoot(ctx);
  requireTools(ctx, ...TOOLS);
  const root = await makeTempDir('clonebd-attach-file-');
  const server = await startServerProcess({ args: ['--no-default-volume'] });
  const admin = new AdminClient(join(server.pool, 'admin.sock'));
  await admin.createVolume('vol', volumeSize);
  current = { root, server, admin, servers: [] };
  return current;
}

/** Starts `clonebd attach-file` on ROOT/fuse and waits until it serves the file. */
async function attach(env: Env): Promise<{ fileServer: CliProcess; file: string; fuseDir: string }> {
  const fuseDir = join(env.root, 'fuse');
  await mkdir(fuseDir, { recursive: true });
  const args = ['attach-file', '--socket', join(env.server.pool, 'nbd.sock'), '--export', 'vol', '--mountpoint', fuseDir];
  const fileServer = spawnCli(args, { label: 'attach-file', env: { ...process.env, ...THREADS }, cleanup: async () => undefined });
  env.servers.push(fileServer);
  const serving = await fileServer.waitForLog((line) => line.msg === 'serving', 20_000);
  expect(serving.file).toBe(join(fuseDir, 'disk'));
  return { fileServer, file: join(fuseDir, 'disk'), fuseDir };
}

/** Everything of the test still on the machine. */
async function leftovers(env: Env): Promise<string[]> {
  const found = [...(await mountsUnder(env.root)).map((path) => `mount ${path}`), ...(await loopsOver(env.root)).map((loop) => `loop ${loop}`)];
  for (const server of env.servers) {
    if (server.child.exitCode === null && server.child.signalCode === null) found.push(`attach-file pid ${server.pid}`);
  }
  return found;
}

async function attachFile(args: string[], env: NodeJS.ProcessEnv = { ...process.env, ...THREADS }) {
  return run(process.execPath, [CLI_PATH, 'attach-file', ...args], { env });
}

describe('clonebd attach-file', () => {
  it('refuses bad arguments with a clear message and a non-zero exit', async () => {
    const dir = await makeTempDir('clonebd-attach-args-');
    const cases: [string[], RegExp][] = [
      [['--socket', '/nowhere/nbd.sock', '--export', 'vol'], /Missing required argument: mountpoint/],
      [['--mountpoint', dir], /exactly one of --socket PATH and --uri URI/],
      [['--mountpoint', dir, '--socket', '/x', '--export', 'vol', '--uri', 'nbd://127.0.0.1/vol'], /exactly one of --socket PATH and --uri URI/],
      [['--mountpoint', dir, '--socket', '/x'], /--socket needs --export NAME/],
      [['--mountpoint', dir, '--uri', 'http://127.0.0.1/vol'], /unsupported NBD URI scheme/],
      [['--mountpoint', dir, '--uri', 'nbd://127.0.0.1/a', '--export', 'b'], /differs from the export the URI names/],
      [['--mountpoint', dir, '--uri', 'nbd://127.0.0.1/a', '--readers', '0'], /--readers must be a whole number/],
      [['--mountpoint', dir, '--uri', 'nbd://127.0.0.1/a', '--readers', '7'], /--readers 7 needs UV_THREADPOOL_SIZE=9 or more \(it is 8\)/],
    ];
    for (const [args, message] of cases) {
      const result = await attachFile(args);
      expect(result.code, describeResult(result)).not.toBe(0);
      expect(result.stderr, describeResult(result)).toMatch(message);
    }
    const noThreads = await attachFile(['--mountpoint', dir, '--uri', 'nbd://127.0.0.1/a'], { ...process.env, UV_THREADPOOL_SIZE: '2' });
    expect(noThreads.code).not.toBe(0);
    expect(noThreads.stderr).toMatch(/UV_THREADPOOL_SIZE=2 leaves no thread to read \/dev\/fuse/);
  });

  it('fails cleanly on a missing mount point or an export it cannot reach, mounting nothing', async (ctx) => {
    const env = await startEnv(ctx, 16 * MiB);
    const fuseDir = join(env.root, 'fuse');
    await mkdir(fuseDir);
    const socket = join(env.server.pool, 'nbd.sock');
    const missing = await attachFile(['--socket', socket, '--export', 'vol', '--mountpoint', join(env.root, 'absent')]);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/--mountpoint .*absent/);
    const noExport = await attachFile(['--socket', socket, '--export', 'no-such-volume', '--mountpoint', fuseDir]);
    expect(noExport.code).not.toBe(0);
    expect(noExport.stderr).toMatch(/cannot serve no-such-volume/);
    const noServer = await attachFile(['--socket', join(env.root, 'no.sock'), '--export', 'vol', '--mountpoint', fuseDir]);
    expect(noServer.code).not.toBe(0);
    expect(noServer.stderr).toMatch(/cannot serve vol/);
    expect(await leftovers(env)).toEqual([]);
  });

  it('serves a volume as a file under ext4 on a loop device; the volume grows online and the files stay intact', async (ctx) => {
    const env = await startEnv(ctx, 64 * MiB);
    const { fileServer, file, fuseDir } = await attach(env);
    expect((await stat(file)).size).toBe(64 * MiB);
    expect((await mounts()).find((entry) => entry.path === fuseDir)?.fsType).toBe('fuse.clonebd');

    // Loop devices are set up as they are today: buffered, no --direct-io.
    const loop = (await runOk('losetup', ['--find', '--show', file])).stdout.trim();
    expect(await deviceSize(loop)).toBe(64 * MiB);
    await makeExt4(loop);
    const fsDir = join(env.root, 'fs');
    await mkdir(fsDir);
    await runOk('mount', ['-t', 'ext4', loop, fsDir]);
    await mkdir(join(fsDir, 'dir'));
    for (const [name, size] of [['a.bin', 4095], ['dir/b.bin', 300 * 1024], ['dir/c.bin', 8 * MiB]] as const) {
      await writeFile(join(fsDir, name), randomBytes(size));
    }
    await runOk('sync', ['-f', fsDir]);
    const files = await hashTree(fsDir);
    const before = await statfs(fsDir);

    // Discards reach the export as zeroing: a deleted file's blocks stop holding data.
    await writeFile(join(fsDir, 'scratch.bin'), randomBytes(16 * MiB));
    await runOk('sync', ['-f', fsDir]);
    const uri = env.server.uri('vol');
    const dataWithScratch = dataBytesIn(await allocationMap(uri), 0, 64 * MiB);
    await runOk('rm', [join(fsDir, 'scratch.bin')]);
    await runOk('sync', ['-f', fsDir]);
    await runOk('fstrim', [fsDir]);
    expect(dataBytesIn(await allocationMap(uri), 0, 64 * MiB)).toBeLessThan(dataWithScratch - 12 * MiB);

    await env.admin.grow('vol', 192 * MiB);
    // The kernel now caches the old size for a while; the server's notification must drop it.
    expect((await stat(file)).size).toBe(64 * MiB);
    fileServer.child.kill('SIGHUP');
    const grown = await fileServer.waitForLog((line) => line.msg === 'grown', 20_000);
    expect(grown).toMatchObject({ previous: 64 * MiB, size: 192 * MiB });
    expect((await stat(file)).size).toBe(192 * MiB);
    await runOk('losetup', ['--set-capacity', loop]);
    expect(await deviceSize(loop)).toBe(192 * MiB);

    if (await hasCapability(CAP_SYS_RESOURCE)) {
      await runOk('resize2fs', [loop]);
    } else {
      // resize2fs grows a mounted ext4 only with CAP_SYS_RESOURCE: without it, the filesystem is
      // grown unmounted while the loop device and the file server stay attached.
      await runOk('umount', [fsDir]);
      const check = await run('e2fsck', ['-f', '-p', loop], { timeoutMs: 60_000 });
      expect(check.code, describeResult(check)).toBeLessThanOrEqual(1);
      await runOk('resize2fs', [loop]);
      await runOk('mount', ['-t', 'ext4', loop, fsDir]);
    }
    const after = await statfs(fsDir);
    expect(after.blocks * after.bsize).toBeGreaterThan(before.blocks * before.bsize + 120 * MiB);
    expect(Number((await runOk('df', ['--output=size', '-B1', fsDir])).stdout.trim().split('\n')[1])).toBe(after.blocks * after.bsize);
    expect(await hashTree(fsDir)).toEqual(files);
    // The new space is usable: more than the filesystem had before, past the old end of the volume.
    await writeFile(join(fsDir, 'big.bin'), randomBytes(Number(before.bavail * before.bsize) + 16 * MiB));
    await runOk('sync', ['-f', fsDir]);
    const grownFiles = await hashTree(fsDir);

    // From the export itself, not from a cache: unmount, drop the loop device's buffers, check, remount.
    await runOk('umount', [fsDir]);
    await runOk('blockdev', ['--flushbufs', loop]);
    await checkExt4(loop);
    await runOk('mount', ['-t', 'ext4', '-o', 'ro', loop, fsDir]);
    expect(await hashTree(fsDir)).toEqual(grownFiles);

    await runOk('umount', [fsDir]);
    await runOk('losetup', ['--detach', loop]);
    await pollUntil(async () => ((await loopsOver(env.root)).length === 0 ? true : undefined), 15_000, () => `${loop} still attached`);
    fileServer.child.kill('SIGTERM');
    expect(await fileServer.exited).toMatchObject({ code: 0 });
    expect(fileServer.logs.some((line) => line.msg === 'unmounted')).toBe(true);
    expect(await leftovers(env)).toEqual([]);
  });

  it('keeps serving a busy mount on SIGTERM, and unmounts and exits once nothing uses the file', async (ctx) => {
    const env = await startEnv(ctx, 16 * MiB);
    const { fileServer, file } = await attach(env);
    const loop = (await runOk('losetup', ['--find', '--show', file])).stdout.trim();
    const data = randomBytes(64 * 1024);
    await writeFile(loop, data);
    fileServer.child.kill('SIGTERM');
    await fileServer.waitForLog((line) => line.msg === 'still in use: detach its users (losetup -d, umount) first; serving on', 20_000);
    // Still served: the loop device reads what was written, through the file server.
    await runOk('blockdev', ['--flushbufs', loop]);
    const back = await readFile(loop);
    expect(back.subarray(0, data.length).equals(data)).toBe(true);

    await runOk('losetup', ['--detach', loop]);
    await pollUntil(async () => ((await loopsOver(env.root)).length === 0 ? true : undefined), 15_000, () => `${loop} still attached`);
    fileServer.child.kill('SIGTERM');
    expect(await fileServer.exited).toMatchObject({ code: 0 });
    expect(await leftovers(env)).toEqual([]);
  });
});
