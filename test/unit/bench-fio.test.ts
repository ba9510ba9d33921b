import { describe, expect, it } from 'vitest';
import { parseFioReport, rowJobArgs, ROWS } from '../../scripts/bench-fio.js';

/** A fio 3.x JSON job with only the fields the parser reads (fio prints many more). */
function job(options: { error?: number; read?: [number, number, number, number]; write?: [number, number, number, number] }) {
  const side = ([iops, bw, ios, bytes]: [number, number, number, number]) => ({
    iops,
    bw_bytes: bw,
    total_ios: ios,
    io_bytes: bytes,
    runtime: 2000,
    bw_min: 1,
    lat_ns: { mean: 1 },
  });
  return {
    jobname: 'randread-4k-qd1',
    error: options.error ?? 0,
    read: side(options.read ?? [0, 0, 0, 0]),
    write: side(options.write ?? [0, 0, 0, 0]),
    trim: side([0, 0, 0, 0]),
    job_runtime: 2001,
    usr_cpu: 12.5,
    sys_cpu: 30,
  };
}

function report(...jobs: unknown[]): string {
  return JSON.stringify({ 'fio version': 'fio-3.33', timestamp: 1, jobs }, null, 2);
}

describe('parseFioReport', () => {
  it('reads iops, bandwidth, operations, bytes, runtime and fio CPU of a read job', () => {
    const result = parseFioReport(report(job({ read: [53974.5, 221079604, 108003, 442380288] })));
    expect(result).toEqual({
      iops: 53974.5,
      bytesPerSecond: 221079604,
      ios: 108003,
      ioBytes: 442380288,
      runtimeMs: 2001,
      fioCpuPercent: 42.5,
    });
  });

  it('adds reads and writes, and sums several jobs', () => {
    const result = parseFioReport(report(job({ write: [100, 409600, 200, 819200] }), job({ read: [50, 204800, 100, 409600] })));
    expect(result.iops).toBe(150);
    expect(result.ios).toBe(300);
    expect(result.ioBytes).toBe(1228800);
  });

  it('skips notes fio prints before the JSON', () => {
    const text = `note: both iodepth >= 1 and synchronous I/O engine are selected\n${report(job({ read: [1, 4096, 2, 8192] }))}`;
    expect(parseFioReport(text).ios).toBe(2);
  });

  it('refuses a job that reports an error, so a failed run never becomes a figure', () => {
    expect(() => parseFioReport(report(job({ error: 5, read: [1, 1, 1, 1] })))).toThrow(/error 5/);
  });

  it('refuses output that is not a fio report', () => {
    expect(() => parseFioReport('fio: engine nbd not loadable')).toThrow(/no JSON/);
    expect(() => parseFioReport('{"jobs": [')).toThrow(/not valid JSON/);
    expect(() => parseFioReport('{"jobs": []}')).toThrow(/no jobs/);
    expect(() => parseFioReport(JSON.stringify({ jobs: [{ error: 0, read: { iops: 'x' } }] }))).toThrow(/not a number/);
  });
});

describe('rowJobArgs', () => {
  it('runs each row time-based through the nbd engine with its own pattern, size and depth', () => {
    const row = ROWS.find((candidate) => candidate.id === 'randwrite-4k-qd32')!;
    const args = rowJobArgs(row, 'nbd://127.0.0.1:10809/bench', 10, 'out.json');
    expect(args).toEqual(
      expect.arrayContaining([
        '--ioengine=nbd',
        '--uri=nbd://127.0.0.1:10809/bench',
        '--rw=randwrite',
        '--bs=4096',
        '--iodepth=32',
        '--time_based',
        '--runtime=10s',
        '--output-format=json',
        '--output=out.json',
      ]),
    );
  });

  it('has the six rows of the plain-volume matrix, with unique ids', () => {
    expect(ROWS.map((row) => row.id)).toEqual([
      'randread-4k-qd1',
      'randread-4k-qd32',
      'randwrite-4k-qd1',
      'randwrite-4k-qd32',
      'read-1m-qd8',
      'write-1m-qd8',
    ]);
  });
});
