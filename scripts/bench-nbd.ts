/**
 * The harness's own NBD I/O, through the native-free client: pipelined writes that build chain
 * levels and fragmented volumes, sequential fills, and counting a volume's written extents.
 */
import { NbdClient, type Extent, type NbdTarget } from '../native-free/index.js';
import { BLOCK, FILL_BYTE } from './bench-layouts.js';

/** 4 KiB requests kept in flight by the block writer: enough to keep a server busy on two cores. */
const DEPTH = 64;
/** 1 MiB requests in flight in a sequential fill, as in fio's prefill: more would only grow buffers. */
const FILL_DEPTH = 8;
/** Largest length one BLOCK_STATUS request asks about (the field is 32 bits). */
const STATUS_SPAN = 2 ** 31;
const NBD_STATE_HOLE = 1;

export function connect(target: NbdTarget, exportName: string): Promise<NbdClient> {
  return NbdClient.connect(target, { exportName });
}

async function pipelined(count: number, depth: number, issue: (index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) await issue(next++);
  };
  await Promise.all(Array.from({ length: Math.min(depth, count) }, worker));
}

/**
 * Writes one 4 KiB block at each block number, DEPTH at a time, then flushes; with `flushEvery`,
 * also flushes after every that many writes, as a file system's periodic commit would.
 */
export async function writeBlocks(client: NbdClient, blocks: ArrayLike<number>, flushEvery = Infinity): Promise<void> {
  const data = Buffer.alloc(BLOCK, FILL_BYTE);
  await pipelined(blocks.length, DEPTH, async (index) => {
    await client.write(blocks[index]! * BLOCK, data);
    if ((index + 1) % flushEvery === 0) await client.flush();
  });
  await client.flush();
}

/** Writes every byte of the export in `chunk`-sized sequential writes, then flushes. */
export async function fillSequential(client: NbdClient, chunk = 2 ** 20): Promise<void> {
  const data = Buffer.alloc(chunk, FILL_BYTE);
  const count = Math.ceil(client.size / chunk);
  await pipelined(count, FILL_DEPTH, (index) => {
    const offset = index * chunk;
    return client.write(offset, offset + chunk <= client.size ? data : data.subarray(0, client.size - offset));
  });
  await client.flush();
}

/**
 * Counts maximal runs of data (not hole) in a stream of `base:allocation` extents that arrives in
 * pieces: `state` carries whether the previous piece ended in data, so a run split between two
 * replies counts once.
 */
export function countDataRuns(extents: readonly Extent[], state: { inData: boolean; runs: number }): void {
  for (const extent of extents) {
    if (extent.length === 0) continue;
    const data = (extent.flags & NBD_STATE_HOLE) === 0;
    if (data && !state.inData) state.runs++;
    state.inData = data;
  }
}

/** The number of written extents of the export, as the server reports its allocation. */
export async function countWrittenExtents(client: NbdClient): Promise<number> {
  const state = { inData: false, runs: 0 };
  let offset = 0;
  while (offset < client.size) {
    const extents = await client.blockStatus(offset, Math.min(STATUS_SPAN, client.size - offset));
    const covered = extents.reduce((sum, extent) => sum + extent.length, 0);
    if (covered === 0) throw new Error(`BLOCK_STATUS at ${offset} made no progress`);
    // The last extent may reach past what was asked; clip so the next request starts right after.
    let room = client.size - offset;
    const clipped = extents.map((extent) => {
      const length = Math.min(extent.length, room);
      room -= length;
      return { ...extent, length };
    });
    countDataRuns(clipped, state);
    offset += Math.min(covered, client.size - offset);
  }
  return state.runs;
}
