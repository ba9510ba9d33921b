/**
 * Copy-on-write layouts of the benchmark, and the write plans that build them. Pure: no files, no
 * processes; bench-targets.ts carries the plans out for each server.
 *
 *   plain     a volume written in full first; writes overwrite
 *   fresh     an empty volume; every write is a first write (write rows only: reads would hit holes)
 *   clone     a clone (qcow2: an overlay) of a volume written in full; reads go through it to the
 *             base, writes are first writes into it
 *   depth32   32 clones deep, each level cloned from the one below after writes of its own
 *
 *        base (full) <- level 1 <- level 2 <- ... <- level 32  = the export
 *                      +writes    +writes           +writes
 *
 * Every job runs on an export no earlier job has written: after a write job, a layout that is not
 * `plain` rebuilds what the job dirtied (a new clone; a new top level with the same writes; a new
 * empty volume). Each level's writes are the same 4 KiB blocks for every server (seeded), so
 * clonebd and the qcow2 chain hold the same shape. A level writes 1/1024 of the blocks, not more:
 * qcow2 allocates a 64 KiB cluster for each 4 KiB write into a new cluster, so 1/64 would cost
 * about 29 GiB per chain at 4 GiB.
 */
import type { Row } from './bench-fio.js';

export const LAYOUTS = ['plain', 'fresh', 'clone', 'depth32'] as const;
export type Layout = (typeof LAYOUTS)[number];

export const LAYOUT_LABELS: Readonly<Record<Layout, string>> = {
  plain: 'plain',
  fresh: 'fresh (empty)',
  clone: 'clone',
  depth32: 'clone at depth 32',
};

export const CHAIN_DEPTH = 32;
/** Each chain level writes one block in this many. */
export const LEVEL_WRITE_DIVISOR = 1024;
export const BLOCK = 4096;
/** The byte qemu-io and the native-free writer fill blocks with. */
export const FILL_BYTE = 0x5a;

export function isWriteRow(row: Row): boolean {
  return row.rw === 'write' || row.rw === 'randwrite';
}

/** An empty volume has nothing to read, so `fresh` runs write rows only. */
export function layoutRuns(layout: Layout, row: Row): boolean {
  return layout !== 'fresh' || isWriteRow(row);
}

/** Whether a job of `row` leaves the export of `layout` in need of a rebuild before the next job. */
export function dirtiedBy(layout: Layout, row: Row): boolean {
  return layout !== 'plain' && isWriteRow(row);
}

/** mulberry32: a small seeded generator of uniform floats in [0, 1); same seed, same sequence. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/**
 * `count` distinct block numbers below `total`, in random order. With `spaced`, no two are
 * neighbours (every chosen block is even), so each is an extent of its own in a block map.
 * Floyd's sampling keeps the work proportional to `count`, not `total`.
 */
export function randomBlocks(total: number, count: number, seed: number, spaced = false): Float64Array {
  const range = spaced ? Math.floor(total / 2) : total;
  if (!Number.isSafeInteger(count) || count < 0 || count > range) {
    throw new RangeError(`cannot choose ${count} ${spaced ? 'spaced ' : ''}blocks of ${total}`);
  }
  const random = seededRandom(seed);
  const chosen = new Set<number>();
  const out = new Float64Array(count);
  let at = 0;
  for (let j = range - count; j < range; j++) {
    const candidate = Math.floor(random() * (j + 1));
    const pick = chosen.has(candidate) ? j : candidate;
    chosen.add(pick);
    out[at++] = spaced ? pick * 2 : pick;
  }
  for (let i = out.length - 1; i > 0; i--) {
    const k = Math.floor(random() * (i + 1));
    const swap = out[i]!;
    out[i] = out[k]!;
    out[k] = swap;
  }
  return out;
}

/** The blocks chain level `level` (1..CHAIN_DEPTH) writes in an export of `exportSize` bytes. */
export function levelBlocks(exportSize: number, level: number): Float64Array {
  if (!Number.isInteger(level) || level < 1 || level > CHAIN_DEPTH) throw new RangeError(`no chain level ${level}`);
  const total = Math.floor(exportSize / BLOCK);
  return randomBlocks(total, Math.max(1, Math.floor(total / LEVEL_WRITE_DIVISOR)), 0xc10e0000 + level);
}

/** Name of chain level `level` in a clonebd pool; the top level is the export itself. */
export function levelVolumeName(level: number, exportName: string): string {
  return level === CHAIN_DEPTH ? exportName : `level-${String(level).padStart(2, '0')}`;
}

/** qemu-io commands (read from its standard input) that write each block once, quietly. */
export function qemuIoScript(blocks: ArrayLike<number>): string {
  const lines: string[] = [];
  for (let i = 0; i < blocks.length; i++) {
    lines.push(`write -q -P 0x${FILL_BYTE.toString(16)} ${blocks[i]! * BLOCK} ${BLOCK}`);
  }
  lines.push('quit', '');
  return lines.join('\n');
}

/**
 * Disk the matrix needs at most, in bytes: what stays for the whole run plus one export's worth
 * that a write job may fill before its rebuild. `ownBase` exports (clonebd's pools) hold their own
 * full base; the others share one raw base and, for depth32, one qcow2 chain whose levels cost a
 * 64 KiB cluster per 4 KiB block written.
 */
export function diskEstimate(exports: readonly { layout: Layout; ownBase: boolean }[], exportSize: number): number {
  let bytes = exportSize;
  for (const { layout, ownBase } of exports) {
    if (layout === 'plain' || (ownBase && layout !== 'fresh')) bytes += exportSize;
  }
  const shared = exports.filter(({ ownBase, layout }) => !ownBase && (layout === 'clone' || layout === 'depth32'));
  if (shared.length > 0) bytes += exportSize;
  if (shared.some(({ layout }) => layout === 'depth32')) {
    const levelBlocks = Math.max(1, Math.floor(exportSize / BLOCK / LEVEL_WRITE_DIVISOR));
    bytes += (CHAIN_DEPTH - 1) * levelBlocks * 64 * 1024;
  }
  return bytes;
}
