/**
 * `node --expose-gc bench-map-probe.js POOL`: opens a stopped pool in this otherwise idle process
 * and prints, as one JSON line, how much the V8 heap grew (after full collections on both sides):
 * the memory its block maps and metadata take once loaded from the checkpoint and journal, without
 * the garbage a running server carries. The benchmark's memory part runs it.
 */
import { Pool } from '../src/store/index.js';

const collect = (globalThis as { gc?: () => void }).gc;

function settledHeap(): number {
  collect!();
  collect!();
  return process.memoryUsage().heapUsed;
}

async function main(): Promise<void> {
  const dir = process.argv[2];
  if (dir === undefined || collect === undefined) {
    process.stderr.write('usage: node --expose-gc bench-map-probe.js POOL\n');
    process.exitCode = 2;
    return;
  }
  const heapBeforeBytes = settledHeap();
  const started = performance.now();
  const pool = await Pool.open(dir);
  const openMs = performance.now() - started;
  const heapAfterBytes = settledHeap();
  const volumes = pool.volumes().length;
  await pool.close();
  process.stdout.write(`${JSON.stringify({ heapBeforeBytes, heapAfterBytes, openMs, volumes })}\n`);
}

await main();
