/**
 * fio's libnbd engine (`ioengine=nbd`) against a real `clonebd serve`: concurrent random writes
 * from several connections, then fio reads every block back and checks its crc32c.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { describeResult, makeTempDir, removeTempDirs, requireTool, run } from '../helpers/tools.js';

const MiB = 1 << 20;

interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

let server: ServerProcess;
let work: string;

beforeAll(async () => {
  work = await makeTempDir('clonebd-fio-');
  server = await startServerProcess({
    prepare: async (pool) => {
      await pool.createVolume('fio', 8 * MiB);
      await pool.createVolume('fio-mixed', 8 * MiB);
    },
  });
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

/** Runs one fio job set, asserts it exited 0, and returns its jobs from the JSON report. */
async function runFio(fio: string, name: string, options: string[]): Promise<FioJob[]> {
  const output = join(work, `${name}.json`);
  const result = await run(fio, [
    `--name=${name}`,
    '--ioengine=nbd',
    `--uri=${server.uri(name)}`,
    '--verify=crc32c',
    '--verify_fatal=1',
    // fio would otherwise leave its verify state files in the working directory.
    '--verify_state_save=0',
    '--do_verify=1',
    '--output-format=json',
    `--output=${output}`,
    ...options,
  ]);
  const report = describeResult(result);
  expect(result.code, report).toBe(0);
  expect(result.stderr, report).not.toMatch(/verify|bad magic|crc32c/i);
  const parsed = JSON.parse(await readFile(output, 'utf8')) as { jobs: FioJob[] };
  return parsed.jobs;
}

describe('fio ioengine=nbd', () => {
  it('random 4k writes from two connections at iodepth 8 verify with crc32c', async (ctx) => {
    const fio = requireTool(ctx, 'fio');
    const jobs = await runFio(fio, 'fio', [
      '--rw=randwrite',
      '--bs=4k',
      '--size=2m',
      '--numjobs=2',
      '--offset_increment=2m', // each job verifies only its own region
      '--iodepth=8',
    ]);
    expect(jobs).toHaveLength(2);
    for (const job of jobs) {
      expect(job.error).toBe(0);
      expect(job.write.io_bytes).toBe(2 * MiB);
      expect(job.read.io_bytes).toBe(2 * MiB); // the verify pass
    }
  });

  it('random writes of mixed sizes with periodic flushes verify with crc32c', async (ctx) => {
    const fio = requireTool(ctx, 'fio');
    const jobs = await runFio(fio, 'fio-mixed', [
      '--rw=randwrite',
      '--bsrange=4k-128k',
      '--size=6m',
      '--iodepth=16',
      '--fsync=8',
    ]);
    expect(jobs).toHaveLength(1);
    expect(jobs[0]!.error).toBe(0);
    expect(jobs[0]!.write.io_bytes).toBe(6 * MiB);
    expect(jobs[0]!.read.io_bytes).toBe(6 * MiB);
  });
});
