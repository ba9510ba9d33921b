import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BlockMap, type MapNode } from '../../../src/store/block-map.js';
import { Pool } from '../../../src/store/index.js';
import { tempDir } from '../../helpers/store-pool.js';

function nodes(map: BlockMap): Set<MapNode> {
  const seen = new Set<MapNode>();
  const walk = (node: MapNode): void => {
    seen.add(node);
    if (!node.leaf) node.children.forEach(walk);
  };
  if (map.root !== null) walk(map.root);
  return seen;
}

describe('BlockMap sharing', () => {
  it('leaves the old version intact and shares every node off the changed path', () => {
    let map = BlockMap.EMPTY;
    for (let i = 0; i < 100_000; i++) map = map.assign(i * 2, i * 2 + 1, 16 + (i % 3));
    const changed = map.assign(1001, 1002, 99);
    expect(map.get(1001)).toBe(0);
    expect(changed.get(1001)).toBe(99);
    const before = nodes(map);
    const after = nodes(changed);
    const fresh = [...after].filter((node) => !before.has(node));
    // One root-to-leaf path (plus at most a split) is new; everything else is shared.
    expect(fresh.length).toBeLessThanOrEqual(8);
    expect(after.size - fresh.length).toBeGreaterThan(before.size - 8);
  });

  it('merges touching extents of one value, so sequential writes stay one extent', () => {
    let map = BlockMap.EMPTY;
    for (let i = 0; i < 10_000; i++) map = map.assign(i, i + 1, 16);
    let extents = 0;
    map.extents(0, Infinity, () => {
      extents++;
    });
    expect(extents).toBe(1);
    expect(nodes(map).size).toBe(1);
  });
});

describe('O(1) clone', () => {
  let dir: { path: string; remove: () => Promise<void> };
  beforeEach(async () => {
    dir = await tempDir();
  });
  afterEach(async () => {
    await dir.remove();
  });

  it('clones a volume with 100,000 extents without copying its map', async () => {
    const pool = await Pool.open(dir.path);
    try {
      await pool.createVolume('base', 1024 * 1024 * 1024);
      const base = await pool.open('base');
      await base.write(0, Buffer.alloc(8 * 1024 * 1024, 7), false);
      await pool.clone('base', 'a');
      // 100,000 separate extents in a's map: every other block masked with zeros over the base.
      const a = await pool.open('a');
      for (let batch = 0; batch < 100_000; batch += 1000) {
        await Promise.all(Array.from({ length: 1000 }, (_, i) => a.trim((batch + i) * 8192, 4096, false)));
      }
      await a.flush();
      const journal = async (): Promise<number> => {
        const name = (await readdir(dir.path)).find((entry) => entry.startsWith('journal.'))!;
        return (await stat(join(dir.path, name))).size;
      };
      const before = await journal();
      await pool.clone('a', 'b');
      await pool.snapshot('b', 's');
      await pool.clone('s', 'c');
      // The records name the source and the new layers only, never the map.
      expect(await journal()).toBeLessThan(before + 1024);
      const c = await pool.open('c');
      const pieces = await c.read(0, 4 * 8192);
      expect(pieces.map((piece) => piece.kind)).toEqual(['zero', 'data', 'zero', 'data', 'zero', 'data', 'zero', 'data']);
      // The checkpoint stores each shared map node once: more names, the same nodes.
      await pool.close();
      const alone = (await stat(join(dir.path, 'checkpoint'))).size;
      const reopened = await Pool.open(dir.path);
      for (let i = 0; i < 10; i++) await reopened.clone('a', `x${i}`);
      await reopened.close();
      expect((await stat(join(dir.path, 'checkpoint'))).size).toBeLessThan(alone * 1.05);
    } finally {
      await pool.close();
    }
  });
});
