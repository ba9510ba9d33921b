/**
 * From samples to what people read: per-row summaries, the ratio of the subject (clonebd) to each
 * reference, the same-server control check, a markdown table for the README and an SVG chart.
 * Pure functions of the samples; nothing here touches files or processes.
 */
import type { CacheState } from './bench-cache.js';
import type { Row } from './bench-fio.js';
import { ratio, summarise, type Summary } from './bench-stats.js';

/** One fio run of one row against one server. */
export interface Sample {
  round: number;
  row: string;
  cache: CacheState;
  target: string;
  iops: number;
  bytesPerSecond: number;
  ios: number;
  runtimeMs: number;
  /** Server CPU (user + system, all threads) during the run, per completed I/O. */
  cpuMicrosPerIo: number | undefined;
  /** The server's VmHWM at the end of the run, reset before it where the kernel allows. */
  peakRssBytes: number | undefined;
  fioCpuPercent: number;
}

export interface Cell {
  row: string;
  cache: CacheState;
  target: string;
  iops: Summary;
  bytesPerSecond: Summary;
  cpuMicrosPerIo: Summary | undefined;
  peakRssBytes: number | undefined;
}

export interface RatioEntry {
  row: string;
  cache: CacheState;
  numerator: string;
  denominator: string;
  /** Of the medians of the row's metric; undefined when a side has no samples. */
  ratio: number | undefined;
}

export interface ControlEntry extends RatioEntry {
  withinTolerance: boolean;
}

export const CONTROL_TOLERANCE = 0.1;

function definedNumbers(values: readonly (number | undefined)[]): number[] {
  return values.filter((value): value is number => value !== undefined && Number.isFinite(value));
}

/** One cell per (row, cache state, target) that has samples, in first-seen order. */
export function summariseSamples(samples: readonly Sample[]): Cell[] {
  const groups = new Map<string, Sample[]>();
  for (const sample of samples) {
    const key = JSON.stringify([sample.row, sample.cache, sample.target]);
    const group = groups.get(key);
    if (group === undefined) groups.set(key, [sample]);
    else group.push(sample);
  }
  return [...groups.values()].map((group) => {
    const first = group[0]!;
    const cpu = definedNumbers(group.map((sample) => sample.cpuMicrosPerIo));
    const rss = definedNumbers(group.map((sample) => sample.peakRssBytes));
    return {
      row: first.row,
      cache: first.cache,
      target: first.target,
      iops: summarise(group.map((sample) => sample.iops)),
      bytesPerSecond: summarise(group.map((sample) => sample.bytesPerSecond)),
      cpuMicrosPerIo: cpu.length > 0 ? summarise(cpu) : undefined,
      peakRssBytes: rss.length > 0 ? Math.max(...rss) : undefined,
    };
  });
}

export function findCell(cells: readonly Cell[], row: string, cache: CacheState, target: string): Cell | undefined {
  return cells.find((cell) => cell.row === row && cell.cache === cache && cell.target === target);
}

function metricMedian(cell: Cell | undefined, row: Row): number | undefined {
  if (cell === undefined) return undefined;
  return row.metric === 'iops' ? cell.iops.median : cell.bytesPerSecond.median;
}

/** numerator ÷ denominator on every row and cache state, from the medians of each row's metric. */
export function ratioEntries(
  cells: readonly Cell[],
  rows: readonly Row[],
  caches: readonly CacheState[],
  numerator: string,
  denominator: string,
): RatioEntry[] {
  const entries: RatioEntry[] = [];
  for (const cache of caches) {
    for (const row of rows) {
      const top = metricMedian(findCell(cells, row.id, cache, numerator), row);
      const bottom = metricMedian(findCell(cells, row.id, cache, denominator), row);
      entries.push({
        row: row.id,
        cache,
        numerator,
        denominator,
        ratio: top === undefined || bottom === undefined ? undefined : ratio(top, bottom),
      });
    }
  }
  return entries;
}

/** The control's ratio to the server it repeats; a fair harness reads 1.0 ± CONTROL_TOLERANCE. */
export function controlEntries(
  cells: readonly Cell[],
  rows: readonly Row[],
  caches: readonly CacheState[],
  control: string,
  original: string,
): ControlEntry[] {
  return ratioEntries(cells, rows, caches, control, original).map((entry) => ({
    ...entry,
    withinTolerance: entry.ratio !== undefined && Math.abs(entry.ratio - 1) <= CONTROL_TOLERANCE,
  }));
}

export function formatIops(iops: number): string {
  if (iops >= 1e6) return `${(iops / 1e6).toFixed(2)}M`;
  if (iops >= 1e4) return `${(iops / 1e3).toFixed(1)}k`;
  if (iops >= 1e3) return `${(iops / 1e3).toFixed(2)}k`;
  return iops.toFixed(0);
}

export function formatBandwidth(bytesPerSecond: number): string {
  if (bytesPerSecond >= 1e9) return `${(bytesPerSecond / 1e9).toFixed(2)} GB/s`;
  return `${(bytesPerSecond / 1e6).toFixed(0)} MB/s`;
}

export function formatRatio(value: number | undefined): string {
  return value === undefined ? '—' : `${value.toFixed(2)}×`;
}

function formatMiB(bytes: number | undefined): string {
  return bytes === undefined ? '—' : `${(bytes / 2 ** 20).toFixed(0)} MiB`;
}

function formatRange(summary: Summary, format: (value: number) => string): string {
  if (summary.count === 1) return format(summary.median);
  return `${format(summary.median)} (${format(summary.min)}–${format(summary.max)})`;
}

export interface ReportInput {
  title: string;
  /** Lines under the title: machine, method. */
  preamble: readonly string[];
  rows: readonly Row[];
  caches: readonly CacheState[];
  /** Column order. */
  targets: readonly string[];
  subject: string;
  references: readonly string[];
  cells: readonly Cell[];
  ratios: readonly RatioEntry[];
  controls: readonly ControlEntry[];
  warnings: readonly string[];
}

function tableLine(cells: readonly string[]): string {
  return `| ${cells.join(' | ')} |`;
}

function rowLabel(row: Row): string {
  return `${row.label} (${row.metric === 'iops' ? 'IOPS' : 'MB/s'})`;
}

/** Markdown ready for the README: one throughput table per cache state, then server cost. */
export function markdownReport(input: ReportInput): string {
  const lines: string[] = [`### ${input.title}`, '', ...input.preamble, ''];
  for (const cache of input.caches) {
    const ratioHeads = input.references.map((reference) => `${input.subject} ÷ ${reference}`);
    lines.push(`#### ${cache === 'warm' ? 'Warm' : 'Cold'} page cache`, '');
    lines.push(tableLine(['', ...input.targets, ...ratioHeads]));
    lines.push(tableLine(['---', ...input.targets.map(() => '--:'), ...ratioHeads.map(() => '--:')]));
    for (const row of input.rows) {
      const values = input.targets.map((target) => {
        const cell = findCell(input.cells, row.id, cache, target);
        if (cell === undefined) return '—';
        return row.metric === 'iops' ? formatRange(cell.iops, formatIops) : formatRange(cell.bytesPerSecond, formatBandwidth);
      });
      const ratios = input.references.map((reference) =>
        formatRatio(
          input.ratios.find(
            (entry) =>
              entry.row === row.id && entry.cache === cache && entry.numerator === input.subject && entry.denominator === reference,
          )?.ratio,
        ),
      );
      lines.push(tableLine([rowLabel(row), ...values, ...ratios]));
    }
    lines.push('');
  }
  lines.push('#### Server cost: CPU time per I/O (median), peak RSS', '');
  lines.push(tableLine(['', ...input.targets]));
  lines.push(tableLine(['---', ...input.targets.map(() => '--:')]));
  for (const cache of input.caches) {
    for (const row of input.rows) {
      const values = input.targets.map((target) => {
        const cpu = findCell(input.cells, row.id, cache, target)?.cpuMicrosPerIo;
        return cpu === undefined ? '—' : `${cpu.median.toFixed(1)} µs`;
      });
      lines.push(tableLine([`${row.label}, ${cache}`, ...values]));
    }
  }
  const peaks = input.targets.map((target) => {
    const rss = definedNumbers(input.cells.filter((cell) => cell.target === target).map((cell) => cell.peakRssBytes));
    return formatMiB(rss.length > 0 ? Math.max(...rss) : undefined);
  });
  lines.push(tableLine(['peak RSS (VmHWM, any run)', ...peaks]), '');
  for (const line of controlSummary(input.controls)) lines.push(line);
  for (const warning of input.warnings) lines.push(`> **Warning:** ${warning}`);
  return `${lines.join('\n').trimEnd()}\n`;
}

/** One sentence per control pair: the range of its ratios and whether all sit within tolerance. */
export function controlSummary(controls: readonly ControlEntry[]): string[] {
  const pairs = new Map<string, ControlEntry[]>();
  for (const entry of controls) {
    const key = `${entry.numerator} ÷ ${entry.denominator}`;
    pairs.set(key, [...(pairs.get(key) ?? []), entry]);
  }
  const lines: string[] = [];
  for (const [pair, entries] of pairs) {
    const values = definedNumbers(entries.map((entry) => entry.ratio));
    if (values.length === 0) {
      lines.push(`Control ${pair}: no figures.`, '');
      continue;
    }
    const ok = entries.every((entry) => entry.withinTolerance);
    lines.push(
      `Control (same server twice) ${pair}: ${formatRatio(Math.min(...values))}–${formatRatio(Math.max(...values))} ` +
        `over ${entries.length} row/cache pairs; ${ok ? 'all' : 'NOT all'} within 1.0 ± ${CONTROL_TOLERANCE}.`,
      '',
    );
  }
  return lines;
}

function escapeXml(text: string): string {
  return text.replace(/[<>&"']/g, (char) => `&#${char.charCodeAt(0)};`);
}

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#e377c2'];
const CONTROL_COLOUR = '#9a9a9a';

export interface ChartInput {
  title: string;
  subtitle: string;
  rows: readonly Row[];
  caches: readonly CacheState[];
  /** Bars: subject ÷ each reference, then each control ÷ its original in grey. */
  series: readonly { label: string; control: boolean; entries: readonly RatioEntry[] }[];
}

/** Ratios past this are drawn clipped (their printed value stays exact), so one outlier cannot squash the rest. */
const CHART_MAX_RATIO = 3;

/**
 * Horizontal bars, one group per row and one panel per cache state, each bar a ratio with its value
 * printed at its end. A dashed line marks 1.0×, so "longer than the line" reads as faster; a grey
 * band marks the control's tolerance, 0.9–1.1×.
 */
export function svgChart(input: ChartInput): string {
  const width = 960;
  const labelWidth = 250;
  const plotLeft = labelWidth + 10;
  const plotWidth = width - plotLeft - 120;
  const barHeight = 14;
  const barGap = 3;
  const groupGap = 12;
  const values = definedNumbers(input.series.flatMap((series) => series.entries.map((entry) => entry.ratio)));
  const axisMax = Math.min(CHART_MAX_RATIO, Math.max(1.5, Math.ceil((Math.max(0, ...values) * 1.05) / 0.5) * 0.5));
  const x = (value: number): number => plotLeft + (Math.min(value, axisMax) / axisMax) * plotWidth;
  const colourOf = (index: number, control: boolean): string => (control ? CONTROL_COLOUR : PALETTE[index % PALETTE.length]!);
  const parts: string[] = [];
  let y = 20;
  parts.push(`<text x="10" y="${y}" font-size="16" font-weight="bold">${escapeXml(input.title)}</text>`);
  y += 18;
  parts.push(`<text x="10" y="${y}" font-size="11" fill="#444">${escapeXml(input.subtitle)}</text>`);
  y += 16;
  let legendX = 10;
  for (const [index, series] of input.series.entries()) {
    const label = `${series.label}${series.control ? ' (control, must read 1.0 ± 0.1×)' : ''}`;
    const labelWidthEstimate = 16 + label.length * 6.2 + 18;
    if (legendX > 10 && legendX + labelWidthEstimate > width) {
      legendX = 10;
      y += 16;
    }
    parts.push(`<rect x="${legendX}" y="${y}" width="12" height="12" fill="${colourOf(index, series.control)}"/>`);
    parts.push(`<text x="${legendX + 16}" y="${y + 10}" font-size="11">${escapeXml(label)}</text>`);
    legendX += labelWidthEstimate;
  }
  y += 34;
  const groupHeight = input.series.length * (barHeight + barGap) - barGap;
  const panelHeight = input.rows.length * (groupHeight + groupGap) - groupGap;
  for (const cache of input.caches) {
    parts.push(`<text x="10" y="${y}" font-size="13" font-weight="bold">${cache === 'warm' ? 'Warm' : 'Cold'} page cache</text>`);
    y += 10;
    const top = y;
    const bottom = y + panelHeight;
    const band = x(1 - CONTROL_TOLERANCE);
    parts.push(`<rect x="${band.toFixed(1)}" y="${top}" width="${(x(1 + CONTROL_TOLERANCE) - band).toFixed(1)}" height="${panelHeight}" fill="#eee"/>`);
    for (let tick = 0.5; tick <= axisMax + 1e-9; tick += 0.5) {
      const at = x(tick).toFixed(1);
      const dash = tick === 1 ? ' stroke-dasharray="4 3"' : '';
      const stroke = tick === 1 ? '#000' : '#ddd';
      parts.push(`<line x1="${at}" y1="${top - 4}" x2="${at}" y2="${bottom + 4}" stroke="${stroke}"${dash}/>`);
      parts.push(`<text x="${at}" y="${bottom + 16}" font-size="10" text-anchor="middle">${tick.toFixed(1)}×</text>`);
    }
    parts.push(`<line x1="${plotLeft}" y1="${top - 4}" x2="${plotLeft}" y2="${bottom + 4}" stroke="#000"/>`);
    for (const row of input.rows) {
      const groupTop = y;
      for (const [index, series] of input.series.entries()) {
        const entry = series.entries.find((candidate) => candidate.row === row.id && candidate.cache === cache);
        if (entry?.ratio !== undefined) {
          const end = x(entry.ratio);
          const clipped = entry.ratio > axisMax ? ' (off scale)' : '';
          parts.push(
            `<rect x="${plotLeft}" y="${y}" width="${(end - plotLeft).toFixed(1)}" height="${barHeight}" fill="${colourOf(index, series.control)}"/>`,
          );
          parts.push(`<text x="${(end + 4).toFixed(1)}" y="${y + barHeight - 3}" font-size="10">${formatRatio(entry.ratio)}${clipped}</text>`);
        } else {
          parts.push(`<text x="${plotLeft + 4}" y="${y + barHeight - 3}" font-size="10" fill="#888">no data</text>`);
        }
        y += barHeight + barGap;
      }
      const middle = groupTop + groupHeight / 2;
      parts.push(`<text x="${labelWidth}" y="${(middle + 4).toFixed(1)}" font-size="12" text-anchor="end">${escapeXml(row.label)}</text>`);
      y += groupGap - barGap;
    }
    y = bottom + 44;
  }
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y}" viewBox="0 0 ${width} ${y}" font-family="sans-serif">`,
    `<rect width="${width}" height="${y}" fill="#fff"/>`,
    ...parts,
    '</svg>',
    '',
  ].join('\n');
}
