/**
 * The short crash run: 20 SIGKILLs of a real server under writes, flushes, FUA writes, trims,
 * zero-writes, clones, snapshots and deletions; nothing acknowledged as durable may be lost.
 * `node dist/scripts/crash-harness.js --kills 200` is the full run.
 */
import { tmpdir } from 'node:os';
import { describe, expect, it } from 'vitest';
import { runCrashHarness } from '../../scripts/crash-harness.js';
import { CLI_PATH } from '../helpers/server-process.js';

describe('crash harness, short run', () => {
  it('20 kills -9 lose no flushed or FUA write, leak no layer file, and the pool always reopens', { timeout: 180_000 }, async () => {
    const log: string[] = [];
    const report = await runCrashHarness({
      kills: 20,
      connections: 3,
      volumeBlocks: 256,
      maxVolumes: 6,
      minRunMs: 50,
      maxRunMs: 400,
      seed: Math.floor(Math.random() * 2 ** 31),
      work: tmpdir(),
      log: (line) => log.push(line),
      cli: CLI_PATH,
    });
    expect(report.violations, `seed ${report.seed}\n${log.join('\n')}`).toEqual([]);
    expect(report.crashes).toBe(20);
    expect(report.operations, 'writes acknowledged between kills').toBeGreaterThan(200);
    expect(report.flushes).toBeGreaterThan(0);
    expect(report.copies, 'clones and snapshots made between kills').toBeGreaterThan(0);
    expect(report.bytesVerified).toBeGreaterThan(0);
  });
});
