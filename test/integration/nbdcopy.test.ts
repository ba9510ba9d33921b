/**
 * nbdcopy (libnbd, multi-conn and pipelined by default) round trips through a real `clonebd serve`:
 * file → volume → file, and volume → volume, compared by sha256.
 */
import { createHash, randomBytes } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { makeTempDir, removeTempDirs, requireTool, runOk } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;

/** Zero runs in the source file: block-aligned ones (holes in a sparse file) and ragged ones. */
const ZERO_RUNS: ReadonlyArray<readonly [offset: number, length: number]> = [
  [512 * KiB, 256 * KiB],
  [2 * MiB + 100, 4 * KiB + 333],
  [3 * MiB, 64 * KiB],
  [SIZE - 256 * KiB, 256 * KiB],
];

let server: ServerProcess;
let work: string;

beforeAll(async () => {
  work = await makeTempDir('clonebd-nbdcopy-');
  server = await startServerProcess({
    prepare: async (pool) => {
      await pool.createVolume('a', SIZE);
      await pool.createVolume('b', SIZE);
    },
  });
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Random data with ZERO_RUNS, written sparsely: only the non-zero runs are written to the file. */
async function makeSourceFile(path: string): Promise<Buffer> {
  const content = randomBytes(SIZE);
  for (const [offset, length] of ZERO_RUNS) content.fill(0, offset, offset + length);
  const file = await open(path, 'w');
  try {
    let position = 0;
    for (const [offset, length] of [...ZERO_RUNS, [SIZE, 0] as const]) {
      if (offset > position) await file.write(content, position, offset - position, position);
      position = Math.max(position, offset + length);
    }
    await file.truncate(SIZE);
  } finally {
    await file.close();
  }
  return content;
}

/** Fills an export with non-zero bytes, so a copy that skips its zero runs would show. */
async function scribble(nbdcopy: string, uri: string): Promise<void> {
  const path = join(work, 'scribble.raw');
  await writeFile(path, Buffer.alloc(SIZE, 0xee));
  await runOk(nbdcopy, [path, uri]);
}

describe('nbdcopy', () => {
  it('copies a random file with zero runs into a volume and back unchanged (sha256)', async (ctx) => {
    const nbdcopy = requireTool(ctx, 'nbdcopy');
    const source = join(work, 'source.raw');
    const copy = join(work, 'copy.raw');
    const content = await makeSourceFile(source);
    await scribble(nbdcopy, server.uri('a'));

    await runOk(nbdcopy, ['--flush', source, server.uri('a')]);
    await runOk(nbdcopy, [server.uri('a'), copy]);

    const copied = await readFile(copy);
    expect(copied.length).toBe(SIZE);
    expect(sha256(copied)).toBe(sha256(content));
  });

  it('copies one export to another unchanged (sha256)', async (ctx) => {
    const nbdcopy = requireTool(ctx, 'nbdcopy');
    const source = join(work, 'source2.raw');
    const copy = join(work, 'copy2.raw');
    const content = await makeSourceFile(source);
    await runOk(nbdcopy, [source, server.uri('a')]);
    await scribble(nbdcopy, server.uri('b'));

    await runOk(nbdcopy, ['--flush', server.uri('a'), server.uri('b')]);
    await runOk(nbdcopy, [server.uri('b'), copy]);

    expect(sha256(await readFile(copy))).toBe(sha256(content));
  });
});
