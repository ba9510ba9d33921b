/**
 * Crash consistency (power loss): random workloads on volumes, snapshots and clones over a file
 * system that crashes at a random mutating call and then drops or tears every unsynced write, data
 * and journal alike. Crash points fall in the journal, checkpoints (a small checkpoint threshold
 * makes them frequent), layer deletion, grow and flatten. The reopened pool must open cleanly,
 * every byte whose last write was flushed (flush, FUA, or the flush inside create/snapshot/clone/
 * delete/grow/flatten) must read back as flushed, and no layer file may be left that no layer owns.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Pool } from '../../src/store/index.js';
import type { BlockDevice } from '../../src/store/types.js';
import { MemoryFiles, crashAndReopen } from '../helpers/store-memfs.js';

const KiB = 1024;
const NAMES = ['a', 'b', 'c', 'd'];

type Step =
  | { op: 'create'; name: string; size: number }
  | { op: 'write'; target: number; at: number; length: number; seed: number; fua: boolean }
  | { op: 'trim' | 'zero'; target: number; at: number; length: number; fua: boolean; mayTrim: boolean }
  | { op: 'flush' }
  | { op: 'grow'; target: number; by: number }
  | { op: 'flatten'; target: number }
  /** Waits for background work, so crashes also land inside compactions. */
  | { op: 'idle' }
  | { op: 'snapshot' | 'clone'; target: number; name: string }
  /** `spare`: a volume this step never deletes. */
  | { op: 'delete'; target: number; spare?: string };

interface ModelVolume {
  snapshot: boolean;
  /** What the volume holds now, as far as completed calls go. */
  current: Uint8Array;
  /** What it held at its last completed flush. */
  flushed: Uint8Array;
  /** Bytes changed (or possibly changed) since that flush: after a crash they may hold anything. */
  touched: Uint8Array;
  /** The call creating or deleting it was cut by the crash: it may or may not exist. */
  uncertain: boolean;
  /** Sizes it may have: two while a grow was cut by the crash. */
  sizes: number[];
}

const step: fc.Arbitrary<Step> = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('create' as const), name: fc.constantFrom(...NAMES), size: fc.integer({ min: 8, max: 96 }).map((k) => k * KiB) }), weight: 2 },
  {
    arbitrary: fc.record({
      op: fc.constant('write' as const),
      target: fc.nat(7),
      at: fc.nat(1 << 20),
      length: fc.oneof(fc.integer({ min: 1, max: 700 }), fc.integer({ min: 1, max: 24 * KiB })),
      seed: fc.nat(255),
      fua: fc.boolean(),
    }),
    weight: 8,
  },
  {
    arbitrary: fc.record({
      op: fc.constantFrom('trim' as const, 'zero' as const),
      target: fc.nat(7),
      at: fc.nat(1 << 20),
      length: fc.integer({ min: 1, max: 24 * KiB }),
      fua: fc.boolean(),
      mayTrim: fc.boolean(),
    }),
    weight: 2,
  },
  { arbitrary: fc.constant({ op: 'flush' as const }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('grow' as const), target: fc.nat(7), by: fc.integer({ min: 1, max: 40 }).map((k) => k * KiB) }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('flatten' as const), target: fc.nat(7) }), weight: 1 },
  { arbitrary: fc.constant({ op: 'idle' as const }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constantFrom('snapshot' as const, 'clone' as const), target: fc.nat(7), name: fc.constantFrom(...NAMES) }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('delete' as const), target: fc.nat(7) }), weight: 1 },
);

function pick(model: Map<string, ModelVolume>, target: number, volumesOnly: boolean): string | undefined {
  const names = [...model.keys()].filter((name) => !volumesOnly || !model.get(name)!.snapshot).sort();
  return names.length === 0 ? undefined : names[target % names.length];
}

function bytesOf(seed: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) out[i] = (seed * 7 + i * 13 + (i >> 9)) & 0xff;
  return out;
}

async function readAll(handle: BlockDevice, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  for (const piece of await handle.read(0, length)) if (piece.kind === 'data') piece.data.copy(out, piece.offset);
  return out;
}

function markFlushed(model: Map<string, ModelVolume>): void {
  for (const volume of model.values()) {
    volume.flushed = volume.current.slice();
    volume.touched.fill(0);
  }
}

/** Runs steps until the file system crashes; returns the model of what is guaranteed. */
async function runUntilCrash(pool: Pool, files: MemoryFiles, steps: Step[]): Promise<Map<string, ModelVolume>> {
  const model = new Map<string, ModelVolume>();
  const handles = new Map<string, BlockDevice>();
  const handle = async (name: string): Promise<BlockDevice> => {
    let open = handles.get(name);
    if (open === undefined) handles.set(name, (open = await pool.open(name)));
    return open;
  };
  for (const s of steps) {
    if (files.crashed) break;
    let pending: (() => void) | undefined;
    try {
      switch (s.op) {
        case 'create': {
          if (model.has(s.name)) break;
          const fresh = (): ModelVolume => ({
            snapshot: false,
            current: new Uint8Array(s.size),
            flushed: new Uint8Array(s.size),
            touched: new Uint8Array(s.size),
            uncertain: true,
            sizes: [s.size],
          });
          pending = () => model.set(s.name, fresh());
          await pool.createVolume(s.name, s.size);
          model.set(s.name, { ...fresh(), uncertain: false });
          markFlushed(model);
          break;
        }
        case 'write':
        case 'trim':
        case 'zero': {
          const name = pick(model, s.target, true);
          if (name === undefined) break;
          const volume = model.get(name)!;
          const offset = s.at % volume.current.length;
          const length = Math.min(s.length, volume.current.length - offset);
          const data = s.op === 'write' ? bytesOf(s.seed, length) : Buffer.alloc(length);
          // Until the call returns, these bytes may or may not have changed.
          volume.touched.fill(1, offset, offset + length);
          pending = () => volume.current.set(data, offset);
          const device = await handle(name);
          if (s.op === 'write') await device.write(offset, data, s.fua);
          else if (s.op === 'trim') await device.trim(offset, length, s.fua);
          else await device.zero(offset, length, { mayTrim: s.mayTrim, fua: s.fua });
          volume.current.set(data, offset);
          if (s.fua) markFlushed(model);
          break;
        }
        case 'flush':
          await pool.flush();
          markFlushed(model);
          break;
        case 'snapshot':
        case 'clone': {
          const source = pick(model, s.target, false);
          if (source === undefined || model.has(s.name)) break;
          const data = model.get(source)!.current;
          // Present after a crash only if its journal record survived, and that record follows
          // the sync of every data write before it: then it holds the source exactly.
          const copy = (uncertain: boolean): ModelVolume => ({
            snapshot: s.op === 'snapshot',
            current: data.slice(),
            flushed: data.slice(),
            touched: new Uint8Array(data.length),
            uncertain,
            sizes: [data.length],
          });
          pending = () => model.set(s.name, copy(true));
          if (s.op === 'snapshot') await pool.snapshot(source, s.name);
          else await pool.clone(source, s.name);
          model.set(s.name, copy(false));
          markFlushed(model);
          break;
        }
        case 'grow': {
          const name = pick(model, s.target, true);
          if (name === undefined) break;
          const volume = model.get(name)!;
          const size = volume.current.length + s.by;
          const grown = (bytes: Uint8Array): Uint8Array => {
            const larger = new Uint8Array(size);
            larger.set(bytes);
            return larger;
          };
          // Cut short, it may be either size; the new bytes read as zeros either way.
          pending = () => volume.sizes.push(size);
          await handles.get(name)?.close();
          handles.delete(name);
          await pool.grow(name, size);
          model.set(name, { ...volume, current: grown(volume.current), flushed: grown(volume.flushed), touched: grown(volume.touched), sizes: [size] });
          markFlushed(model);
          break;
        }
        case 'idle':
          await pool.idle();
          break;
        case 'flatten': {
          const name = pick(model, s.target, true);
          if (name === undefined) break;
          await pool.flatten(name);
          markFlushed(model);
          break;
        }
        case 'delete': {
          const name = pick(model, s.target, false);
          if (name === undefined || name === s.spare) break;
          pending = () => (model.get(name)!.uncertain = true);
          await handles.get(name)?.close();
          handles.delete(name);
          await pool.delete(name);
          model.delete(name);
          markFlushed(model);
          break;
        }
      }
    } catch (error) {
      if (!files.crashed) throw error;
      pending?.();
      break;
    }
  }
  return model;
}

async function verify(pool: Pool, model: Map<string, ModelVolume>): Promise<void> {
  const present = new Set(pool.volumes().map((volume) => volume.name));
  for (const name of present) expect(model.has(name), `unexpected volume ${name}`).toBe(true);
  for (const [name, volume] of model) {
    if (!present.has(name)) {
      expect(volume.uncertain, `${name} lost`).toBe(true);
      continue;
    }
    const info = pool.info(name)!;
    expect(volume.sizes, `${name}: size`).toContain(info.size);
    expect(info.kind).toBe(volume.snapshot ? 'snapshot' : 'volume');
    const actual = await readAll(await pool.open(name), info.size);
    for (let i = 0; i < actual.length; i++) {
      const flushed = i < volume.flushed.length ? volume.flushed[i] : 0;
      if ((volume.touched[i] ?? 0) === 0 && actual[i] !== flushed) {
        throw new Error(`${name}: flushed byte ${i} is ${actual[i]}, expected ${flushed}`);
      }
    }
  }
}

/** Every layer file belongs to a layer of the reopened pool. */
async function verifyNoLeaks(pool: Pool, files: MemoryFiles): Promise<void> {
  const layerFiles = await files.readdir('/pool/layers');
  const { layers } = await pool.usage();
  expect(layerFiles.length, `layer files ${layerFiles.join(', ')} for ${layers} layers`).toBeLessThanOrEqual(layers);
}

/** Runs `steps` until the file system crashes at mutating call `crashAt`, recovers, and checks. */
async function crashRun(
  steps: Step[],
  crashAt: number,
  seed: number,
  checkpointBytes: number,
  commitBytes: number,
): Promise<void> {
  const files = new MemoryFiles();
  const options = { files, checkpointBytes, commitBytes };
  const pool = await Pool.open('/pool', options);
  files.crashAfter(crashAt + 1);
  const model = await runUntilCrash(pool, files, steps);
  const reopened = await crashAndReopen(files, pool, '/pool', seed, options);
  try {
    await verify(reopened, model);
    // Opening starts a compaction: files of layers it folds go once it is done.
    await reopened.idle();
    await verify(reopened, model);
    await verifyNoLeaks(reopened, files);
    // The recovered pool keeps working and survives a clean close and another open.
    const volume = [...model.keys()].find((name) => reopened.info(name)?.kind === 'volume');
    if (volume !== undefined) {
      const device = await reopened.open(volume);
      await device.write(0, Buffer.alloc(Math.min(device.size, 5000), 0xee), true);
    }
  } finally {
    await reopened.close();
  }
  files.remove('/pool/lock');
  const again = await Pool.open('/pool', options);
  await again.close();
}

/**
 * One volume copied again and again under fresh names, copies deleted, and the background
 * compaction given time to run: crashes land inside folds of heads and of frozen layers.
 */
const COPY_NAMES = ['c0', 'c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7'];
const compactionStep: fc.Arbitrary<Step> = fc.oneof(
  {
    arbitrary: fc.record({
      op: fc.constant('write' as const),
      target: fc.nat(7),
      at: fc.nat(1 << 20),
      length: fc.integer({ min: 1, max: 12 * KiB }),
      seed: fc.nat(255),
      fua: fc.boolean(),
    }),
    weight: 6,
  },
  { arbitrary: fc.record({ op: fc.constantFrom('snapshot' as const, 'clone' as const), target: fc.nat(7), name: fc.constantFrom(...COPY_NAMES) }), weight: 4 },
  { arbitrary: fc.record({ op: fc.constant('delete' as const), target: fc.nat(7), spare: fc.constant('a') }), weight: 3 },
  { arbitrary: fc.constant({ op: 'idle' as const }), weight: 3 },
  { arbitrary: fc.constant({ op: 'flush' as const }), weight: 1 },
);

describe('store crash consistency', () => {
  it('keeps every flushed write of volumes and clones across crashes at random points', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(step, { minLength: 5, maxLength: 60 }),
        fc.nat(400),
        fc.integer({ min: 1, max: 0x7fffffff }),
        fc.constantFrom(1 << 30, 3000),
        fc.constantFrom(1 << 30, 100),
        crashRun,
      ),
      { numRuns: 300 },
    );
  });

  it('keeps every flushed write across crashes inside compactions', async () => {
    const create: Step = { op: 'create', name: 'a', size: 64 * KiB };
    await fc.assert(
      fc.asyncProperty(
        fc.array(compactionStep, { minLength: 10, maxLength: 60 }),
        fc.integer({ min: 20, max: 800 }),
        fc.integer({ min: 1, max: 0x7fffffff }),
        fc.constantFrom(1 << 30, 3000),
        fc.constantFrom(1 << 30, 100),
        (steps, crashAt, seed, checkpointBytes, commitBytes) =>
          crashRun([create, ...steps], crashAt, seed, checkpointBytes, commitBytes),
      ),
      { numRuns: 200 },
    );
  });
});
