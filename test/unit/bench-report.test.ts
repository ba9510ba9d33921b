import { describe, expect, it } from 'vitest';
import type { Row } from '../../scripts/bench-fio.js';
import {
  controlEntries,
  controlSummary,
  markdownReport,
  ratioEntries,
  summariseSamples,
  svgChart,
  type Sample,
} from '../../scripts/bench-report.js';

const READ: Row = { id: 'rr', label: '4 KiB random read QD1', rw: 'randread', blockSize: 4096, iodepth: 1, metric: 'iops' };
const SEQ: Row = { id: 'sr', label: '1 MiB sequential read QD8', rw: 'read', blockSize: 1 << 20, iodepth: 8, metric: 'bandwidth' };

function sample(target: string, row: Row, round: number, iops: number, extra: Partial<Sample> = {}): Sample {
  return {
    round,
    row: row.id,
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
    const entries = ratioEntries(cells, [READ, SEQ], ['warm'], 'clonebd', 'nbdkit');
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
    const [entry] = ratioEntries(summariseSamples(samples), [READ], ['warm'], 'clonebd', 'nbdkit');
    expect(entry!.ratio).toBe(1);
  });

  it('has no ratio where a side has no samples', () => {
    const cells = summariseSamples(threeRounds({ clonebd: 1 }));
    const entries = ratioEntries(cells, [READ], ['warm', 'cold'], 'clonebd', 'nbdkit');
    expect(entries.map((entry) => entry.ratio)).toEqual([undefined, undefined]);
  });
});

describe('controlEntries', () => {
  it('accepts the same server twice within 1.0 ± 0.1 and flags it outside', () => {
    const inside = controlEntries(summariseSamples(threeRounds({ 'nbdkit-2': 1.08, nbdkit: 1 })), [READ, SEQ], ['warm'], 'nbdkit-2', 'nbdkit');
    expect(inside.every((entry) => entry.withinTolerance)).toBe(true);
    expect(controlSummary(inside).join('\n')).toMatch(/all within 1\.0 ± 0\.1/);
    const outside = controlEntries(summariseSamples(threeRounds({ 'nbdkit-2': 1.2, nbdkit: 1 })), [READ], ['warm'], 'nbdkit-2', 'nbdkit');
    expect(outside[0]!.withinTolerance).toBe(false);
    expect(controlSummary(outside).join('\n')).toMatch(/NOT all within/);
  });

  it('does not pass a control that has no figures', () => {
    const [entry] = controlEntries(summariseSamples(threeRounds({ nbdkit: 1 })), [READ], ['warm'], 'nbdkit-2', 'nbdkit');
    expect(entry!.withinTolerance).toBe(false);
  });
});

describe('markdownReport', () => {
  const cells = summariseSamples(threeRounds({ clonebd: 1.5, nbdkit: 1, 'nbdkit-2': 1 }));
  const markdown = markdownReport({
    title: 'clonebd vs nbdkit',
    preamble: ['Machine: Test CPU, 2 cores'],
    rows: [READ, SEQ],
    caches: ['warm'],
    targets: ['clonebd', 'nbdkit', 'nbdkit-2'],
    subject: 'clonebd',
    references: ['nbdkit'],
    cells,
    ratios: ratioEntries(cells, [READ, SEQ], ['warm'], 'clonebd', 'nbdkit'),
    controls: controlEntries(cells, [READ, SEQ], ['warm'], 'nbdkit-2', 'nbdkit'),
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
    rows: [READ, SEQ],
    caches: ['warm', 'cold'],
    series: [{ label: 'a<b ÷ ref', control: false, entries: ratioEntries(cells, [READ, SEQ], ['warm', 'cold'], 'a<b', 'ref') }],
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
