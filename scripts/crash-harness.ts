/**
 * Crash harness: SIGKILLs a real `clonebd serve` again and again while clients write and the pool
 * clones, snapshots and deletes, and checks after every restart that nothing acknowledged as
 * durable was lost (scripts/crash-model.ts says exactly what that means per block).
 *
 *   node dist/scripts/crash-harness.js [--kills 200] [--connections 4] [--seed N] [--work DIR]
 *
 * Each cycle: start the server on the pool, verify every volume against the model, make sure there
 * are volumes to write, start the clients and the clone/snapshot/delete churn, kill the server at
 * a random moment. At the end the pool is emptied and must hold no layer files. Exit status 0 only
 * with zero violations.
 */
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BUILT_CLI, startClonebd, type ClonebdProcess } from './clonebd-process.js';
import { NbdClient } from '../native-free/index.js';
import { BLOCK_SIZE, CopyInProgress, VolumeModel, blockContent, observe } from './crash-model.js';

const MAX_BLOCKS_PER_WRITE = 4;
const VERIFY_CHUNK_BLOCKS = 256;

export interface CrashOptions {
  kills: number;
  connections: number;
  /** Blocks per volume. */
  volumeBlocks: number;
  /** Volumes, clones and snapshots at most at once. */
  maxVolumes: number;
  /** The server is killed this long after the clients start, chosen uniformly. */
  minRunMs: number;
  maxRunMs: number;
  seed: number;
  /** Parent of the pool's temp directory. */
  work: string;
  log: (line: string) => void;
  /** The clonebd CLI to run (default: the built one beside this script). */
  cli?: string;
}

export interface CrashReport {
  crashes: number;
  operations: number;
  flushes: number;
  copies: number;
  deletions: number;
  bytesVerified: number;
  violations: string[];
  seed: number;
}

/** mulberry32: reproducible runs from --seed. */
function random(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Entry {
  model: VolumeModel;
  /** Being created or deleted when the server died: it may or may not exist afterwards. */
  state: 'live' | 'creating' | 'deleting';
  /** Clones and snapshots being made of it, which must see its writes. */
  copies: Set<CopyInProgress>;
  attached: number;
}

export async function runCrashHarness(options: CrashOptions): Promise<CrashReport> {
  const rand = random(options.seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(rand() * items.length)]!;
  const report: CrashReport = { crashes: 0, operations: 0, flushes: 0, copies: 0, deletions: 0, bytesVerified: 0, violations: [], seed: options.seed };
  const violation = (text: string): void => {
    report.violations.push(text);
    options.log(`VIOLATION ${text}`);
  };
  const dir = await mkdtemp(join(options.work, 'clonebd-crash-'));
  const pool = join(dir, 'pool');
  const entries = new Map<string, Entry>();
  const zeroWrites = new Set<number>([0]);
  let nextId = 1;
  let nextName = 0;
  let server: ClonebdProcess | undefined;

  const verifyAll = async (current: ClonebdProcess): Promise<void> => {
    const existing = new Set((await current.admin.listVolumes()).map((volume) => volume.name));
    for (const [name, entry] of [...entries]) {
      if (!existing.has(name)) {
        if (entry.state === 'live') violation(`${name} was created and not deleted, but is gone`);
        entries.delete(name);
        continue;
      }
      entry.state = 'live';
      entry.copies.clear();
      entry.attached = 0;
      const client = await NbdClient.connect({ path: current.socket }, { exportName: name });
      try {
        const blocks = entry.model.blocks.length;
        for (let first = 0; first < blocks; first += VERIFY_CHUNK_BLOCKS) {
          const count = Math.min(VERIFY_CHUNK_BLOCKS, blocks - first);
          const data = await client.read(first * BLOCK_SIZE, count * BLOCK_SIZE);
          for (let i = 0; i < count; i++) {
            const block = first + i;
            const seen = observe(data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE), block);
            const problem = entry.model.settle(block, seen, (id) => zeroWrites.has(id));
            if (problem !== undefined) violation(problem);
          }
          report.bytesVerified += count * BLOCK_SIZE;
        }
      } finally {
        await client.disconnect().catch(() => client.destroy());
      }
    }
    for (const name of existing) {
      if (!entries.has(name)) violation(`${name} exists, but was never created or was deleted`);
    }
    // Opening starts a compaction; the files of layers it folds go once it is done.
    const { layers } = await current.admin.waitIdle();
    const layerFiles = (await readdir(join(pool, 'layers'))).length;
    if (layerFiles > layers) violation(`${layerFiles} layer files for ${layers} layers: leaked`);
  };

  const createVolume = async (current: ClonebdProcess): Promise<void> => {
    const name = `v${nextName++}`;
    const model = VolumeModel.empty(name, options.volumeBlocks);
    const entry: Entry = { model, state: 'creating', copies: new Set(), attached: 0 };
    entries.set(name, entry);
    await current.admin.createVolume(name, options.volumeBlocks * BLOCK_SIZE);
    entry.state = 'live';
  };

  /** One connection writing to one volume until the server dies or `stop` is set. */
  const writer = async (current: ClonebdProcess, entry: Entry, stop: { now: boolean }): Promise<void> => {
    // Counted before connecting, so the churn never picks it for deletion.
    entry.attached++;
    const client = await NbdClient.connect({ path: current.socket }, { exportName: entry.model.name });
    const model = entry.model;
    const inFlight = new Set<Promise<void>>();
    const one = async (): Promise<void> => {
      const roll = rand();
      if (roll < 0.08) {
        const done = model.flushSent();
        await client.flush();
        done();
        report.flushes++;
        return;
      }
      const count = 1 + Math.floor(rand() * MAX_BLOCKS_PER_WRITE);
      const first = Math.floor(rand() * (model.blocks.length - count + 1));
      if (model.isBusy(first, count)) return;
      const id = nextId++;
      const kind = roll < 0.75 ? 'write' : roll < 0.85 ? 'trim' : 'zero';
      const fua = rand() < 0.2;
      if (kind !== 'write') zeroWrites.add(id);
      model.issue(id, first, count);
      for (const copy of entry.copies) copy.noteWrite(id, first, count);
      try {
        if (kind === 'write') {
          const data = Buffer.concat(Array.from({ length: count }, (_, i) => blockContent(id, first + i)));
          await client.write(first * BLOCK_SIZE, data, { fua });
        } else if (kind === 'trim') {
          await client.trim(first * BLOCK_SIZE, count * BLOCK_SIZE, { fua });
        } else {
          await client.zero(first * BLOCK_SIZE, count * BLOCK_SIZE, { fua, noHole: rand() < 0.5 });
        }
        model.acknowledge(id, first, count, fua);
        report.operations++;
      } catch (error) {
        model.abandon(first, count);
        throw error;
      }
    };
    try {
      while (!stop.now) {
        while (inFlight.size < 8 && !stop.now) {
          const operation: Promise<void> = one().finally(() => inFlight.delete(operation));
          inFlight.add(operation);
        }
        await Promise.race(inFlight);
      }
    } finally {
      await Promise.allSettled(inFlight);
      client.destroy();
    }
  };

  /** Clones, snapshots and deletions, one at a time, until the server dies or `stop` is set. */
  const churn = async (current: ClonebdProcess, stop: { now: boolean }): Promise<void> => {
    while (!stop.now) {
      const live = [...entries.values()].filter((entry) => entry.state === 'live');
      const deletable = live.filter((entry) => entry.attached === 0 && entry.copies.size === 0);
      if (live.length < options.maxVolumes && (rand() < 0.7 || deletable.length === 0)) {
        const source = pick(live);
        const kind = source.model.kind === 'volume' && rand() < 0.5 ? 'snapshot' : 'volume';
        const name = `${kind === 'snapshot' ? 's' : 'c'}${nextName++}`;
        const copy = new CopyInProgress(source.model);
        source.copies.add(copy);
        const entry: Entry = { model: copy.model(name, kind), state: 'creating', copies: new Set(), attached: 0 };
        entries.set(name, entry);
        try {
          if (kind === 'snapshot') await current.admin.snapshot(source.model.name, name);
          else await current.admin.clone(source.model.name, name);
          entry.state = 'live';
          report.copies++;
        } finally {
          source.copies.delete(copy);
          // Whether made or cut short, the copy may hold any write the source saw until now.
          entry.model = copy.model(name, kind);
        }
      } else {
        const victim = pick(deletable);
        victim.state = 'deleting';
        await current.admin.delete(victim.model.name);
        entries.delete(victim.model.name);
        report.deletions++;
      }
    }
  };

  try {
    for (let cycle = 0; cycle <= options.kills; cycle++) {
      server = await startClonebd(options.cli ?? BUILT_CLI, pool);
      await verifyAll(server);
      if (cycle === options.kills) break;
      while ([...entries.values()].filter((entry) => entry.model.kind === 'volume').length < 2) await createVolume(server);

      const current = server;
      const stop = { now: false };
      const volumes = [...entries.values()].filter((entry) => entry.model.kind === 'volume');
      const failedEarly = (error: unknown): void => {
        if (!stop.now) violation(`a request failed before the kill: ${error instanceof Error ? error.message : String(error)}`);
      };
      const work = Array.from({ length: options.connections }, () => writer(current, pick(volumes), stop).catch(failedEarly));
      work.push(churn(current, stop).catch(failedEarly));
      // The crash point: a random moment of the run, which is what this harness is for.
      await new Promise((resolve) => setTimeout(resolve, options.minRunMs + rand() * (options.maxRunMs - options.minRunMs)));
      stop.now = true;
      await current.kill();
      await Promise.all(work);
      report.crashes++;
      if (report.crashes % 10 === 0 || report.crashes === options.kills) {
        options.log(`${report.crashes} crashes, ${report.operations} operations, ${report.bytesVerified} bytes verified, ${report.violations.length} violations`);
      }
    }
    // Empty the pool: every layer file must go with the last volume.
    for (const name of [...entries.keys()]) await server!.admin.delete(name);
    await server!.stop();
    const left = await readdir(join(pool, 'layers'));
    if (left.length > 0) violation(`layer files left after deleting every volume: ${left.join(', ')}`);
  } finally {
    if (server !== undefined) await server.kill();
    await rm(dir, { recursive: true, force: true });
  }
  return report;
}

const USAGE = `usage: node dist/scripts/crash-harness.js [flags]
  --kills N          SIGKILLs (default 200)
  --connections N    writing connections (default 4)
  --volume-mib N     size of each volume (default 4)
  --max-volumes N    volumes, clones and snapshots at most at once (default 8)
  --seed N           random seed (default: time)
  --work DIR         parent of the pool's temp directory (default: the OS temp dir)
`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      kills: { type: 'string', default: '200' },
      connections: { type: 'string', default: '4' },
      'volume-mib': { type: 'string', default: '4' },
      'max-volumes': { type: 'string', default: '8' },
      seed: { type: 'string' },
      work: { type: 'string', default: tmpdir() },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return;
  }
  const count = (flag: string, text: string): number => {
    const value = Number(text);
    if (!Number.isSafeInteger(value) || value < 1) throw new Error(`--${flag} wants a positive integer, not ${JSON.stringify(text)}`);
    return value;
  };
  const seed = values.seed === undefined ? Date.now() % 2 ** 31 : count('seed', values.seed);
  const started = performance.now();
  const report = await runCrashHarness({
    kills: count('kills', values.kills),
    connections: count('connections', values.connections),
    volumeBlocks: (count('volume-mib', values['volume-mib']) * 2 ** 20) / BLOCK_SIZE,
    maxVolumes: Math.max(3, count('max-volumes', values['max-volumes'])),
    minRunMs: 50,
    maxRunMs: 600,
    seed,
    work: values.work,
    log: (line) => process.stderr.write(`${line}\n`),
  });
  const rows: [string, string][] = [
    ['seed', String(report.seed)],
    ['crashes', String(report.crashes)],
    ['operations', String(report.operations)],
    ['flushes', String(report.flushes)],
    ['clones and snapshots', String(report.copies)],
    ['deletions', String(report.deletions)],
    ['bytes verified', String(report.bytesVerified)],
    ['violations', String(report.violations.length)],
    ['seconds', ((performance.now() - started) / 1000).toFixed(1)],
  ];
  for (const [name, value] of rows) process.stdout.write(`${name.padEnd(22)}${value}\n`);
  if (report.violations.length > 0) process.exitCode = 1;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((error: unknown) => {
    process.stderr.write(`crash-harness: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exit(2);
  });
}
