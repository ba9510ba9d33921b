/**
 * From samples to what people read: per-row summaries, the ratio of the subject (clonebd) to each
 * reference on the same layout, each server's copy-on-write layouts against its own plain volume,
 * the same-server control check, a markdown table for the README and an SVG chart.
 * Pure functions of the samples; nothing here touches files or processes.
 */
import type { CacheState } from './bench-cache.js';
import type { Row } from './bench-fio.js';
import { LAYOUT_LABELS, layoutRuns, type Layout } from './bench-layouts.js';
import { ratio, summarise, type Summary } from './bench-stats.js';

/** One fio run of one row against one server's export of one layout. */
export interface Sample {
  round: number;
  row: string;
  layout: Layout;
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
  layout: Layout;
  cache: CacheState;
  target: string;
  iops: Summary;
  bytesPerSecond: Summary;
  cpuMicrosPerIo: Summary | undefined;
  peakRssBytes: number | undefined;
}

export interface RatioEntry {
  row: string;
  layout: Layout;
  cache: CacheState;
  numerator: string;
  denominator: string;
  /** Of the medians of the row's metric; undefined when a side has no samples. */
  ratio: number | undefined;
}

export interface ControlEntry extends RatioEntry {
  withinTolerance: boolean;
}

/** One server's export of `layout` against its own export of `versus`, same row and cache state. */
export interface LayoutRatioEntry {
  row: string;
  cache: CacheState;
  target: string;
  layout: Layout;
  versus: Layout;
  ratio: number | undefined;
}

export const CONTROL_TOLERANCE = 0.1;

function definedNumbers(values: readonly (number | undefined)[]): number[] {
  return values.filter((value): value is number => value !== undefined && Number.isFinite(value));
}

/** One cell per (row, layout, cache state, target) that has samples, in first-seen order. */
export function summariseSamples(samples: readonly Sample[]): Cell[] {
  const groups = new Map<string, Sample[]>();
  for (const sample of samples) {
    const key = JSON.stringify([sample.row, sample.layout, sample.cache, sample.target]);
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
      layout: first.layout,
      cache: first.cache,
      target: first.target,
      iops: summarise(group.map((sample) => sample.iops)),
      bytesPerSecond: summarise(group.map((sample) => sample.bytesPerSecond)),
      cpuMicrosPerIo: cpu.length > 0 ? summarise(cpu) : undefined,
      peakRssBytes: rss.length > 0 ? Math.max(...rss) : undefined,
    };
  });
}

export function findCell(cells: readonly Cell[], row: string, layout: Layout, cache: CacheState, target: string): Cell | undefined {
  return cells.find((cell) => cell.row === row && cell.layout === layout && cell.cache === cache && cell.target === target);
}

function metricMedian(cell: Cell | undefined, row: Row): number | undefined {
  if (cell === undefined) return undefined;
  return row.metric === 'iops' ? cell.iops.median : cell.bytesPerSecond.median;
}

function medianRatio(top: Cell | undefined, bottom: Cell | undefined, row: Row): number | undefined {
  const a = metricMedian(top, row);
  const b = metricMedian(bottom, row);
  return a === undefined || b === undefined ? undefined : ratio(a, b);
}

/**
 * numerator ÷ denominator on every row, layout and cache state the layout runs, each server on its
 * own export of that layout, from the medians of each row's metric.
 */
export function ratioEntries(
  cells: readonly Cell[],
  rows: readonly Row[],
  layouts: readonly Layout[],
  caches: readonly CacheState[],
  numerator: string,
  denominator: string,
): RatioEntry[] {
  const entries: RatioEntry[] = [];
  for (const cache of caches) {
    for (const row of rows) {
      for (const layout of layouts) {
        if (!layoutRuns(layout, row)) continue;
        entries.push({
          row: row.id,
          layout,
          cache,
          numerator,
          denominator,
          ratio: medianRatio(findCell(cells, row.id, layout, cache, numerator), findCell(cells, row.id, layout, cache, denominator), row),
        });
      }
    }
  }
  return entries;
}

/** `target` on `layout` ÷ the same target on `versus`, on every row both layouts run. */
export function layoutRatioEntries(
  cells: readonly Cell[],
  rows: readonly Row[],
  caches: readonly CacheState[],
  target: string,
  layout: Layout,
  versus: Layout,
): LayoutRatioEntry[] {
  const entries: LayoutRatioEntry[] = [];
  for (const cache of caches) {
    for (const row of rows) {
      if (!layoutRuns(layout, row) || !layoutRuns(versus, row)) continue;
      const top = findCell(cells, row.id, layout, cache, target);
      const bottom = findCell(cells, row.id, versus, cache, target);
      entries.push({ row: row.id, cache, target, layout, versus, ratio: medianRatio(top, bottom, row) });
    }
  }
  return entries;
}

/**
 * The copy-on-write comparisons reported for each server that serves copy-on-write layouts: each
 * layout against the plain volume (in the main table), depth 32 against depth 1 (qcow2 is known to
 * slow down with depth; clonebd should not), and first writes into a clone against first writes
 * into an empty volume (the fair baseline for first writes).
 */
export const LAYOUT_COMPARISONS: readonly { layout: Layout; versus: Layout }[] = [
  { layout: 'fresh', versus: 'plain' },
  { layout: 'clone', versus: 'plain' },
  { layout: 'depth32', versus: 'plain' },
  { layout: 'depth32', versus: 'clone' },
  { layout: 'clone', versus: 'fresh' },
];

/** The control's ratio to the server it repeats; a fair harness reads 1.0 ± CONTROL_TOLERANCE. */
export function controlEntries(
  cells: readonly Cell[],
  rows: readonly Row[],
  layouts: readonly Layout[],
  caches: readonly CacheState[],
  control: string,
  original: string,
): ControlEntry[] {
  return ratioEntries(cells, rows, layouts, caches, control, original).map((entry) => ({
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
  layouts: readonly Layout[];
  caches: readonly CacheState[];
  /** Column order. */
  targets: readonly string[];
  subject: string;
  references: readonly string[];
  cells: readonly Cell[];
  ratios: readonly RatioEntry[];
  /** Servers' layouts against their own other layouts (LAYOUT_COMPARISONS). */
  layoutRatios: readonly LayoutRatioEntry[];
  controls: readonly ControlEntry[];
  warnings: readonly string[];
}

function tableLine(cells: readonly string[]): string {
  return `| ${cells.join(' | ')} |`;
}

function rowLabel(row: Row): string {
  return `${row.label} (${row.metric === 'iops' ? 'IOPS' : 'MB/s'})`;
}

export interface RowGroup {
  row: Row;
  layout: Layout;
  /** Names the layout after the row's label, or nothing when only plain volumes ran. */
  suffix: string;
}

/** The (row, layout) pairs that run, row by row. */
export function rowGroups(rows: readonly Row[], layouts: readonly Layout[]): RowGroup[] {
  const named = layouts.length > 1 || layouts[0] !== 'plain';
  return rows.flatMap((row) =>
    layouts
      .filter((layout) => layoutRuns(layout, row))
      .map((layout) => ({ row, layout, suffix: named ? `, ${LAYOUT_LABELS[layout]}` : '' })),
  );
}

function layoutRatioOf(
  entries: readonly LayoutRatioEntry[],
  row: string,
  cache: CacheState,
  target: string,
  layout: Layout,
  versus: Layout,
): number | undefined {
  return entries.find(
    (entry) => entry.row === row && entry.cache === cache && entry.target === target && entry.layout === layout && entry.versus === versus,
  )?.ratio;
}

/** Targets that have a layout ratio with a figure, in column order. */
function targetsWithLayoutRatios(input: ReportInput, versus: Layout | undefined): string[] {
  return input.targets.filter((target) =>
    input.layoutRatios.some((entry) => entry.target === target && (versus === undefined || entry.versus === versus) && entry.ratio !== undefined),
  );
}

/**
 * Markdown ready for the README: one throughput table per cache state (a line per row and layout,
 * with each server's layout against its own plain volume), the other copy-on-write comparisons,
 * then server cost.
 */
export function markdownReport(input: ReportInput): string {
  const lines: string[] = [`### ${input.title}`, '', ...input.preamble, ''];
  const groups = rowGroups(input.rows, input.layouts);
  const plainHeads = targetsWithLayoutRatios(input, 'plain');
  for (const cache of input.caches) {
    const ratioHeads = input.references.map((reference) => `${input.subject} ÷ ${reference}`);
    const layoutHeads = plainHeads.map((target) => `${target} ÷ its plain`);
    lines.push(`#### ${cache === 'warm' ? 'Warm' : 'Cold'} page cache`, '');
    lines.push(tableLine(['', ...input.targets, ...ratioHeads, ...layoutHeads]));
    lines.push(tableLine(['---', ...[...input.targets, ...ratioHeads, ...layoutHeads].map(() => '--:')]));
    for (const { row, layout, suffix } of groups) {
      const values = input.targets.map((target) => {
        const cell = findCell(input.cells, row.id, layout, cache, target);
        if (cell === undefined) return '—';
        return row.metric === 'iops' ? formatRange(cell.iops, formatIops) : formatRange(cell.bytesPerSecond, formatBandwidth);
      });
      const ratios = input.references.map((reference) =>
        formatRatio(
          input.ratios.find(
            (entry) =>
              entry.row === row.id &&
              entry.layout === layout &&
              entry.cache === cache &&
              entry.numerator === input.subject &&
              entry.denominator === reference,
          )?.ratio,
        ),
      );
      const layoutRatios = plainHeads.map((target) =>
        formatRatio(layout === 'plain' ? undefined : layoutRatioOf(input.layoutRatios, row.id, cache, target, layout, 'plain')),
      );
      lines.push(tableLine([`${rowLabel(row)}${suffix}`, ...values, ...ratios, ...layoutRatios]));
    }
    lines.push('');
    lines.push(...otherComparisons(input, cache));
  }
  lines.push('#### Server cost: CPU time per I/O (median), peak RSS', '');
  lines.push(tableLine(['', ...input.targets]));
  lines.push(tableLine(['---', ...input.targets.map(() => '--:')]));
  for (const cache of input.caches) {
    for (const { row, layout, suffix } of groups) {
      const values = input.targets.map((target) => {
        const cpu = findCell(input.cells, row.id, layout, cache, target)?.cpuMicrosPerIo;
        return cpu === undefined ? '—' : `${cpu.median.toFixed(1)} µs`;
      });
      lines.push(tableLine([`${row.label}${suffix}, ${cache}`, ...values]));
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

/** The comparisons that are not against the plain volume: one line per row, a column per server and comparison. */
function otherComparisons(input: ReportInput, cache: CacheState): string[] {
  const columns = LAYOUT_COMPARISONS.filter((comparison) => comparison.versus !== 'plain').flatMap((comparison) =>
    input.targets
      .filter((target) =>
        input.layoutRatios.some(
          (entry) =>
            entry.target === target &&
            entry.cache === cache &&
            entry.layout === comparison.layout &&
            entry.versus === comparison.versus &&
            entry.ratio !== undefined,
        ),
      )
      .map((target) => ({ target, ...comparison })),
  );
  if (columns.length === 0) return [];
  const lines = [
    `Copy-on-write, ${cache} page cache: each server against its own other layouts (depth 32 ÷ clone: does depth cost? clone ÷ fresh: first writes into a clone against first writes into an empty volume).`,
    '',
    tableLine(['', ...columns.map(({ target, layout, versus }) => `${target} ${layout} ÷ ${versus}`)]),
    tableLine(['---', ...columns.map(() => '--:')]),
  ];
  for (const row of input.rows) {
    const values = columns.map(({ target, layout, versus }) =>
      !layoutRuns(layout, row) || !layoutRuns(versus, row) ? '—' : formatRatio(layoutRatioOf(input.layoutRatios, row.id, cache, target, layout, versus)),
    );
    if (values.every((value) => value === '—')) continue;
    lines.push(tableLine([rowLabel(row), ...values]));
  }
  lines.push('');
  return lines;
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
  /** One group of bars each (rowGroups). */
  groups: readonly RowGroup[];
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
  const labelWidth = 310;
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
  const panelHeight = input.groups.length * (groupHeight + groupGap) - groupGap;
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
    for (const { row, layout, suffix } of input.groups) {
      const groupTop = y;
      for (const [index, series] of input.series.entries()) {
        const entry = series.entries.find((candidate) => candidate.row === row.id && candidate.layout === layout && candidate.cache === cache);
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
      parts.push(`<text x="${labelWidth}" y="${(middle + 4).toFixed(1)}" font-size="12" text-anchor="end">${escapeXml(`${row.label}${suffix}`)}</text>`);
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
