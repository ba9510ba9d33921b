import { describe, expect, it } from 'vitest';
import {
  CLONE_CASES,
  cloneTimingMarkdown,
  memoryMarkdown,
  sizeLabel,
  spread,
  summariseTimes,
  type CloneMemoryResult,
  type CloneTimingResult,
  type MapMemoryResult,
  type TimingSummary,
} from '../../scripts/bench-scale-report.js';

const MiB = 2 ** 20;

function times(medianMs: number): TimingSummary {
  return { medianMs, p90Ms: medianMs * 2, minMs: medianMs / 2, maxMs: medianMs * 3, count: 50 };
}

function tableWidthsAgree(lines: readonly string[]): void {
  let width = 0;
  for (const line of lines) {
    if (!line.startsWith('|')) {
      width = 0;
      continue;
    }
    const cells = line.split(' | ').length;
    if (width === 0) width = cells;
    expect(cells).toBe(width);
  }
}

describe('CLONE_CASES', () => {
  it('covers 1 GiB, 1 TiB and 16 TiB empty, and 0, 10,000 and 100,000 extents at one size', () => {
    expect(CLONE_CASES.filter((one) => one.series === 'size').map((one) => [one.size / 2 ** 30, one.extents])).toEqual([
      [1, 0],
      [1024, 0],
      [16384, 0],
    ]);
    const fragmentation = CLONE_CASES.filter((one) => one.series === 'fragmentation');
    expect(fragmentation.map((one) => one.extents)).toEqual([0, 10_000, 100_000]);
    expect(new Set(fragmentation.map((one) => one.size)).size).toBe(1);
    expect(new Set(CLONE_CASES.map((one) => one.id)).size).toBe(CLONE_CASES.length);
  });
});

describe('summariseTimes and spread', () => {
  it('gives median, nearest-rank p90, min, max and count', () => {
    const values = Array.from({ length: 50 }, (_, i) => 50 - i);
    expect(summariseTimes(values)).toEqual({ medianMs: 25.5, p90Ms: 45, minMs: 1, maxMs: 50, count: 50 });
  });

  it('spread is the largest median over the smallest, skipping missing figures', () => {
    expect(spread([times(2), undefined, times(3), times(4)])).toBe(2);
    expect(spread([times(2)])).toBeUndefined();
    expect(spread([times(0), times(1)])).toBeUndefined();
  });
});

describe('sizeLabel', () => {
  it('names whole binary units and falls back to GiB with decimals', () => {
    expect(sizeLabel(2 ** 30)).toBe('1 GiB');
    expect(sizeLabel(16 * 2 ** 40)).toBe('16 TiB');
    expect(sizeLabel(256 * MiB)).toBe('256 MiB');
    expect(sizeLabel(1.5 * 2 ** 30)).toBe('1536 MiB');
    expect(sizeLabel(12345)).toBe('0.00 GiB');
  });
});

describe('cloneTimingMarkdown', () => {
  const results: CloneTimingResult[] = CLONE_CASES.map((one, i) => ({
    case: one,
    measuredExtents: one.extents === 100_000 ? 99_990 : one.extents > 0 ? one.extents : undefined,
    clone: i === 1 ? undefined : times(i + 1),
    poolStatus: times(0.5),
    qemuImg: times(10),
    notes: i === 1 ? ['clonebd failed: EIO'] : [],
  }));
  const lines = cloneTimingMarkdown(results, 50);

  it('has a line per case with clonebd, its diagnostic, qemu-img and the ratios', () => {
    expect(lines).toContain('| 1 GiB, empty | 1.00 | 2.00 | 0.50–3.00 | 0.50 | 10.0 | 20.0 | 5.00–30.0 | 0.10× | 0.20× |');
    expect(lines).toContain('| 1 TiB, empty | — | — | — | 0.50 | 10.0 | 20.0 | 5.00–30.0 | — | — |');
    expect(lines.filter((line) => line.startsWith('| ')).length).toBe(2 + CLONE_CASES.length);
    tableWidthsAgree(lines);
  });

  it('shows the extents the server reports where they differ from the case', () => {
    expect(lines.some((line) => line.startsWith('| 4 GiB, 100,000 extents (server reports 99,990) |'))).toBe(true);
    expect(lines.some((line) => line.startsWith('| 4 GiB, 10,000 extents |'))).toBe(true);
  });

  it('says how flat each series is, and carries the notes', () => {
    // sizes: medians 1 and 3 (the 1 TiB case failed); fragmentation: 4, 5, 6
    expect(lines).toContain('Spread across sizes (largest median ÷ smallest; 1.00× is flat): clonebd 3.00×, qemu-img 1.00×.');
    expect(lines).toContain('Spread across fragmentation (largest median ÷ smallest; 1.00× is flat): clonebd 1.50×, qemu-img 1.00×.');
    expect(lines).toContain('> 1 TiB, empty: clonebd failed: EIO');
  });
});

describe('memoryMarkdown', () => {
  const clones: CloneMemoryResult = {
    clones: 1000,
    baseSize: 2 ** 30,
    rssIdleBytes: 60 * MiB,
    rssBaseBytes: 100 * MiB,
    rssClonesBytes: 120 * MiB,
    createSeconds: 12.34,
    rssRestartedBytes: 70 * MiB,
    connections: 1000,
    rssConnectedBytes: 128 * MiB,
    rssWrittenBytes: 140 * MiB,
    openFiles: 2010,
    peakRssBytes: 150 * MiB,
  };
  const map: MapMemoryResult = {
    volumeSize: 16 * 2 ** 30,
    blocks: 1_000_000,
    flushEvery: 10_000,
    extents: 800_000,
    writeSeconds: 80,
    rssAfterWriteBytes: 200 * MiB,
    peakAfterWriteBytes: 250 * MiB,
    rssAfterRestartBytes: 96 * MiB,
    restartSeconds: 2,
    checkpointBytes: 20 * MiB,
    journalBytes: 3 * MiB,
    probeHeapBytes: 32 * MiB,
    probeOpenMs: 1500,
  };

  it('reports each state of the clones part against the 256 MiB budget', () => {
    const lines = memoryMarkdown(clones, undefined);
    expect(lines).toContain('#### clonebd RSS with 1,000 clones exported');
    expect(lines).toContain('| 1,000 clones created | 120.0 MiB | 0.47× |');
    expect(lines).toContain('| 1,000 connections open, 4 KiB read on each | 128.0 MiB | 0.50× |');
    expect(lines).toContain('| … and 4 KiB written into each clone (2,010 open descriptors) | 140.0 MiB | 0.55× |');
    expect(lines.some((line) => line.includes('One 1 GiB base') && line.includes('12.3 s'))).toBe(true);
    tableWidthsAgree(lines);
  });

  it('reports map memory against the 64 MiB budget, measured and estimated', () => {
    const lines = memoryMarkdown(undefined, map);
    expect(lines).toContain('#### clonebd map memory: one volume with 1,000,000 random 4 KiB blocks written');
    expect(lines).toContain('| heap of an idle process after opening the pool (1.5 s to open), 42 B per extent | 32.0 MiB | 0.50× |');
    // 800,000 extents × 35 B
    expect(lines).toContain('| block-map.ts estimate (35 B per extent) | 26.7 MiB | 0.42× |');
    expect(lines).toContain('| server RSS after a restart (maps loaded; ready in 2.0 s) | 96.0 MiB | 1.50× |');
    tableWidthsAgree(lines);
  });

  it('leaves out a part that did not run', () => {
    expect(memoryMarkdown(undefined, undefined)).toEqual([]);
  });
});
