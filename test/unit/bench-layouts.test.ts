import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ROWS, type Row } from '../../scripts/bench-fio.js';
import {
  CHAIN_DEPTH,
  dirtiedBy,
  diskEstimate,
  LAYOUTS,
  layoutRuns,
  levelBlocks,
  levelVolumeName,
  qemuIoScript,
  randomBlocks,
  seededRandom,
} from '../../scripts/bench-layouts.js';

const GiB = 2 ** 30;

function row(id: string): Row {
  return ROWS.find((candidate) => candidate.id === id)!;
}

describe('seededRandom', () => {
  it('repeats its sequence for a seed and stays in [0, 1)', () => {
    const a = seededRandom(7);
    const b = seededRandom(7);
    const values = Array.from({ length: 1000 }, () => a());
    expect(Array.from({ length: 1000 }, () => b())).toEqual(values);
    expect(values.every((value) => value >= 0 && value < 1)).toBe(true);
    expect(seededRandom(8)()).not.toBe(values[0]);
  });
});

describe('randomBlocks', () => {
  it('chooses `count` distinct blocks below `total`', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 5000 }), fc.nat(), fc.double({ min: 0, max: 1, noNaN: true }), (total, seed, share) => {
        const count = Math.floor(total * share);
        const blocks = [...randomBlocks(total, count, seed)];
        expect(blocks).toHaveLength(count);
        expect(new Set(blocks).size).toBe(count);
        expect(blocks.every((block) => Number.isInteger(block) && block >= 0 && block < total)).toBe(true);
      }),
    );
  });

  it('spaced: no two chosen blocks touch, so each is an extent of its own', () => {
    fc.assert(
      fc.property(fc.integer({ min: 2, max: 2000 }), fc.nat(), (total, seed) => {
        const count = Math.floor(total / 2);
        const blocks = [...randomBlocks(total, count, seed, true)].sort((a, b) => a - b);
        expect(blocks.every((block) => block < total)).toBe(true);
        expect(blocks.every((block, i) => i === 0 || block - blocks[i - 1]! > 1)).toBe(true);
      }),
    );
  });

  it('is the same for the same seed, different for another, and not in ascending order', () => {
    const a = [...randomBlocks(1 << 20, 1000, 1)];
    expect([...randomBlocks(1 << 20, 1000, 1)]).toEqual(a);
    expect([...randomBlocks(1 << 20, 1000, 2)]).not.toEqual(a);
    expect([...a].sort((x, y) => x - y)).not.toEqual(a);
  });

  it('refuses more blocks than there are', () => {
    expect(() => randomBlocks(10, 11, 1)).toThrow(RangeError);
    expect(() => randomBlocks(10, 6, 1, true)).toThrow(RangeError);
    expect(randomBlocks(10, 10, 1)).toHaveLength(10);
  });
});

describe('chain levels', () => {
  it('each level writes 1/1024 of the blocks, the same ones on every call, different from level to level', () => {
    const one = levelBlocks(4 * GiB, 1);
    expect(one).toHaveLength(1024);
    expect([...levelBlocks(4 * GiB, 1)]).toEqual([...one]);
    const two = new Set(levelBlocks(4 * GiB, 2));
    expect([...one].filter((block) => two.has(block)).length).toBeLessThan(10);
  });

  it('writes at least one block in a small export and knows only levels 1..32', () => {
    expect(levelBlocks(64 * 4096, 1)).toHaveLength(1);
    expect(() => levelBlocks(GiB, 0)).toThrow(RangeError);
    expect(() => levelBlocks(GiB, CHAIN_DEPTH + 1)).toThrow(RangeError);
  });

  it('names levels in order and the top level after the export', () => {
    expect(levelVolumeName(1, 'bench')).toBe('level-01');
    expect(levelVolumeName(31, 'bench')).toBe('level-31');
    expect(levelVolumeName(CHAIN_DEPTH, 'bench')).toBe('bench');
  });
});

describe('qemuIoScript', () => {
  it('writes each block once, quietly, at its byte offset, then quits', () => {
    expect(qemuIoScript([0, 3])).toBe('write -q -P 0x5a 0 4096\nwrite -q -P 0x5a 12288 4096\nquit\n');
  });
});

describe('layout rules', () => {
  it('runs every row on every layout except reads on an empty volume', () => {
    for (const layout of LAYOUTS) {
      for (const candidate of ROWS) {
        const reads = candidate.rw === 'read' || candidate.rw === 'randread';
        expect(layoutRuns(layout, candidate)).toBe(!(layout === 'fresh' && reads));
      }
    }
  });

  it('rebuilds after writes on every layout but plain, never after reads', () => {
    expect(dirtiedBy('plain', row('randwrite-4k-qd1'))).toBe(false);
    for (const layout of ['fresh', 'clone', 'depth32'] as const) {
      expect(dirtiedBy(layout, row('write-1m-qd8'))).toBe(true);
      expect(dirtiedBy(layout, row('randread-4k-qd32'))).toBe(false);
    }
  });
});

describe('diskEstimate', () => {
  it('plain volumes only: one export each, plus one for a job to fill', () => {
    const exports = Array.from({ length: 5 }, () => ({ layout: 'plain' as const, ownBase: false }));
    expect(diskEstimate(exports, 4 * GiB)).toBe(24 * GiB);
  });

  it('clonebd pools hold their own base; the others share one base and one qcow2 chain', () => {
    const clonebd = [
      { layout: 'plain' as const, ownBase: true },
      { layout: 'fresh' as const, ownBase: true },
      { layout: 'clone' as const, ownBase: true },
      { layout: 'depth32' as const, ownBase: true },
    ];
    expect(diskEstimate(clonebd, 4 * GiB)).toBe(16 * GiB);
    const qemu = [
      { layout: 'clone' as const, ownBase: false },
      { layout: 'depth32' as const, ownBase: false },
      { layout: 'depth32' as const, ownBase: false },
    ];
    // 31 shared levels × 1024 clusters of 64 KiB
    expect(diskEstimate(qemu, 4 * GiB)).toBe(8 * GiB + 31 * 1024 * 65536);
  });
});
