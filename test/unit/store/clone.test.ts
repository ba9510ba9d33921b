import { describe, expect, it } from 'vitest';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Pool, nodeFileLayer, type FileLayer, type PoolOptions } from '../../../src/store/index.js';
import type { BlockDevice } from '../../../src/store/index.js';
import { pattern, readBytes, sameBytes, usePoolFixture } from '../../helpers/store-pool.js';

const MiB = 1024 * 1024;
const fixture = usePoolFixture();
const openPool = (options: PoolOptions = {}): Promise<Pool> => fixture.openPool(options);

/** The real file layer, noting every read transfer and every prefetch as [position, length]. */
function countingReads(): { files: FileLayer; reads: Array<[number, number]>; prefetches: Array<[number, number]> } {
  const files = nodeFileLayer();
  const reads: Array<[number, number]> = [];
  const prefetches: Array<[number, number]> = [];
  return {
    reads,
    prefetches,
    files: {
      ...files,
      async open(path, mode) {
        const handle = await files.open(path, mode);
        return {
          read(buffer, offset, length, position, alone) {
            reads.push([position, length]);
            return handle.read(buffer, offset, length, position, alone);
          },
          prefetch(position, length) {
            prefetches.push([position, length]);
            return handle.prefetch(position, length);
          },
          write: (buffer, offset, length, position, alone) => handle.write(buffer, offset, length, position, alone),
          sync: () => handle.sync(),
          truncate: (length) => handle.truncate(length),
          size: () => handle.size(),
          close: () => handle.close(),
        };
      },
    },
  };
}

/**
 * A pool whose file layer counts reads, with 'base' (`size` bytes) written in full and its clone
 * 'c' open; `expected` is what 'c' reads so far.
 */
async function cloneOfWrittenVolume(
  size = MiB,
): Promise<{ c: BlockDevice; expected: Buffer; reads: Array<[number, number]>; prefetches: Array<[number, number]> }> {
  const { files, reads, prefetches } = countingReads();
  const pool = await openPool({ files });
  await pool.createVolume('base', size);
  const expected = pattern(size, 1);
  await (await pool.open('base')).write(0, expected, false);
  await pool.clone('base', 'c');
  return { c: await pool.open('c'), expected, reads, prefetches };
}

/** Reads the range into one buffer, as the NBD server does, and lays out what the pieces say. */
async function readInto(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  for (const piece of await device.read(offset, length, Buffer.alloc(length, 0xa5))) {
    if (piece.kind === 'data') piece.data.copy(out, piece.offset - offset);
  }
  return out;
}

describe('snapshots and clones', () => {
  it('keeps a snapshot frozen while the volume changes', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(8192, 1), false);
    const info = await pool.snapshot('a', 's');
    expect(info).toMatchObject({ name: 's', kind: 'snapshot', readOnly: true, parent: 'a', size: MiB });
    await a.write(4096, pattern(8192, 2), false);
    const s = await pool.open('s');
    expect(s.readOnly).toBe(true);
    expect(sameBytes(await readBytes(s, 0, 8192), pattern(8192, 1))).toBe('same');
    await expect(s.write(0, Buffer.alloc(1), false)).rejects.toMatchObject({ code: 'EPERM' });
    expect(pool.info('a')?.snapshots).toEqual(['s']);
  });

  it('captures exactly the writes completed before a clone of a volume being written', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 4 * MiB);
    const a = await pool.open('a');
    const other = await pool.open('a');
    const blocks = 512;
    const done = new Array<boolean>(blocks).fill(false);
    const writes = Array.from({ length: blocks }, (_, i) =>
      (i % 2 === 0 ? a : other).write(i * 8192 + (i % 3) * 100, Buffer.alloc(6000, (i % 250) + 1), false).then(() => {
        done[i] = true;
      }),
    );
    // Let some writes complete, then clone while the rest are in flight or queued.
    await writes[40];
    const completedBefore = done.slice();
    const cloned = pool.clone('a', 'b');
    const issuedAfter = Array.from({ length: 64 }, (_, i) => a.write(i * 8192 + 4096, Buffer.alloc(4096, 0xff), false));
    await cloned;
    await Promise.all([...writes, ...issuedAfter]);
    const b = await pool.open('b');
    const image = await readBytes(b, 0, blocks * 8192);
    for (let i = 0; i < blocks; i++) {
      const region = image.subarray(i * 8192 + (i % 3) * 100, i * 8192 + (i % 3) * 100 + 6000);
      const whole = region.every((x) => x === (i % 250) + 1);
      const absent = region.every((x) => x === 0);
      // Every write is all-or-nothing in the clone, and those completed before it are in it.
      expect(whole || absent, `block ${i} torn`).toBe(true);
      if (completedBefore[i]) expect(whole, `write ${i} completed before the clone is missing`).toBe(true);
    }
    // Writes issued after the clone was requested never show in it.
    for (let i = 0; i < 64; i++) expect(image.subarray(i * 8192 + 4096 + 1904, i * 8192 + 8192).includes(0xff)).toBe(false);
  });

  it('makes clones independent of their source, both ways', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(16384, 1), false);
    await pool.clone('a', 'b');
    const b = await pool.open('b');
    await a.write(0, Buffer.alloc(100, 7), false);
    await b.write(5000, Buffer.alloc(100, 9), false);
    const expectA = pattern(16384, 1);
    expectA.fill(7, 0, 100);
    const expectB = pattern(16384, 1);
    expectB.fill(9, 5000, 5100);
    expect(sameBytes(await readBytes(a, 0, 16384), expectA)).toBe('same');
    expect(sameBytes(await readBytes(b, 0, 16384), expectB)).toBe('same');
  });

  it('masks inherited data with trim and reports it as a hole', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(16384, 1), false);
    await pool.clone('a', 'b');
    const b = await pool.open('b');
    await b.trim(4096, 8192, false);
    expect((await readBytes(b, 4096, 8192)).every((x) => x === 0)).toBe(true);
    expect(await b.blockStatus(0, 16384)).toEqual([
      { length: 4096, hole: false, zero: false },
      { length: 8192, hole: true, zero: true },
      { length: 4096, hole: false, zero: false },
    ]);
    expect(sameBytes(await readBytes(a, 0, 16384), pattern(16384, 1))).toBe('same');
  });

  it('reads a deep chain of clones', async () => {
    const pool = await openPool();
    await pool.createVolume('c0', MiB);
    const expected = Buffer.alloc(64 * 4096);
    for (let depth = 0; depth < 32; depth++) {
      const device = await pool.open(`c${depth}`);
      const data = pattern(1000, depth + 1);
      await device.write(depth * 4096 + 10, data, false);
      data.copy(expected, depth * 4096 + 10);
      await pool.clone(`c${depth}`, `c${depth + 1}`);
    }
    const last = await pool.open('c32');
    expect(sameBytes(await readBytes(last, 0, expected.length), expected)).toBe('same');
    await pool.close();
    const reopened = await openPool();
    expect(sameBytes(await readBytes(await reopened.open('c32'), 0, expected.length), expected)).toBe('same');
  });

  it('keeps a clone readable after its source and snapshot are deleted, and removes unreferenced files', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(65536, 1), false);
    await pool.snapshot('a', 's');
    await pool.clone('s', 'b');
    await pool.delete('a');
    await pool.delete('s');
    await expect(a.read(0, 10)).rejects.toMatchObject({ code: 'ENOENT' });
    const b = await pool.open('b');
    expect(sameBytes(await readBytes(b, 0, 65536), pattern(65536, 1))).toBe('same');
    await pool.delete('b');
    expect((await pool.usage()).usedBytes).toBe(0);
    const { readdir } = await import('node:fs/promises');
    expect(await readdir(join(fixture.dir, 'layers'))).toEqual([]);
  });

  it('clones larger than the source and grows online, refusing to shrink', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(MiB - 4096, pattern(4096, 1), false);
    const b = await pool.clone('a', 'b', { size: 2 * MiB });
    expect(b.size).toBe(2 * MiB);
    const bd = await pool.open('b');
    expect(sameBytes(await readBytes(bd, MiB - 4096, 8192), Buffer.concat([pattern(4096, 1), Buffer.alloc(4096)]))).toBe('same');
    await expect(pool.clone('a', 'c', { size: 4096 })).rejects.toMatchObject({ code: 'ERANGE' });
    await pool.grow('a', 3 * MiB);
    expect(pool.describe('a')?.size).toBe(3 * MiB);
    expect(a.size).toBe(3 * MiB);
    await a.write(3 * MiB - 100, Buffer.alloc(100, 5), false);
    expect(sameBytes(await readBytes(a, 3 * MiB - 100, 100), Buffer.alloc(100, 5))).toBe('same');
    await expect(pool.grow('a', MiB)).rejects.toMatchObject({ code: 'ERANGE' });
  });

  it('flattens a clone online so it shares nothing', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 4 * MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(3 * MiB, 1), false);
    await pool.clone('a', 'b');
    const b = await pool.open('b');
    await b.write(MiB, pattern(4096, 2), false);
    const progress: Array<[number, number]> = [];
    await pool.flatten('b', (done, total) => progress.push([done, total]));
    expect(progress.at(-1)).toEqual([3 * MiB - 4096, 3 * MiB - 4096]);
    const expected = pattern(3 * MiB, 1);
    pattern(4096, 2).copy(expected, MiB);
    expect(sameBytes(await readBytes(b, 0, 3 * MiB), expected)).toBe('same');
    const usage = await pool.usage();
    expect(usage.volumes.find((v) => v.name === 'b')).toMatchObject({ exclusiveBytes: 3 * MiB, sharedBytes: 0 });
    await pool.delete('a');
    expect(sameBytes(await readBytes(b, 0, 3 * MiB), expected)).toBe('same');
  });

  it('accounts exclusive and shared bytes', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(40960, 1), false);
    await pool.clone('a', 'b');
    await a.write(0, pattern(4096, 2), false);
    const usage = await pool.usage();
    expect(usage.volumes).toEqual([
      { name: 'a', kind: 'volume', size: MiB, exclusiveBytes: 4096, sharedBytes: 36864 },
      // Block 0 of b is the one a overwrote: nothing else points at it any more.
      { name: 'b', kind: 'volume', size: MiB, exclusiveBytes: 4096, sharedBytes: 36864 },
    ]);
    expect(usage.usedBytes).toBe(45056);
  });

  it('fails writes with ENOSPC beyond capacityBytes and keeps working', async () => {
    const pool = await openPool({ capacityBytes: 64 * 1024 });
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(65536, 1), false);
    await expect(a.write(65536, Buffer.alloc(4096, 1), false)).rejects.toMatchObject({ code: 'ENOSPC' });
    await a.write(0, pattern(65536, 2), false);
    expect(sameBytes(await readBytes(a, 0, 131072), Buffer.concat([pattern(65536, 2), Buffer.alloc(65536)]))).toBe('same');
    await a.trim(0, 8192, false);
    await a.write(65536, Buffer.alloc(4096, 1), false);
    expect((await pool.usage()).freeBytes).toBe(4096);
  });

  it('reads a range a clone mostly shares with one transfer from its source, its own blocks laid over', async () => {
    const { c, expected, reads } = await cloneOfWrittenVolume();
    for (const block of [10, 100, 200]) {
      const own = pattern(4096, block);
      await c.write(block * 4096, own, false);
      own.copy(expected, block * 4096);
    }
    await c.zero(150 * 4096, 4096, { mayTrim: true, fua: false });
    expected.fill(0, 150 * 4096, 151 * 4096);
    reads.length = 0;
    expect(sameBytes(await readInto(c, 0, MiB), expected)).toBe('same');
    expect(reads.length, 'one transfer from the source, one for each of the three blocks of its own').toBe(4);
    expect(reads).toContainEqual([0, MiB]);
  });

  it('reads runs one by one when one transfer would mostly read what the range does not use', async () => {
    const { c, expected, reads } = await cloneOfWrittenVolume();
    const own = pattern(MiB - 8192, 2);
    await c.write(4096, own, false);
    own.copy(expected, 4096);
    reads.length = 0;
    expect(sameBytes(await readInto(c, 0, MiB), expected)).toBe('same');
    expect(reads.sort(([a], [b]) => a - b)).toEqual([
      [0, 4096],
      [4096, MiB - 8192],
      [MiB - 4096, 4096],
    ]);
  });

  it("reads a clone's own blocks ahead of a sequential reader, and nothing ahead of random reads", async () => {
    const size = 16 * MiB;
    const { c, expected, prefetches } = await cloneOfWrittenVolume(size);
    const own: number[] = [];
    for (let offset = 64 * 1024; offset < size; offset += 512 * 1024) {
      const block = pattern(4096, offset);
      await c.write(offset, block, false);
      block.copy(expected, offset);
      own.push(offset);
    }
    for (const at of [5, 1, 9, 3, 12]) {
      expect(sameBytes(await readInto(c, at * MiB, MiB), expected.subarray(at * MiB, (at + 1) * MiB))).toBe('same');
    }
    expect(prefetches, 'no read ahead for reads out of order').toEqual([]);
    for (let at = 0; at < size; at += MiB) {
      expect(sameBytes(await readInto(c, at, MiB), expected.subarray(at, at + MiB))).toBe('same');
    }
    // The second read in a row starts the stream at 2 MiB; the base, read sequentially, is left
    // to the kernel.
    const ahead = own.filter((offset) => offset >= 2 * MiB).map((offset) => [offset, 4096]);
    expect(prefetches.sort(([a], [b]) => a - b)).toEqual(ahead);
  });

  it('gives disk space back after trim (du falls)', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 8 * MiB);
    const a = await pool.open('a');
    await a.write(0, pattern(4 * MiB, 1), false);
    await a.flush();
    const layerFile = async (): Promise<string> => {
      const { readdir } = await import('node:fs/promises');
      const [file] = await readdir(join(fixture.dir, 'layers'));
      return join(fixture.dir, 'layers', file!);
    };
    const before = (await stat(await layerFile())).blocks * 512;
    expect(before).toBeGreaterThanOrEqual(4 * MiB);
    await a.trim(0, 3 * MiB, false);
    await a.flush();
    await pool.idle();
    const after = (await stat(await layerFile())).blocks * 512;
    expect(before - after).toBeGreaterThanOrEqual(3 * MiB);
    expect(sameBytes(await readBytes(a, 3 * MiB, MiB), pattern(4 * MiB, 1).subarray(3 * MiB))).toBe('same');
  });
});
