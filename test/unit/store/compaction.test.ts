/**
 * Compaction: frozen layers that only one layer still reads through, left behind when snapshots
 * and clones are deleted, are merged with it; the data stays, the layer count stays bounded.
 */
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Pool, type PoolOptions } from '../../../src/store/index.js';
import type { BlockDevice } from '../../../src/store/types.js';
import { pattern, readBytes, sameBytes, usePoolFixture } from '../../helpers/store-pool.js';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const fixture = usePoolFixture();
const openPool = (options: PoolOptions = {}): Promise<Pool> => fixture.openPool(options);

/** Writes `count` 4 KiB blocks at pseudo-random places, into the device and the expected image. */
async function scatter(device: BlockDevice, image: Buffer, seed: number, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const block = (seed * 7919 + i * 104729) % (image.length / BLOCK);
    const data = pattern(BLOCK, seed * 1000 + i);
    await device.write(block * BLOCK, data, false);
    data.copy(image, block * BLOCK);
  }
}

async function layerFiles(): Promise<string[]> {
  return readdir(join(fixture.dir, 'layers'));
}

describe('compaction', () => {
  it('keeps a volume at two layers through snapshot after snapshot deleted, with its data', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 4 * MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(4 * MiB);
    await scatter(a, image, 1, 300);
    const snapshots: { name: string; image: Buffer }[] = [];
    for (let round = 2; round < 14; round++) {
      await pool.snapshot('a', `s${round}`);
      snapshots.push({ name: `s${round}`, image: Buffer.from(image) });
      await scatter(a, image, round, 40);
      if (snapshots.length > 1) await pool.delete(snapshots.shift()!.name);
    }
    await pool.delete(snapshots.shift()!.name);
    await pool.idle();
    expect(sameBytes(await readBytes(a, 0, image.length), image)).toBe('same');
    // The first head (frozen, the root) and the current head: nothing in between survives.
    expect((await pool.usage()).layers).toBe(2);
    expect((await layerFiles()).length).toBeLessThanOrEqual(2);
    await pool.close();
    const reopened = await openPool();
    expect(sameBytes(await readBytes(await reopened.open('a'), 0, image.length), image)).toBe('same');
    expect((await reopened.usage()).layers).toBe(2);
  });

  it('folds what deleted clones leave; the source keeps its data and the clones that remain keep theirs', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 2 * MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(2 * MiB);
    await scatter(a, image, 1, 100);
    let keptImage: Buffer | undefined;
    for (let round = 2; round < 10; round++) {
      await pool.clone('a', `c${round}`);
      if (round === 5) keptImage = Buffer.from(image);
      await scatter(a, image, round, 30);
      const clone = await pool.open(`c${round}`);
      await clone.write(0, pattern(BLOCK, round), false);
      await clone.close();
      if (round !== 5) await pool.delete(`c${round}`);
      // A fold gives up if the head is frozen meanwhile, and layers then under a live copy stay;
      // waiting here makes each fold finish before the next clone.
      await pool.idle();
    }
    await pool.idle();
    expect(sameBytes(await readBytes(a, 0, image.length), image)).toBe('same');
    const kept = await readBytes(await pool.open('c5'), 0, image.length);
    pattern(BLOCK, 5).copy(keptImage!, 0);
    expect(sameBytes(kept, keptImage!)).toBe('same');
    // The root, which absorbed everything up to the layer c5 was cloned from; a's and c5's heads.
    expect((await pool.usage()).layers).toBe(3);
  });

  it('folds a deleted snapshot\'s layer into the snapshot above it, then that one into the volume', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(MiB);
    const images = new Map<string, Buffer>();
    for (const name of ['s1', 's2', 's3']) {
      await scatter(a, image, images.size + 1, 20);
      await pool.snapshot('a', name);
      images.set(name, Buffer.from(image));
    }
    await scatter(a, image, 9, 20);
    await pool.delete('s2');
    await pool.idle();
    expect((await pool.usage()).layers, 's2 folded into s3').toBe(3);
    expect(sameBytes(await readBytes(await pool.open('s3'), 0, MiB), images.get('s3')!)).toBe('same');
    await pool.delete('s3');
    await pool.idle();
    expect((await pool.usage()).layers, 'only s1 (the root) and the head remain').toBe(2);
    expect(sameBytes(await readBytes(await pool.open('s1'), 0, MiB), images.get('s1')!)).toBe('same');
    expect(sameBytes(await readBytes(a, 0, MiB), image)).toBe('same');
  });

  it('keeps the layer count bounded when the oldest copies go first, always with live copies above them', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 2 * MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(2 * MiB);
    await scatter(a, image, 1, 100);
    const live: { name: string; image: Buffer }[] = [];
    for (let round = 2; round < 30; round++) {
      const name = `copy${round}`;
      if (round % 2 === 0) await pool.snapshot('a', name);
      else await pool.clone('a', name);
      live.push({ name, image: Buffer.from(image) });
      await scatter(a, image, round, 20);
      if (live.length > 3) await pool.delete(live.shift()!.name);
      await pool.idle();
    }
    expect(sameBytes(await readBytes(a, 0, image.length), image)).toBe('same');
    for (const copy of live) {
      expect(sameBytes(await readBytes(await pool.open(copy.name), 0, image.length), copy.image), copy.name).toBe('same');
    }
    // Per live copy: its frozen layer (and a clone's head); plus the root and a's head.
    const { layers } = await pool.usage();
    expect(layers).toBeLessThanOrEqual(2 + 2 * live.length);
    expect((await layerFiles()).length).toBeLessThanOrEqual(layers);
    await pool.close();
    const reopened = await openPool();
    expect((await reopened.usage()).layers).toBe(layers);
    for (const copy of live) {
      expect(sameBytes(await readBytes(await reopened.open(copy.name), 0, image.length), copy.image), copy.name).toBe('same');
    }
  });

  it('folds a layer between two clones\' common ancestors; both clones keep their data', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(MiB);
    await scatter(a, image, 1, 50);
    await pool.snapshot('a', 's1');
    await scatter(a, image, 2, 50);
    await pool.snapshot('a', 's2');
    const atS2 = Buffer.from(image);
    await pool.clone('s2', 'c1');
    await pool.clone('s2', 'c2');
    const c1 = await pool.open('c1');
    const c1Image = Buffer.from(atS2);
    await scatter(c1, c1Image, 3, 30);
    await pool.delete('s1');
    await pool.delete('s2');
    await pool.delete('a');
    await pool.idle();
    expect(sameBytes(await readBytes(c1, 0, MiB), c1Image)).toBe('same');
    expect(sameBytes(await readBytes(await pool.open('c2'), 0, MiB), atS2)).toBe('same');
    // The root, which absorbed s1's and then s2's layer, and c1's and c2's heads.
    expect((await pool.usage()).layers).toBe(3);
  });

  it('reads and writes keep going during a compaction, and every write is kept', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 8 * MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(8 * MiB);
    await scatter(a, image, 1, 200);
    await pool.snapshot('a', 's1');
    await scatter(a, image, 2, 1500);
    await pool.snapshot('a', 's2');
    await scatter(a, image, 3, 50);
    await pool.delete('s2');
    // The compaction copies about 1500 blocks in steps; these writes and reads interleave with it.
    const traffic: Promise<void>[] = [];
    for (let i = 0; i < 200; i++) {
      const block = (i * 4099) % (image.length / BLOCK);
      const data = pattern(BLOCK, 50_000 + i);
      data.copy(image, block * BLOCK);
      traffic.push(a.write(block * BLOCK, data, false));
    }
    await Promise.all(traffic);
    await pool.idle();
    expect(sameBytes(await readBytes(a, 0, image.length), image)).toBe('same');
    expect((await pool.usage()).layers).toBe(2);
  });

  it('lets the root absorb a small frozen child, and punches from its file what the child zeroed', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 4 * MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(4 * MiB);
    for (let at = 0; at < image.length; at += MiB) {
      const data = pattern(MiB, at);
      await a.write(at, data, false);
      data.copy(image, at);
    }
    await pool.flush();
    await pool.clone('a', 'c');
    await scatter(a, image, 3, 20);
    await a.trim(MiB, MiB, false);
    image.fill(0, MiB, 2 * MiB);
    await pool.snapshot('a', 's');
    await pool.delete('c');
    await pool.delete('s');
    await pool.idle();
    // The root took in what a wrote before the snapshot; a's head is all that is left above it.
    expect((await pool.usage()).layers).toBe(2);
    expect(sameBytes(await readBytes(a, 0, image.length), image)).toBe('same');
    const files = await layerFiles();
    expect(files).toHaveLength(1);
    const root = await stat(join(fixture.dir, 'layers', files[0]!));
    expect(root.blocks * 512).toBeLessThanOrEqual(3 * MiB);
    await pool.close();
    const reopened = await openPool();
    expect(sameBytes(await readBytes(await reopened.open('a'), 0, image.length), image)).toBe('same');
    expect((await reopened.usage()).layers).toBe(2);
  });

  it('copies the fewer blocks: a small frozen layer is folded down into its large child', async () => {
    const messages: string[] = [];
    const logger = pino({ level: 'debug' }, { write: (line: string) => void messages.push(JSON.parse(line).msg) });
    const pool = await openPool({ logger });
    await pool.createVolume('a', 2 * MiB);
    const a = await pool.open('a');
    const image = Buffer.alloc(2 * MiB);
    await scatter(a, image, 1, 100);
    await pool.clone('a', 'keep');
    const keepImage = Buffer.from(image);
    await scatter(a, image, 2, 5);
    await pool.snapshot('a', 's1');
    await scatter(a, image, 3, 200);
    await pool.snapshot('a', 's2');
    const s2Image = Buffer.from(image);
    await pool.delete('s1');
    await pool.idle();
    // s1's layer (5 blocks of its own) went into s2's (about 200): not the other way round.
    expect(messages).toContain('folded a frozen layer');
    expect(messages).not.toContain('absorbed a frozen layer into its parent');
    expect((await pool.usage()).layers).toBe(4);
    expect(sameBytes(await readBytes(a, 0, image.length), image)).toBe('same');
    expect(sameBytes(await readBytes(await pool.open('s2'), 0, image.length), s2Image)).toBe('same');
    expect(sameBytes(await readBytes(await pool.open('keep'), 0, image.length), keepImage)).toBe('same');
  });
});
