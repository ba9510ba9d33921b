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
 * - Journal: the clone is of a cleanly unmounted filesystem, so `needs_recovery` must be clear and
 *   `e2fsck -fn` must pass as is. (`checkExt4` would replay the journal with
 *   `e2fsck -E journal_only` first; the clone-while-writing variant below will need that.)
 * - Independence: after changes (overwrites, deletes, new files, and a TRIM of shared blocks on the
 *   clone), both sides are detached and attached again, so nothing is read from a page cache; each
 *   must show its own changes only.
 */
import { randomBytes, createHash } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it, type TestContext } from 'vitest';
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

  it.todo(
    'clone while a writer keeps writing: needs the admin API to clone a live volume; the clone must ' +
      'replay its journal (checkExt4 reports replayedJournal) and hold every file synced before the clone',
  );
});
