/**
 * Clone creation time (`npm run bench -- --clone-timing`): for each case of CLONE_CASES, a fresh
 * clonebd pool and server, a source volume of the case's size with its extents written, then timed
 * clone requests through the admin API; beside it, `qemu-img create -b` over a raw base of the same
 * size with the same extents written. Each case's files are removed before the next case starts.
 */
import { mkdir, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { adminSocketPath } from '../src/cli/serve.js';
import { AdminClient } from '../src/control/admin-client.js';
import { isOperationError } from '../src/util/errors.js';
import { findFreePort, runTool } from './bench-child.js';
import { BLOCK, FILL_BYTE, randomBlocks } from './bench-layouts.js';
import { connect, countWrittenExtents, writeBlocks } from './bench-nbd.js';
import { CLONE_CASES, summariseTimes, type CloneCase, type CloneTimingResult, type TimingSummary } from './bench-scale-report.js';
import { startClonebd, type Logger } from './bench-targets.js';

const SOURCE = 'source';
const SEED = 0xc1042;
const TOOL_TIMEOUT_MS = 60_000;
/** Writes in flight when scattering extents into a raw file. */
const FILE_WRITE_DEPTH = 32;

export interface CloneTimingOptions {
  /** An empty directory for the cases' pools and files. */
  dir: string;
  host: string;
  requests: number;
  log: Logger;
  cases?: readonly CloneCase[];
}

function blocksOf(cloneCase: CloneCase): Float64Array {
  return randomBlocks(Math.floor(cloneCase.size / BLOCK), cloneCase.extents, SEED + cloneCase.extents, true);
}

async function timeClonebd(
  cloneCase: CloneCase,
  dir: string,
  options: CloneTimingOptions,
  notes: string[],
): Promise<{ measuredExtents: number | undefined; clone: TimingSummary; poolStatus: TimingSummary }> {
  const pool = join(dir, 'pool');
  const port = await findFreePort(options.host);
  const server = await startClonebd(pool, options.host, port);
  try {
    const admin = new AdminClient(adminSocketPath(pool));
    try {
      await admin.createVolume(SOURCE, cloneCase.size);
    } catch (error) {
      if (!isOperationError(error, 'ERANGE')) throw error;
      await admin.createVolume(SOURCE, cloneCase.size - BLOCK);
      notes.push(`clonebd refused ${cloneCase.size} bytes on this file system (${error.message}); its source is 4 KiB smaller`);
    }
    const client = await connect({ host: options.host, port }, SOURCE);
    try {
      let measuredExtents: number | undefined;
      if (cloneCase.extents > 0) {
        options.log(`clone timing: ${cloneCase.label}: writing ${cloneCase.extents} extents`);
        await writeBlocks(client, blocksOf(cloneCase));
        measuredExtents = await countWrittenExtents(client);
      }
      const clones: number[] = [];
      for (let i = 0; i < options.requests; i++) {
        await client.flush();
        const started = performance.now();
        await admin.clone(SOURCE, `clone-${i}`);
        clones.push(performance.now() - started);
        await admin.delete(`clone-${i}`, true);
      }
      const statuses: number[] = [];
      for (let i = 0; i < options.requests; i++) {
        const started = performance.now();
        await admin.poolStatus();
        statuses.push(performance.now() - started);
      }
      return { measuredExtents, clone: summariseTimes(clones), poolStatus: summariseTimes(statuses) };
    } finally {
      await client.disconnect();
    }
  } finally {
    await server.stop();
  }
}

/** A raw file of the case's size (or the largest the file system allows) with the case's extents written. */
async function rawBase(cloneCase: CloneCase, path: string, notes: string[]): Promise<void> {
  const handle = await open(path, 'wx');
  try {
    try {
      await handle.truncate(cloneCase.size);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EFBIG') throw error;
      await handle.truncate(cloneCase.size - BLOCK);
      notes.push(`this file system caps a file below ${cloneCase.size} bytes; the raw base for qemu-img is 4 KiB smaller`);
    }
    const blocks = blocksOf(cloneCase);
    const data = Buffer.alloc(BLOCK, FILL_BYTE);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < blocks.length) await handle.write(data, 0, BLOCK, blocks[next++]! * BLOCK);
    };
    await Promise.all(Array.from({ length: FILE_WRITE_DEPTH }, worker));
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function timeQemuImg(cloneCase: CloneCase, dir: string, options: CloneTimingOptions, notes: string[]): Promise<TimingSummary> {
  const base = join(dir, 'base.raw');
  const overlay = join(dir, 'overlay.qcow2');
  await rawBase(cloneCase, base, notes);
  const times: number[] = [];
  for (let i = 0; i < options.requests; i++) {
    const started = performance.now();
    await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay], TOOL_TIMEOUT_MS);
    times.push(performance.now() - started);
    await rm(overlay);
  }
  return summariseTimes(times);
}

function firstLine(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).split('\n')[0]!;
}

export async function runCloneTiming(options: CloneTimingOptions): Promise<CloneTimingResult[]> {
  const results: CloneTimingResult[] = [];
  for (const cloneCase of options.cases ?? CLONE_CASES) {
    const dir = join(options.dir, cloneCase.id);
    await mkdir(dir, { recursive: true });
    const result: CloneTimingResult = { case: cloneCase, measuredExtents: undefined, clone: undefined, poolStatus: undefined, qemuImg: undefined, notes: [] };
    try {
      try {
        Object.assign(result, await timeClonebd(cloneCase, join(dir, 'clonebd'), options, result.notes));
      } catch (error) {
        result.notes.push(`clonebd failed: ${firstLine(error)}`);
        options.log(`clone timing: ${cloneCase.label}: clonebd FAILED\n${String(error)}`);
      }
      try {
        await mkdir(join(dir, 'qemu'));
        result.qemuImg = await timeQemuImg(cloneCase, join(dir, 'qemu'), options, result.notes);
      } catch (error) {
        result.notes.push(`qemu-img failed: ${firstLine(error)}`);
        options.log(`clone timing: ${cloneCase.label}: qemu-img FAILED\n${String(error)}`);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    const median = (summary: TimingSummary | undefined): string => (summary === undefined ? '—' : `${summary.medianMs.toFixed(2)} ms`);
    options.log(
      `clone timing: ${cloneCase.label}: clonebd ${median(result.clone)} (GET /v1/pool ${median(result.poolStatus)}), qemu-img ${median(result.qemuImg)}`,
    );
    results.push(result);
  }
  return results;
}
