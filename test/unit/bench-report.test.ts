import { describe, expect, it } from 'vitest';
import type { Row } from '../../scripts/bench-fio.js';
import type { Layout } from '../../scripts/bench-layouts.js';
import {
  controlEntries,
  controlSummary,
  layoutRatioEntries,
  markdownReport,
  ratioEntries,
  rowGroups,
  summariseSamples,
  svgChart,
  type Sample,
} from '../../scripts/bench-report.js';

const READ: Row = { id: 'rr', label: '4 KiB random read QD1', rw: 'randread', blockSize: 4096, iodepth: 1, metric: 'iops' };
const SEQ: Row = { id: 'sr', label: '1 MiB sequential read QD8', rw: 'read', blockSize: 1 << 20, iodepth: 8, metric: 'bandwidth' };
const WRITE: Row = { id: 'rw', label: '4 KiB random write QD1', rw: 'randwrite', blockSize: 4096, iodepth: 1, metric: 'iops' };
const PLAIN: Layout[] = ['plain'];

function sample(target: string, row: Row, round: number, iops: number, extra: Partial<Sample> = {}): Sample {
  return {
    round,
    row: row.id,
    layout: 'plain',
    cache: 'warm',
    target,
    iops,
    bytesPerSecond: iops * row.blockSize,
    ios: iops * 10,
    runtimeMs: 10_000,
    cpuMicrosPerIo: 10,
    peakRssBytes: 50 * 2 ** 20,
    fioCpuPercent: 40,
    ...extra,
  };
}

/** Three rounds of every target on both rows; `scale` multiplies each target's figures. */
function threeRounds(scale: Record<string, number>): Sample[] {
  const samples: Sample[] = [];
  for (const round of [1, 2, 3]) {
    for (const [target, factor] of Object.entries(scale)) {
      samples.push(sample(target, READ, round, factor * [900, 1000, 1200][round - 1]!));
      samples.push(sample(target, SEQ, round, factor * [1800, 2000, 2100][round - 1]!));
    }
  }
  return samples;
}

describe('summariseSamples', () => {
  it('gives each (row, cache, target) its median, min and max over the rounds', () => {
    const cells = summariseSamples(threeRounds({ a: 1 }));
    const read = cells.find((cell) => cell.row === 'rr' && cell.target === 'a')!;
    expect(read.iops).toEqual({ median: 1000, min: 900, max: 1200, count: 3 });
    expect(read.bytesPerSecond.median).toBe(1000 * 4096);
    expect(read.cpuMicrosPerIo?.median).toBe(10);
    expect(read.peakRssBytes).toBe(50 * 2 ** 20);
  });

  it('keeps cold and warm apart and takes the highest peak RSS', () => {
    const cells = summariseSamples([
      sample('a', READ, 1, 100, { cache: 'cold', peakRssBytes: 10 }),
      sample('a', READ, 1, 900, { peakRssBytes: 30 }),
      sample('a', READ, 2, 700, { peakRssBytes: 20 }),
    ]);
    expect(cells).toHaveLength(2);
    expect(cells.find((cell) => cell.cache === 'cold')!.iops.median).toBe(100);
    const warm = cells.find((cell) => cell.cache === 'warm')!;
    expect(warm.iops.median).toBe(800);
    expect(warm.peakRssBytes).toBe(30);
  });

  it('leaves CPU and RSS out when no run could measure them', () => {
    const [cell] = summariseSamples([sample('a', READ, 1, 1, { cpuMicrosPerIo: undefined, peakRssBytes: undefined })]);
    expect(cell!.cpuMicrosPerIo).toBeUndefined();
    expect(cell!.peakRssBytes).toBeUndefined();
  });
});

describe('ratioEntries', () => {
  it('divides medians of the row metric: IOPS for small blocks, bandwidth for large', () => {
    const cells = summariseSamples(threeRounds({ clonebd: 1.5, nbdkit: 1 }));
    const entries = ratioEntries(cells, [READ, SEQ], PLAIN, ['warm'], 'clonebd', 'nbdkit');
    expect(entries).toHaveLength(2);
    for (const entry of entries) {
      expect(entry.numerator).toBe('clonebd');
      expect(entry.denominator).toBe('nbdkit');
      expect(entry.ratio).toBeCloseTo(1.5, 10);
    }
  });

  it('uses medians, so one outlier round does not move the ratio', () => {
    const samples = threeRounds({ clonebd: 1, nbdkit: 1 }).map((one) =>
      one.target === 'clonebd' && one.round === 3 && one.row === 'rr' ? { ...one, iops: 1e9 } : one,
    );
    const [entry] = ratioEntries(summariseSamples(samples), [READ], PLAIN, ['warm'], 'clonebd', 'nbdkit');
    expect(entry!.ratio).toBe(1);
  });

  it('has no ratio where a side has no samples', () => {
    const cells = summariseSamples(threeRounds({ clonebd: 1 }));
    const entries = ratioEntries(cells, [READ], PLAIN, ['warm', 'cold'], 'clonebd', 'nbdkit');
    expect(entries.map((entry) => entry.ratio)).toEqual([undefined, undefined]);
  });
});

describe('controlEntries', () => {
  it('accepts the same server twice within 1.0 ± 0.1 and flags it outside', () => {
    const inside = controlEntries(summariseSamples(threeRounds({ 'nbdkit-2': 1.08, nbdkit: 1 })), [READ, SEQ], PLAIN, ['warm'], 'nbdkit-2', 'nbdkit');
    expect(inside.every((entry) => entry.withinTolerance)).toBe(true);
    expect(controlSummary(inside).join('\n')).toMatch(/all within 1\.0 ± 0\.1/);
    const outside = controlEntries(summariseSamples(threeRounds({ 'nbdkit-2': 1.2, nbdkit: 1 })), [READ], PLAIN, ['warm'], 'nbdkit-2', 'nbdkit');
    expect(outside[0]!.withinTolerance).toBe(false);
    expect(controlSummary(outside).join('\n')).toMatch(/NOT all within/);
  });

  it('does not pass a control that has no figures', () => {
    const [entry] = controlEntries(summariseSamples(threeRounds({ nbdkit: 1 })), [READ], PLAIN, ['warm'], 'nbdkit-2', 'nbdkit');
    expect(entry!.withinTolerance).toBe(false);
  });
});

describe('markdownReport', () => {
  const cells = summariseSamples(threeRounds({ clonebd: 1.5, nbdkit: 1, 'nbdkit-2': 1 }));
  const markdown = markdownReport({
    title: 'clonebd vs nbdkit',
    preamble: ['Machine: Test CPU, 2 cores'],
    rows: [READ, SEQ],
    layouts: PLAIN,
    caches: ['warm'],
    targets: ['clonebd', 'nbdkit', 'nbdkit-2'],
    subject: 'clonebd',
    references: ['nbdkit'],
    cells,
    ratios: ratioEntries(cells, [READ, SEQ], PLAIN, ['warm'], 'clonebd', 'nbdkit'),
    layoutRatios: [],
    controls: controlEntries(cells, [READ, SEQ], PLAIN, ['warm'], 'nbdkit-2', 'nbdkit'),
    warnings: ['something to know'],
  });
  const lines = markdown.split('\n');

  it('names the machine and has a header, an alignment line and one line per row', () => {
    expect(markdown).toContain('Machine: Test CPU, 2 cores');
    const header = lines.findIndex((line) => line.startsWith('|  | clonebd | nbdkit | nbdkit-2 | clonebd ÷ nbdkit |'));
    expect(header).toBeGreaterThan(0);
    expect(lines[header + 1]).toBe('| --- | --: | --: | --: | --: |');
    expect(lines[header + 2]).toMatch(/^\| 4 KiB random read QD1 \(IOPS\) \| 1.50k \(1.35k–1.80k\) \| 1.00k \(900–1.20k\) \|/);
    expect(lines[header + 2]).toMatch(/\| 1\.50× \|$/);
    // 1.5 × 2000 × 1 MiB/s
    expect(lines[header + 3]).toMatch(/^\| 1 MiB sequential read QD8 \(MB\/s\) \| 3\.15 GB\/s \(/);
  });

  it('every table line has as many cells as its header', () => {
    const tables = lines.filter((line) => line.startsWith('|'));
    let width = 0;
    for (const line of tables) {
      const cellsInLine = line.split(' | ').length;
      if (line.startsWith('|  |')) width = cellsInLine;
      expect(cellsInLine).toBe(width);
    }
  });

  it('reports server cost, the control and the warnings', () => {
    expect(markdown).toMatch(/\| 4 KiB random read QD1, warm \| 10\.0 µs \| 10\.0 µs \| 10\.0 µs \|/);
    expect(markdown).toMatch(/\| peak RSS \(VmHWM, any run\) \| 50 MiB \| 50 MiB \| 50 MiB \|/);
    expect(markdown).toMatch(/Control \(same server twice\) nbdkit-2 ÷ nbdkit: 1\.00×–1\.00×/);
    expect(markdown).toContain('> **Warning:** something to know');
  });
});

describe('svgChart', () => {
  const cells = summariseSamples(threeRounds({ 'a<b': 2, ref: 1 }));
  const svg = svgChart({
    title: 'a<b & ref',
    subtitle: 'test',
    groups: rowGroups([READ, SEQ], PLAIN),
    caches: ['warm', 'cold'],
    series: [{ label: 'a<b ÷ ref', control: false, entries: ratioEntries(cells, [READ, SEQ], PLAIN, ['warm', 'cold'], 'a<b', 'ref') }],
  });

  it('is one svg element with every text escaped', () => {
    expect(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
    expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
    expect(svg).not.toContain('a<b');
    expect(svg).toContain('a&#60;b');
  });

  it('draws a bar labelled with each ratio it has, and says where it has none', () => {
    expect(svg.match(/>2\.00×</g)).toHaveLength(2);
    expect(svg.match(/>no data</g)).toHaveLength(2);
  });
});

/** One round of `target` on `layout`: every row's IOPS is `iops`. */
function onLayout(target: string, layout: Layout, rows: readonly Row[], iops: number): Sample[] {
  return rows.map((one) => sample(target, one, 1, iops, { layout }));
}

describe('layouts', () => {
  const samples = [
    ...onLayout('clonebd', 'plain', [READ, WRITE], 1000),
    ...onLayout('clonebd', 'fresh', [WRITE], 800),
    ...onLayout('clonebd', 'clone', [READ, WRITE], 900),
    ...onLayout('clonebd', 'depth32', [READ, WRITE], 950),
    ...onLayout('qemu', 'plain', [READ, WRITE], 1000),
    ...onLayout('qemu', 'fresh', [WRITE], 500),
    ...onLayout('qemu', 'clone', [READ, WRITE], 100),
    ...onLayout('qemu', 'depth32', [READ, WRITE], 57),
  ];
  const cells = summariseSamples(samples);
  const layouts: Layout[] = ['plain', 'fresh', 'clone', 'depth32'];

  it('keeps each layout a cell of its own', () => {
    expect(cells).toHaveLength(14);
    expect(cells.find((cell) => cell.target === 'qemu' && cell.layout === 'depth32' && cell.row === 'rr')!.iops.median).toBe(57);
  });

  it('compares servers on the same layout, and has no read row on an empty volume', () => {
    const entries = ratioEntries(cells, [READ, WRITE], layouts, ['warm'], 'clonebd', 'qemu');
    expect(entries.map((entry) => [entry.row, entry.layout, entry.ratio])).toEqual([
      ['rr', 'plain', 1],
      ['rr', 'clone', 9],
      ['rr', 'depth32', 950 / 57],
      ['rw', 'plain', 1],
      ['rw', 'fresh', 1.6],
      ['rw', 'clone', 9],
      ['rw', 'depth32', 950 / 57],
    ]);
  });

  it('compares a server with itself across layouts, on the rows both layouts run', () => {
    const clone = layoutRatioEntries(cells, [READ, WRITE], ['warm'], 'clonebd', 'clone', 'plain');
    expect(clone.map((entry) => [entry.row, entry.ratio])).toEqual([
      ['rr', 0.9],
      ['rw', 0.9],
    ]);
    const firstWrites = layoutRatioEntries(cells, [READ, WRITE], ['warm'], 'qemu', 'clone', 'fresh');
    expect(firstWrites.map((entry) => [entry.row, entry.ratio])).toEqual([['rw', 0.2]]);
  });

  it('groups rows by layout, naming the layout only when there is a choice', () => {
    expect(rowGroups([READ, WRITE], ['plain']).map((group) => `${group.row.id}${group.suffix}`)).toEqual(['rr', 'rw']);
    expect(rowGroups([READ, WRITE], ['fresh', 'depth32']).map((group) => `${group.row.id}${group.suffix}`)).toEqual([
      'rr, clone at depth 32',
      'rw, fresh (empty)',
      'rw, clone at depth 32',
    ]);
  });

  it('reports a line per row and layout, each server against its own plain volume, and the other comparisons', () => {
    const layoutRatios = ['clonebd', 'qemu'].flatMap((target) => [
      ...layoutRatioEntries(cells, [READ, WRITE], ['warm'], target, 'clone', 'plain'),
      ...layoutRatioEntries(cells, [READ, WRITE], ['warm'], target, 'depth32', 'plain'),
      ...layoutRatioEntries(cells, [READ, WRITE], ['warm'], target, 'depth32', 'clone'),
      ...layoutRatioEntries(cells, [READ, WRITE], ['warm'], target, 'clone', 'fresh'),
    ]);
    const markdown = markdownReport({
      title: 't',
      preamble: [],
      rows: [READ, WRITE],
      layouts,
      caches: ['warm'],
      targets: ['clonebd', 'qemu'],
      subject: 'clonebd',
      references: ['qemu'],
      cells,
      ratios: ratioEntries(cells, [READ, WRITE], layouts, ['warm'], 'clonebd', 'qemu'),
      layoutRatios,
      controls: [],
      warnings: [],
    });
    const lines = markdown.split('\n');
    expect(lines).toContain('|  | clonebd | qemu | clonebd ÷ qemu | clonebd ÷ its plain | qemu ÷ its plain |');
    expect(lines).toContain('| 4 KiB random read QD1 (IOPS), plain | 1.00k | 1.00k | 1.00× | — | — |');
    expect(lines).toContain('| 4 KiB random read QD1 (IOPS), clone at depth 32 | 950 | 57 | 16.67× | 0.95× | 0.06× |');
    expect(lines).toContain('| 4 KiB random write QD1 (IOPS), fresh (empty) | 800 | 500 | 1.60× | — | — |');
    expect(lines.some((line) => line.startsWith('| 4 KiB random read QD1 (IOPS), fresh'))).toBe(false);
    expect(lines).toContain(
      '|  | clonebd depth32 ÷ clone | qemu depth32 ÷ clone | clonebd clone ÷ fresh | qemu clone ÷ fresh |',
    );
    expect(lines).toContain('| 4 KiB random read QD1 (IOPS) | 1.06× | 0.57× | — | — |');
    expect(lines).toContain('| 4 KiB random write QD1 (IOPS) | 1.06× | 0.57× | 1.13× | 0.20× |');
    expect(lines).toContain('| 4 KiB random write QD1, clone, warm | 10.0 µs | 10.0 µs |');
    let width = 0;
    for (const line of lines.filter((candidate) => candidate.startsWith('|'))) {
      if (line.startsWith('|  |')) width = line.split(' | ').length;
      expect(line.split(' | ').length).toBe(width);
    }
  });
});
