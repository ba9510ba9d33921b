/**
 * A clonebd volume as a real Linux block device, without the nbd kernel module:
 * nbdfuse + losetup give /dev/loopN, which carries ext4 through mkfs, mount, fstrim, sync, a
 * clone, e2fsck and changes on both sides.
 *
 * What each step proves:
 * - fstrim: the freed file's physical blocks, reported as data by the server before, are hole or
 *   zero after (TRIM reached the server and the store recorded it). The blocks stay data after the
 *   delete and before fstrim, so it is fstrim that did it.
 * - sync/umount: the source is detached cleanly and the server is then SIGKILLed, so no graceful
 *   shutdown can make up for a FLUSH the server answered without making the data durable. The
 *   clone taken from the pool afterwards must hold every file.
 * - Journal: the first clone is of a cleanly unmounted filesystem, so `needs_recovery` must be clear
 *   and `e2fsck -fn` must pass as is. The clone taken while a writer keeps writing is of a mounted
 *   filesystem: it is crash-consistent, so its journal is replayed first (`e2fsck -E journal_only`,
 *   the replay the kernel would do at mount), and then `e2fsck -fn` must pass.
 * - Independence: after changes (overwrites, deletes, new files, and a TRIM of shared blocks on the
 *   clone), both sides are detached and attached again, so nothing is read from a page cache; each
 *   must show its own changes only.
 */
import { randomBytes, createHash } from 'node:crypto';
import { mkdir, open, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it, type TestContext } from 'vitest';
import { AdminClient } from '../../src/control/admin-client.js';
import type { Pool } from '../../src/store/index.js';
import {
  BLOCK_DEVICE_TOOLS,
  allocationMap,
  attachBlockDevice,
  checkExt4,
  dataBytesIn,
  detachAllBlockDevices,
  hashTree,
  leftovers,
  makeExt4,
  physicalExtents,
  type AttachedDevice,
} from '../helpers/block-device.js';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { isCi, makeTempDir, removeTempDirs, requireTools, runOk } from '../helpers/tools.js';

const VOLUME_SIZE = 256 * 2 ** 20;
// Default log level: the "listening" line the harness waits for is logged at info.
const SERVE_ARGS = ['--no-default-volume'];

/** Loop devices, mounts and FUSE need root: skip with the reason, or fail under CI=true. */
function requireRoot(ctx: TestContext): void {
  if (process.getuid?.() === 0) return;
  const reason = 'needs root (losetup, mount, FUSE)';
  if (isCi()) throw new Error(`${reason} (CI=true: run the e2e tests as root)`);
  console.warn(`skipping "${ctx.task.name}": ${reason}`);
  ctx.skip(reason);
}

type Tree = Map<string, string>;

async function writeFileHashed(root: string, path: string, size: number, tree: Tree): Promise<void> {
  const data = randomBytes(size);
  await mkdir(dirname(join(root, path)), { recursive: true });
  await writeFile(join(root, path), data);
  tree.set(path, createHash('sha256').update(data).digest('hex'));
}

/** Sizes around the 4 KiB block, a deep path, many small files, two large ones. */
async function writeInitialTree(root: string): Promise<Tree> {
  const tree: Tree = new Map();
  const files: [string, number][] = [
    ['empty', 0],
    ['one-byte', 1],
    ['docs/a.txt', 4095],
    ['docs/b.txt', 4097],
    ['deep/x/y/z.bin', 100 * 1024],
    ['shared/both.bin', 2 ** 20],
    ['big/blob.bin', 8 * 2 ** 20],
  ];
  for (let i = 0; i < 40; i++) files.push([`many/f${String(i).padStart(3, '0')}`, 3000 + i]);
  for (const [path, size] of files) await writeFileHashed(root, path, size, tree);
  return tree;
}

async function syncFs(mountpoint: string): Promise<void> {
  await runOk('sync', ['--file-system', mountpoint]);
}

async function dataBytesOver(uri: string, ranges: readonly { offset: number; length: number }[]): Promise<number> {
  const map = await allocationMap(uri);
  return ranges.reduce((sum, range) => sum + dataBytesIn(map, range.offset, range.length), 0);
}

function treeObject(tree: Tree): Record<string, string> {
  return Object.fromEntries([...tree].sort(([a], [b]) => a.localeCompare(b)));
}

describe('a clonebd volume as a block device (nbdfuse + losetup + ext4)', () => {
  afterEach(async () => {
    // Devices first: they need the server to flush on their way down.
    const failures: unknown[] = [];
    await detachAllBlockDevices().catch((error: unknown) => failures.push(error));
    await stopAllServerProcesses().catch((error: unknown) => failures.push(error));
    const left = await leftovers();
    // Never recurse into a directory that may still hold a mount.
    if (left.length === 0) await removeTempDirs();
    expect(left, 'left behind after teardown').toEqual([]);
    if (failures.length > 0) throw new AggregateError(failures, 'teardown failed');
  });

  it('mkfs, files, fstrim, sync; a clone is clean, identical and independent of its source', { timeout: 120_000 }, async (ctx) => {
    requireRoot(ctx);
    requireTools(ctx, ...BLOCK_DEVICE_TOOLS);
    const work = await makeTempDir('clonebd-e2e-bd-');
    const pool = join(work, 'pool');

    let server: ServerProcess = await startServerProcess({
      pool,
      args: SERVE_ARGS,
      prepare: (store: Pool) => store.createVolume('vol', VOLUME_SIZE),
    });
    const sourceUri = server.uri('vol');
    let source: AttachedDevice = await attachBlockDevice(sourceUri, VOLUME_SIZE, join(work, 'source'));
    await makeExt4(source.loop);
    const sourceMnt = join(work, 'source-mnt');
    await source.mount(sourceMnt);

    const expected = await writeInitialTree(sourceMnt);
    const victim = join(sourceMnt, 'victim.bin');
    await writeFile(victim, randomBytes(16 * 2 ** 20));
    await syncFs(sourceMnt);

    // TRIM: the victim's blocks are data on the server until fstrim, then no longer.
    const victimRanges = await physicalExtents(victim);
    const victimBytes = victimRanges.reduce((sum, range) => sum + range.length, 0);
    expect(victimBytes).toBe(16 * 2 ** 20);
    expect(await dataBytesOver(sourceUri, victimRanges), 'victim written and synced: data on the server').toBe(victimBytes);
    await rm(victim);
    await syncFs(sourceMnt);
    expect(await dataBytesOver(sourceUri, victimRanges), 'deleted without discard: still data').toBe(victimBytes);
    await runOk('fstrim', [sourceMnt]);
    expect(await dataBytesOver(sourceUri, victimRanges), 'after fstrim: hole or zero').toBe(0);

    expect(treeObject(await hashTree(sourceMnt))).toEqual(treeObject(expected));

    // FLUSH: umount flushes; a SIGKILLed server gets no chance to flush anything afterwards.
    await source.detach();
    await server.stop('SIGKILL');
    server = await startServerProcess({
      pool,
      args: SERVE_ARGS,
      prepare: (store: Pool) => store.clone('vol', 'vol-clone'),
    });
    const cloneUri = server.uri('vol-clone');
    let clone = await attachBlockDevice(cloneUri, VOLUME_SIZE, join(work, 'clone'));
    source = await attachBlockDevice(server.uri('vol'), VOLUME_SIZE, join(work, 'source'));
    expect(await checkExt4(clone.loop), 'clone of a cleanly unmounted ext4').toEqual({ replayedJournal: false });
    expect(await checkExt4(source.loop), 'source after the restart').toEqual({ replayedJournal: false });
    const cloneMnt = join(work, 'clone-mnt');
    await clone.mount(cloneMnt);
    await source.mount(sourceMnt);
    expect(treeObject(await hashTree(cloneMnt)), 'clone').toEqual(treeObject(expected));
    expect(treeObject(await hashTree(sourceMnt)), 'source').toEqual(treeObject(expected));

    // Changes on both sides, including the same file and a TRIM of shared blocks on the clone.
    const expectedSource = new Map(expected);
    const expectedClone = new Map(expected);
    await writeFileHashed(sourceMnt, 'docs/a.txt', 5000, expectedSource);
    await writeFileHashed(sourceMnt, 'shared/both.bin', 2 ** 20, expectedSource);
    await writeFileHashed(sourceMnt, 'source-only/new.bin', 300 * 1024, expectedSource);
    await rm(join(sourceMnt, 'deep/x/y/z.bin'));
    expectedSource.delete('deep/x/y/z.bin');

    await writeFileHashed(cloneMnt, 'docs/b.txt', 6000, expectedClone);
    await writeFileHashed(cloneMnt, 'shared/both.bin', 2 ** 20, expectedClone);
    await writeFileHashed(cloneMnt, 'clone-only/new.bin', 200 * 1024, expectedClone);
    await rm(join(cloneMnt, 'many/f007'));
    expectedClone.delete('many/f007');
    const blobRanges = await physicalExtents(join(cloneMnt, 'big/blob.bin'));
    const blobBytes = blobRanges.reduce((sum, range) => sum + range.length, 0);
    await rm(join(cloneMnt, 'big/blob.bin'));
    expectedClone.delete('big/blob.bin');
    await syncFs(cloneMnt);
    await syncFs(sourceMnt);
    await runOk('fstrim', [cloneMnt]);
    expect(await dataBytesOver(cloneUri, blobRanges), 'clone: trimmed shared blocks').toBe(0);
    expect(await dataBytesOver(server.uri('vol'), blobRanges), 'source: the same blocks untouched').toBe(blobBytes);

    // Read back through fresh attachments: nothing comes from a page cache.
    await clone.detach();
    await source.detach();
    clone = await attachBlockDevice(cloneUri, VOLUME_SIZE, join(work, 'clone'));
    source = await attachBlockDevice(server.uri('vol'), VOLUME_SIZE, join(work, 'source'));
    expect(await checkExt4(clone.loop), 'clone after changes').toEqual({ replayedJournal: false });
    expect(await checkExt4(source.loop), 'source after changes').toEqual({ replayedJournal: false });
    await clone.mount(cloneMnt, ['-o', 'ro']);
    await source.mount(sourceMnt, ['-o', 'ro']);
    expect(treeObject(await hashTree(sourceMnt)), 'source shows its own changes only').toEqual(treeObject(expectedSource));
    expect(treeObject(await hashTree(cloneMnt)), 'clone shows its own changes only').toEqual(treeObject(expectedClone));

    await clone.detach();
    await source.detach();
    expect(await server.stop(), 'SIGTERM: graceful exit').toEqual({ code: 0, signal: null, killed: false });
    expect(await leftovers()).toEqual([]);
  });

  it('clones while a writer keeps writing: the clone replays its journal, is clean, and holds every file synced before the clone', { timeout: 180_000 }, async (ctx) => {
    requireRoot(ctx);
    requireTools(ctx, ...BLOCK_DEVICE_TOOLS);
    const work = await makeTempDir('clonebd-e2e-live-');
    const pool = join(work, 'pool');
    const server = await startServerProcess({
      pool,
      args: SERVE_ARGS,
      prepare: (store: Pool) => store.createVolume('live', VOLUME_SIZE),
    });
    const admin = new AdminClient(join(pool, 'admin.sock'));
    const source = await attachBlockDevice(server.uri('live'), VOLUME_SIZE, join(work, 'source'));
    await makeExt4(source.loop);
    const sourceMnt = join(work, 'source-mnt');
    await source.mount(sourceMnt);
    const before = await writeInitialTree(sourceMnt);
    await syncFs(sourceMnt);

    const writer = startWriter(sourceMnt);
    await writer.waitForSynced(20);
    const cloneRequested = writer.mark();
    await admin.clone('live', 'live-clone');
    const cloneDone = writer.mark();
    await writer.waitForSynced(cloneDone.synced + 20);
    const written = await writer.stop();

    const syncedBefore = written.filter((file) => file.syncedAt !== undefined && file.syncedAt < cloneRequested.sequence);
    const startedAfter = written.filter((file) => file.startedAt > cloneDone.sequence);
    expect(syncedBefore.length, 'files synced before the clone was asked for').toBeGreaterThanOrEqual(20);
    expect(startedAfter.length, 'files begun after the clone was made').toBeGreaterThanOrEqual(20);

    const clone = await attachBlockDevice(server.uri('live-clone'), VOLUME_SIZE, join(work, 'clone'));
    expect(await checkExt4(clone.loop), 'a clone of a mounted ext4 needs its journal replayed, then is clean').toEqual({
      replayedJournal: true,
    });
    const cloneMnt = join(work, 'clone-mnt');
    await clone.mount(cloneMnt);
    const cloneTree = await hashTree(cloneMnt);
    for (const [path, hash] of before) expect(cloneTree.get(path), `clone: ${path}, synced before writing began`).toBe(hash);
    for (const file of syncedBefore) expect(cloneTree.get(file.path), `clone: ${file.path}, synced before the clone`).toBe(file.hash);
    for (const file of startedAfter) expect(cloneTree.has(file.path), `clone: ${file.path}, begun after the clone`).toBe(false);
    for (const [path, hash] of cloneTree) {
      const file = written.find((candidate) => candidate.path === path);
      // A file caught mid-write may be short or empty, but never holds bytes it was not given.
      if (file !== undefined && hash !== file.hash) expect(file.syncedAt ?? Infinity, `clone: ${path}`).toBeGreaterThan(cloneRequested.sequence);
    }

    // Independence: each side's new file stays on its side, through fresh attachments.
    const expectedSource = new Map<string, string>();
    const expectedClone = new Map<string, string>();
    await writeFileHashed(cloneMnt, 'after/clone-only.bin', 300 * 1024, expectedClone);
    await writeFileHashed(sourceMnt, 'after/source-only.bin', 200 * 1024, expectedSource);
    await clone.detach();
    await source.detach();
    const cloneAgain = await attachBlockDevice(server.uri('live-clone'), VOLUME_SIZE, join(work, 'clone'));
    const sourceAgain = await attachBlockDevice(server.uri('live'), VOLUME_SIZE, join(work, 'source'));
    expect(await checkExt4(cloneAgain.loop), 'clone, unmounted cleanly').toEqual({ replayedJournal: false });
    expect(await checkExt4(sourceAgain.loop), 'source, unmounted cleanly').toEqual({ replayedJournal: false });
    await cloneAgain.mount(cloneMnt, ['-o', 'ro']);
    await sourceAgain.mount(sourceMnt, ['-o', 'ro']);
    const cloneFinal = await hashTree(cloneMnt);
    const sourceFinal = await hashTree(sourceMnt);
    expect(cloneFinal.get('after/clone-only.bin')).toBe(expectedClone.get('after/clone-only.bin'));
    expect(sourceFinal.has('after/clone-only.bin'), 'the clone\'s file is not on the source').toBe(false);
    expect(sourceFinal.get('after/source-only.bin')).toBe(expectedSource.get('after/source-only.bin'));
    expect(cloneFinal.has('after/source-only.bin'), 'the source\'s file is not on the clone').toBe(false);
    for (const file of written) expect(sourceFinal.get(file.path), `source keeps ${file.path}`).toBe(file.hash);

    await cloneAgain.detach();
    await sourceAgain.detach();
    expect(await server.stop(), 'SIGTERM: graceful exit').toEqual({ code: 0, signal: null, killed: false });
  });
});

interface WrittenFile {
  path: string;
  hash: string;
  /** Positions in the writer's sequence of events, shared with mark(). */
  startedAt: number;
  syncedAt?: number;
}

interface Writer {
  /** A point in the writer's sequence, with how many files were synced by then. */
  mark(): { sequence: number; synced: number };
  waitForSynced(count: number): Promise<void>;
  stop(): Promise<WrittenFile[]>;
}

/**
 * Writes, then fsyncs, one file after another until stopped. Events are ordered by a counter, not
 * clocks: a file synced before mark() returned a smaller number than that mark.
 */
function startWriter(root: string): Writer {
  const files: WrittenFile[] = [];
  let sequence = 0;
  let synced = 0;
  let stopping = false;
  const waiters: { count: number; resolve: () => void }[] = [];
  const wake = (): void => {
    for (const waiter of waiters.filter((entry) => synced >= entry.count)) {
      waiters.splice(waiters.indexOf(waiter), 1);
      waiter.resolve();
    }
  };
  const loop = (async () => {
    await mkdir(join(root, 'writer'), { recursive: true });
    for (let index = 0; !stopping; index++) {
      const data = randomBytes(16 * 1024 + (index % 7) * 4096);
      const file: WrittenFile = {
        path: `writer/${String(index).padStart(5, '0')}.bin`,
        hash: createHash('sha256').update(data).digest('hex'),
        startedAt: ++sequence,
      };
      files.push(file);
      const handle = await open(join(root, file.path), 'w');
      try {
        await handle.writeFile(data);
        await handle.sync();
      } finally {
        await handle.close();
      }
      // The directory entry must be durable too, or the file may be missing after a crash.
      const dir = await open(join(root, 'writer'), 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
      file.syncedAt = ++sequence;
      synced++;
      wake();
    }
  })();
  return {
    mark: () => ({ sequence: ++sequence, synced }),
    waitForSynced: (count) =>
      new Promise<void>((resolve, reject) => {
        waiters.push({ count, resolve });
        loop.catch(reject);
        wake();
      }),
    async stop() {
      stopping = true;
      await loop;
      return files;
    },
  };
}
