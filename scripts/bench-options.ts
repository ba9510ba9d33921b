/** Command-line flags of `npm run bench`, checked against the known rows, targets and cache states. */
import { parseArgs } from 'node:util';
import { CACHE_STATES, type CacheState } from './bench-cache.js';

export interface BenchOptions {
  rounds: number;
  durationSeconds: number;
  servers: string[];
  rows: string[];
  caches: CacheState[];
  out: string;
  /** Parent of the temp directory that holds every export (one filesystem for all). */
  workParent: string;
  exportSize: number;
  help: boolean;
}

export const USAGE = `usage: npm run bench -- [flags]
  --quick              2 s per run instead of 10 s
  --rounds N           rounds of interleaved runs (default 3)
  --duration S         seconds per run (overrides --quick)
  --servers A,B,...    targets to run (default: all)
  --rows A,B,...       rows to run (default: all)
  --cache cold,warm    page-cache states to measure (default: both)
  --size-gib N         export size in GiB (default 4)
  --out DIR            where results go (default bench-results)
  --work DIR           where the exports live (default: the OS temp dir)
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
      quick: { type: 'boolean', default: false },
      rounds: { type: 'string' },
      duration: { type: 'string' },
      servers: { type: 'string' },
      rows: { type: 'string' },
      cache: { type: 'string' },
      'size-gib': { type: 'string' },
      out: { type: 'string' },
      work: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  return {
    rounds: values.rounds === undefined ? 3 : positiveNumber(values.rounds, '--rounds', true),
    durationSeconds:
      values.duration !== undefined ? positiveNumber(values.duration, '--duration', false) : values.quick === true ? 2 : 10,
    servers: list(values.servers, known.servers, '--servers'),
    rows: list(values.rows, known.rows, '--rows'),
    caches: list(values.cache, CACHE_STATES, '--cache') as CacheState[],
    out: values.out ?? 'bench-results',
    workParent: values.work ?? defaultWorkParent,
    exportSize: exportSize(values['size-gib']),
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
