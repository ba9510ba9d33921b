/**
 * The benchmark rows as fio jobs over fio's `nbd` engine, and the reading of fio's JSON report.
 *
 * A row is one fio job shape (pattern, block size, queue depth); every target runs the same rows
 * with the same arguments. Random jobs keep fio's default `randrepeat=1`, so every server sees the
 * same offsets in the same order, which matters for cold-cache figures. `norandommap` keeps fio's
 * own bookkeeping off the CPU it shares with the servers.
 */

const KiB = 1024;
const MiB = 1024 * KiB;

export interface Row {
  /** Stable name, used by `--rows` and in the JSON results. */
  readonly id: string;
  readonly label: string;
  readonly rw: 'randread' | 'randwrite' | 'read' | 'write';
  readonly blockSize: number;
  readonly iodepth: number;
  /** The figure a person reads for this row; ratios are the same either way at a fixed block size. */
  readonly metric: 'iops' | 'bandwidth';
}

export const ROWS: readonly Row[] = [
  { id: 'randread-4k-qd1', label: '4 KiB random read QD1', rw: 'randread', blockSize: 4 * KiB, iodepth: 1, metric: 'iops' },
  { id: 'randread-4k-qd32', label: '4 KiB random read QD32', rw: 'randread', blockSize: 4 * KiB, iodepth: 32, metric: 'iops' },
  { id: 'randwrite-4k-qd1', label: '4 KiB random write QD1', rw: 'randwrite', blockSize: 4 * KiB, iodepth: 1, metric: 'iops' },
  { id: 'randwrite-4k-qd32', label: '4 KiB random write QD32', rw: 'randwrite', blockSize: 4 * KiB, iodepth: 32, metric: 'iops' },
  { id: 'read-1m-qd8', label: '1 MiB sequential read QD8', rw: 'read', blockSize: MiB, iodepth: 8, metric: 'bandwidth' },
  { id: 'write-1m-qd8', label: '1 MiB sequential write QD8', rw: 'write', blockSize: MiB, iodepth: 8, metric: 'bandwidth' },
];

/** fio arguments for one time-based run of `row` against `uri`, its JSON report written to `output`. */
export function rowJobArgs(row: Row, uri: string, durationSeconds: number, output: string): string[] {
  return [
    `--name=${row.id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${row.rw}`,
    `--bs=${row.blockSize}`,
    `--iodepth=${row.iodepth}`,
    '--norandommap',
    '--time_based',
    `--runtime=${durationSeconds}s`,
    '--output-format=json',
    `--output=${output}`,
  ];
}

/** fio arguments that write every byte of the export once, so reads never hit holes. */
export function prefillJobArgs(uri: string, output: string): string[] {
  return [
    '--name=prefill',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=write',
    `--bs=${MiB}`,
    '--iodepth=8',
    '--output-format=json',
    `--output=${output}`,
  ];
}

export interface FioResult {
  /** Read plus write operations per second over the job's runtime. */
  iops: number;
  bytesPerSecond: number;
  /** Completed operations (read plus write). */
  ios: number;
  ioBytes: number;
  runtimeMs: number;
  /** fio's own CPU use, percent of its runtime (user plus system). */
  fioCpuPercent: number;
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

function field(value: Json | undefined, key: string, where: string): Json {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new Error(`fio report: ${where} is not an object`);
  }
  const found = value[key];
  if (found === undefined) throw new Error(`fio report: ${where} has no "${key}"`);
  return found;
}

function numberField(value: Json | undefined, key: string, where: string): number {
  const found = field(value, key, where);
  if (typeof found !== 'number' || !Number.isFinite(found)) {
    throw new Error(`fio report: ${where}.${key} is not a number`);
  }
  return found;
}

/**
 * Reads the figures of every job in a fio `--output-format=json` report, summed. Text before the
 * opening brace (notes fio prints to the same stream) is skipped. Throws when a job reports an
 * error or the report lacks a figure, so a broken run never becomes a number.
 */
export function parseFioReport(text: string): FioResult {
  const start = text.indexOf('{');
  if (start < 0) throw new Error('fio report: no JSON object in the output');
  let report: Json;
  try {
    report = JSON.parse(text.slice(start)) as Json;
  } catch (error) {
    throw new Error('fio report: output is not valid JSON', { cause: error });
  }
  const jobs = field(report, 'jobs', 'report');
  if (!Array.isArray(jobs) || jobs.length === 0) throw new Error('fio report: no jobs');
  const result: FioResult = { iops: 0, bytesPerSecond: 0, ios: 0, ioBytes: 0, runtimeMs: 0, fioCpuPercent: 0 };
  for (const [index, job] of jobs.entries()) {
    const where = `jobs[${index}]`;
    const error = numberField(job, 'error', where);
    if (error !== 0) throw new Error(`fio report: ${where} failed with error ${error}`);
    for (const direction of ['read', 'write'] as const) {
      const stats = field(job, direction, where);
      const place = `${where}.${direction}`;
      result.iops += numberField(stats, 'iops', place);
      result.bytesPerSecond += numberField(stats, 'bw_bytes', place);
      result.ios += numberField(stats, 'total_ios', place);
      result.ioBytes += numberField(stats, 'io_bytes', place);
    }
    result.runtimeMs = Math.max(result.runtimeMs, numberField(job, 'job_runtime', where));
    result.fioCpuPercent += numberField(job, 'usr_cpu', where) + numberField(job, 'sys_cpu', where);
  }
  return result;
}
