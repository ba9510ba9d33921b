/**
 * Clone creation and memory at scale: the cases, their results, and the markdown the README takes.
 * Pure functions; bench-clone.ts and bench-memory.ts do the measuring.
 *
 * The project's targets are shown as ratios beside the figures, never asserted: a busy machine makes
 * figures noisy, and a harness that fails on a target hides the figure that missed it.
 */
import { median, percentile } from './bench-stats.js';

const GiB = 2 ** 30;
const TiB = 2 ** 40;

export interface CloneCase {
  readonly id: string;
  readonly label: string;
  /** Which series the case belongs to: volume size, or number of written extents. */
  readonly series: 'size' | 'fragmentation';
  readonly size: number;
  /** Written 4 KiB extents, none adjacent to another. */
  readonly extents: number;
}

export const CLONE_CASES: readonly CloneCase[] = [
  { id: 'size-1gib', label: '1 GiB, empty', series: 'size', size: GiB, extents: 0 },
  { id: 'size-1tib', label: '1 TiB, empty', series: 'size', size: TiB, extents: 0 },
  { id: 'size-16tib', label: '16 TiB, empty', series: 'size', size: 16 * TiB, extents: 0 },
  { id: 'extents-0', label: '4 GiB, 0 extents', series: 'fragmentation', size: 4 * GiB, extents: 0 },
  { id: 'extents-10000', label: '4 GiB, 10,000 extents', series: 'fragmentation', size: 4 * GiB, extents: 10_000 },
  { id: 'extents-100000', label: '4 GiB, 100,000 extents', series: 'fragmentation', size: 4 * GiB, extents: 100_000 },
];

export const TARGETS = {
  /** Median clone request through the admin API. */
  cloneMs: 5,
  /** RSS of a server with 1,000 clones exported. */
  clonesRssBytes: 256 * 2 ** 20,
  /** Map memory of one volume with 1,000,000 scattered 4 KiB blocks. */
  mapBytes: 64 * 2 ** 20,
} as const;

/**
 * block-map.ts's own figure for a typical (not full) leaf: about 35 bytes per extent. The store
 * reports no map memory of its own, so this is its estimate.
 */
export const MAP_BYTES_PER_EXTENT = 35;

export interface TimingSummary {
  medianMs: number;
  p90Ms: number;
  minMs: number;
  maxMs: number;
  count: number;
}

export function summariseTimes(values: readonly number[]): TimingSummary {
  return {
    medianMs: median(values),
    p90Ms: percentile(values, 90),
    minMs: Math.min(...values),
    maxMs: Math.max(...values),
    count: values.length,
  };
}

export interface CloneTimingResult {
  case: CloneCase;
  /** Data extents the server reports after the writes (BLOCK_STATUS), when there were writes. */
  measuredExtents: number | undefined;
  /** POST /v1/volumes/NAME/clone, after an NBD FLUSH of the source. */
  clone: TimingSummary | undefined;
  /** GET /v1/pool: the pool usage sweep every admin response carries, timed alone. */
  poolStatus: TimingSummary | undefined;
  /** `qemu-img create -f qcow2 -b BASE -F raw`, process start included. */
  qemuImg: TimingSummary | undefined;
  notes: string[];
}

/** Largest median ÷ smallest median over a series: 1.0 is perfectly flat. */
export function spread(summaries: readonly (TimingSummary | undefined)[]): number | undefined {
  const medians = summaries.filter((summary): summary is TimingSummary => summary !== undefined).map((summary) => summary.medianMs);
  if (medians.length < 2 || Math.min(...medians) <= 0) return undefined;
  return Math.max(...medians) / Math.min(...medians);
}

function ms(value: number): string {
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

function timing(summary: TimingSummary | undefined): [string, string, string] {
  if (summary === undefined) return ['—', '—', '—'];
  return [ms(summary.medianMs), ms(summary.p90Ms), `${ms(summary.minMs)}–${ms(summary.maxMs)}`];
}

function times(value: number | undefined): string {
  return value === undefined ? '—' : `${value.toFixed(2)}×`;
}

function line(cells: readonly string[]): string {
  return `| ${cells.join(' | ')} |`;
}

export function formatCount(value: number): string {
  return value.toLocaleString('en-US');
}

export function mib(bytes: number | undefined): string {
  return bytes === undefined ? '—' : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** A volume size in the largest binary unit that divides it, else in GiB with decimals. */
export function sizeLabel(bytes: number): string {
  for (const [unit, scale] of [
    ['TiB', TiB],
    ['GiB', GiB],
    ['MiB', 2 ** 20],
  ] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale} ${unit}`;
  }
  return `${(bytes / GiB).toFixed(2)} GiB`;
}

/** The clone-timing table: one line per case, milliseconds, clonebd beside qemu-img. */
export function cloneTimingMarkdown(results: readonly CloneTimingResult[], requests: number): string[] {
  const lines = [
    '#### Clone creation time (ms)',
    '',
    `${requests} requests per case. clonebd: \`POST /v1/volumes/NAME/clone\` on the admin socket, each after an NBD FLUSH ` +
      'of the source (connected throughout), the new clone deleted untimed before the next; every case in a fresh pool ' +
      'and server. `GET /v1/pool` is the usage sweep each admin response includes, timed alone. qemu-img: ' +
      '`qemu-img create -f qcow2 -b BASE -F raw` over a raw base with the same extents written, process start included. ' +
      `Target: clonebd median < ${TARGETS.cloneMs} ms, flat across sizes and fragmentation.`,
    '',
    line([
      'case',
      'clonebd median',
      'p90',
      'min–max',
      'GET /v1/pool median',
      'qemu-img median',
      'p90',
      'min–max',
      'clonebd ÷ qemu-img',
      `clonebd ÷ ${TARGETS.cloneMs} ms target`,
    ]),
    line(['---', ...Array.from({ length: 9 }, () => '--:')]),
  ];
  for (const result of results) {
    const label =
      result.measuredExtents === undefined || result.measuredExtents === result.case.extents
        ? result.case.label
        : `${result.case.label} (server reports ${formatCount(result.measuredExtents)})`;
    lines.push(
      line([
        label,
        ...timing(result.clone),
        result.poolStatus === undefined ? '—' : ms(result.poolStatus.medianMs),
        ...timing(result.qemuImg),
        times(result.clone && result.qemuImg ? result.clone.medianMs / result.qemuImg.medianMs : undefined),
        times(result.clone === undefined ? undefined : result.clone.medianMs / TARGETS.cloneMs),
      ]),
    );
  }
  lines.push('');
  for (const series of ['size', 'fragmentation'] as const) {
    const inSeries = results.filter((result) => result.case.series === series);
    if (inSeries.length < 2) continue;
    const clonebd = spread(inSeries.map((result) => result.clone));
    const qemu = spread(inSeries.map((result) => result.qemuImg));
    lines.push(
      `Spread across ${series === 'size' ? 'sizes' : 'fragmentation'} (largest median ÷ smallest; 1.00× is flat): ` +
        `clonebd ${times(clonebd)}, qemu-img ${times(qemu)}.`,
      '',
    );
  }
  for (const result of results) for (const note of result.notes) lines.push(`> ${result.case.label}: ${note}`);
  return lines;
}

export interface CloneMemoryResult {
  clones: number;
  baseSize: number;
  /** Just started, empty pool. */
  rssIdleBytes: number | undefined;
  /** After the base volume was written in full. */
  rssBaseBytes: number | undefined;
  /** After creating every clone. */
  rssClonesBytes: number | undefined;
  createSeconds: number;
  /** The same pool after a restart of the server: the clones without the garbage of earlier I/O. */
  rssRestartedBytes: number | undefined;
  /** NBD connections open at once (to the restarted server), one per clone, each after reading 4 KiB. */
  connections: number;
  rssConnectedBytes: number | undefined;
  /** After each connection wrote 4 KiB into its clone (each clone then has a layer file of its own). */
  rssWrittenBytes: number | undefined;
  openFiles: number | undefined;
  /** VmHWM at the end. */
  peakRssBytes: number | undefined;
}

export interface MapMemoryResult {
  volumeSize: number;
  blocks: number;
  /** Writes between two FLUSHes. */
  flushEvery: number;
  /** Data extents the server reports after the writes. */
  extents: number | undefined;
  writeSeconds: number;
  rssAfterWriteBytes: number | undefined;
  peakAfterWriteBytes: number | undefined;
  rssAfterRestartBytes: number | undefined;
  /** Start of the restarted server until it answered NBD. */
  restartSeconds: number;
  checkpointBytes: number | undefined;
  journalBytes: number | undefined;
  /** Heap growth of an idle process opening the stopped pool (bench-map-probe.ts). */
  probeHeapBytes: number | undefined;
  probeOpenMs: number | undefined;
}

function budget(value: number | undefined, target: number): string {
  return value === undefined ? '—' : `${(value / target).toFixed(2)}×`;
}

/** The memory tables: RSS with many clones exported, and map memory of one scattered volume. */
export function memoryMarkdown(clones: CloneMemoryResult | undefined, map: MapMemoryResult | undefined): string[] {
  const lines: string[] = [];
  if (clones !== undefined) {
    const budgetNote =
      clones.clones === 1000 ? `target < ${mib(TARGETS.clonesRssBytes)}` : `target < ${mib(TARGETS.clonesRssBytes)} at 1,000 clones`;
    lines.push(
      `#### clonebd RSS with ${formatCount(clones.clones)} clones exported`,
      '',
      `One ${sizeLabel(clones.baseSize)} base written in full, ${formatCount(clones.clones)} clones of it created through the admin API ` +
        `(${clones.createSeconds.toFixed(1)} s in all), the server restarted, then one NBD connection per clone (${budgetNote}).`,
      '',
      line(['state', 'RSS', `÷ ${mib(TARGETS.clonesRssBytes)}`]),
      line(['---', '--:', '--:']),
      line(['server started, empty pool', mib(clones.rssIdleBytes), budget(clones.rssIdleBytes, TARGETS.clonesRssBytes)]),
      line(['base written', mib(clones.rssBaseBytes), budget(clones.rssBaseBytes, TARGETS.clonesRssBytes)]),
      line([`${formatCount(clones.clones)} clones created`, mib(clones.rssClonesBytes), budget(clones.rssClonesBytes, TARGETS.clonesRssBytes)]),
      line(['server restarted with them', mib(clones.rssRestartedBytes), budget(clones.rssRestartedBytes, TARGETS.clonesRssBytes)]),
      line([
        `${formatCount(clones.connections)} connections open, 4 KiB read on each`,
        mib(clones.rssConnectedBytes),
        budget(clones.rssConnectedBytes, TARGETS.clonesRssBytes),
      ]),
      line([
        `… and 4 KiB written into each clone (${clones.openFiles === undefined ? '?' : formatCount(clones.openFiles)} open descriptors)`,
        mib(clones.rssWrittenBytes),
        budget(clones.rssWrittenBytes, TARGETS.clonesRssBytes),
      ]),
      line(['peak of the restarted server (VmHWM)', mib(clones.peakRssBytes), budget(clones.peakRssBytes, TARGETS.clonesRssBytes)]),
      '',
    );
  }
  if (map !== undefined) {
    const estimate = map.extents === undefined ? undefined : map.extents * MAP_BYTES_PER_EXTENT;
    const perExtent =
      map.probeHeapBytes === undefined || map.extents === undefined || map.extents === 0 ? undefined : map.probeHeapBytes / map.extents;
    lines.push(
      `#### clonebd map memory: one volume with ${formatCount(map.blocks)} random 4 KiB blocks written`,
      '',
      `${sizeLabel(map.volumeSize)} volume; ${formatCount(map.blocks)} distinct blocks at random offsets written in ` +
        `${map.writeSeconds.toFixed(1)} s, 64 in flight, a FLUSH after every ${formatCount(map.flushEvery)}; the server reports ${map.extents === undefined ? '?' : formatCount(map.extents)} ` +
        `extents. Target: maps < ${mib(TARGETS.mapBytes)} at 1,000,000 blocks.`,
      '',
      line(['measure', 'bytes', `÷ ${mib(TARGETS.mapBytes)}`]),
      line(['---', '--:', '--:']),
      line(['server RSS after writing', mib(map.rssAfterWriteBytes), budget(map.rssAfterWriteBytes, TARGETS.mapBytes)]),
      line(['server peak RSS while writing (VmHWM)', mib(map.peakAfterWriteBytes), budget(map.peakAfterWriteBytes, TARGETS.mapBytes)]),
      line([
        `server RSS after a restart (maps loaded; ready in ${map.restartSeconds.toFixed(1)} s)`,
        mib(map.rssAfterRestartBytes),
        budget(map.rssAfterRestartBytes, TARGETS.mapBytes),
      ]),
      line([
        `heap of an idle process after opening the pool (${map.probeOpenMs === undefined ? '?' : (map.probeOpenMs / 1000).toFixed(1)} s to open)` +
          `${perExtent === undefined ? '' : `, ${perExtent.toFixed(0)} B per extent`}`,
        mib(map.probeHeapBytes),
        budget(map.probeHeapBytes, TARGETS.mapBytes),
      ]),
      line([`block-map.ts estimate (${MAP_BYTES_PER_EXTENT} B per extent)`, mib(estimate), budget(estimate, TARGETS.mapBytes)]),
      line(['checkpoint file', mib(map.checkpointBytes), '']),
      line(['journal since the checkpoint', mib(map.journalBytes), '']),
      '',
    );
  }
  return lines;
}
