/** Command-line flags of `npm run bench`, checked against the known rows, targets, layouts and cache states. */
import { parseArgs } from 'node:util';
import { CACHE_STATES, type CacheState } from './bench-cache.js';
import { LAYOUTS, type Layout } from './bench-layouts.js';

export interface BenchParts {
  /** The fio matrix: rows × layouts × cache states × servers. */
  matrix: boolean;
  /** Clone creation time through the admin API against size and fragmentation, beside qemu-img. */
  cloneTiming: boolean;
  /** RSS with many clones exported, and of one volume with many scattered writes. */
  memory: boolean;
}

export interface BenchOptions {
  parts: BenchParts;
  rounds: number;
  durationSeconds: number;
  servers: string[];
  rows: string[];
  layouts: Layout[];
  caches: CacheState[];
  out: string;
  /** Parent of the temp directory that holds every export (one filesystem for all). */
  workParent: string;
  exportSize: number;
  /** Timed clone requests per case. */
  cloneRequests: number;
  /** Clones exported at once in the memory part. */
  clones: number;
  /** Random 4 KiB blocks written into one volume in the memory part. */
  mapBlocks: number;
  help: boolean;
}

export const USAGE = `usage: npm run bench -- [flags]
What runs: the fio matrix by default; --clone-timing and/or --memory instead (add --matrix for all).
  --clone-timing       time clone creation through the admin API (1 GiB, 1 TiB, 16 TiB; 0, 10,000,
                       100,000 written extents) beside qemu-img create -b
  --memory             clonebd RSS with --clones clones exported, and with --map-blocks random
                       4 KiB blocks written into one 16 GiB volume (after writing, after a restart)
  --matrix             run the fio matrix too when --clone-timing or --memory is given
Matrix:
  --quick              2 s per run instead of 5 s; smaller memory part (200 clones, 100,000 blocks)
  --rounds N           rounds of interleaved runs (default 3)
  --duration S         seconds per run (overrides --quick)
  --servers A,B,...    targets to run (default: all)
  --rows A,B,...       rows to run (default: all)
  --layouts A,B,...    plain, fresh, clone, depth32 (default: all)
  --cache cold,warm    page-cache states to measure (default: both)
  --size-gib N         export size in GiB (default 4)
Clone timing and memory:
  --clone-requests N   timed clone requests per case (default 50)
  --clones N           clones exported at once (default 1000)
  --map-blocks N       random 4 KiB blocks written into one volume (default 1000000)
Everywhere:
  --out DIR            where results go (default bench-results)
  --work DIR           where the exports and pools live (default: the OS temp dir)
`;

function positiveNumber(text: string, flag: string, integer: boolean): number {
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0 || (integer && !Number.isInteger(value))) {
    throw new Error(`${flag} wants a positive ${integer ? 'integer' : 'number'}, not ${JSON.stringify(text)}`);
  }
  return value;
}

function list(text: string | undefined, known: readonly string[], flag: string): string[] {
  if (text === undefined) return [...known];
  const names = text.split(',').map((name) => name.trim()).filter((name) => name !== '');
  const unknown = names.filter((name) => !known.includes(name));
  if (unknown.length > 0) throw new Error(`${flag}: unknown ${unknown.join(', ')} (known: ${known.join(', ')})`);
  if (names.length === 0) throw new Error(`${flag} names nothing`);
  return [...new Set(names)];
}

export function parseBenchOptions(
  argv: readonly string[],
  known: { servers: readonly string[]; rows: readonly string[] },
  defaultWorkParent: string,
): BenchOptions {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      'clone-timing': { type: 'boolean', default: false },
      memory: { type: 'boolean', default: false },
      matrix: { type: 'boolean', default: false },
      quick: { type: 'boolean', default: false },
      rounds: { type: 'string' },
      duration: { type: 'string' },
      servers: { type: 'string' },
      rows: { type: 'string' },
      layouts: { type: 'string' },
      cache: { type: 'string' },
      'size-gib': { type: 'string' },
      'clone-requests': { type: 'string' },
      clones: { type: 'string' },
      'map-blocks': { type: 'string' },
      out: { type: 'string' },
      work: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const quick = values.quick === true;
  const cloneTiming = values['clone-timing'] === true;
  const memory = values.memory === true;
  const count = (text: string | undefined, flag: string, fallback: number): number =>
    text === undefined ? fallback : positiveNumber(text, flag, true);
  return {
    parts: { matrix: values.matrix === true || (!cloneTiming && !memory), cloneTiming, memory },
    rounds: values.rounds === undefined ? 3 : positiveNumber(values.rounds, '--rounds', true),
    durationSeconds:
      values.duration !== undefined ? positiveNumber(values.duration, '--duration', false) : quick ? 2 : 5,
    servers: list(values.servers, known.servers, '--servers'),
    rows: list(values.rows, known.rows, '--rows'),
    layouts: list(values.layouts, LAYOUTS, '--layouts') as Layout[],
    caches: list(values.cache, CACHE_STATES, '--cache') as CacheState[],
    out: values.out ?? 'bench-results',
    workParent: values.work ?? defaultWorkParent,
    exportSize: exportSize(values['size-gib']),
    cloneRequests: count(values['clone-requests'], '--clone-requests', 50),
    clones: count(values.clones, '--clones', quick ? 200 : 1000),
    mapBlocks: count(values['map-blocks'], '--map-blocks', quick ? 100_000 : 1_000_000),
    help: values.help === true,
  };
}

/** Whole MiB, so the 1 MiB prefill writes every byte. */
function exportSize(gibText: string | undefined): number {
  const size = (gibText === undefined ? 4 : positiveNumber(gibText, '--size-gib', false)) * 2 ** 30;
  if (size % 2 ** 20 !== 0) throw new Error('--size-gib must come to a whole number of MiB');
  return size;
}

/**
 * The order of targets for the n-th group of runs: forward, then reversed, and so on, so that
 * position effects (who runs right after the cache was dropped, who follows a heavy writer) fall on
 * every target alike. `round` and `group` both flip the direction, so a given row alternates across
 * rounds and consecutive groups within a round alternate too.
 */
export function interleave<T>(targets: readonly T[], round: number, group: number): T[] {
  return (round + group) % 2 === 0 ? [...targets] : [...targets].reverse();
}
