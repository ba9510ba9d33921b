/**
 * The store against a plain model: Map<name, bytes>. Random sequences of write, read, trim,
 * zero, flush, snapshot, clone, delete, flatten, grow and close/reopen over several volumes;
 * every read must match the model byte for byte.
 */
import fc from 'fast-check';
import { afterAll, describe, it } from 'vitest';
import { Pool } from '../../src/store/index.js';
import type { BlockDevice } from '../../src/store/types.js';
import { MemoryFiles } from '../helpers/store-memfs.js';
import { tempDir } from '../helpers/store-pool.js';

interface ModelVolume {
  data: Uint8Array;
  snapshot: boolean;
}

type Model = Map<string, ModelVolume>;

interface Real {
  pool: Pool;
  reopen: () => Promise<Pool>;
  handles: Map<string, BlockDevice>;
}

const NAMES = ['a', 'b', 'c', 'd', 'e', 'f'];
const KiB = 1024;

function bytesOf(seed: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) out[i] = (seed + i * 31 + (i >> 8)) & 0xff;
  return out;
}

async function device(real: Real, name: string): Promise<BlockDevice> {
  let handle = real.handles.get(name);
  if (handle === undefined) {
    handle = await real.pool.open(name);
    real.handles.set(name, handle);
  }
  return handle;
}

/**
 * Reads the range, into a buffer of its own (as the NBD server does, filled with garbage first)
 * or into buffers the store allocates, and lays the pieces out.
 */
async function readAll(handle: BlockDevice, offset: number, length: number, into: boolean): Promise<Buffer> {
  const out = Buffer.alloc(length);
  let at = offset;
  const target = into ? Buffer.alloc(length, 0xa5) : undefined;
  for (const piece of await handle.read(offset, length, target)) {
    if (piece.offset !== at) throw new Error(`read piece at ${piece.offset}, expected ${at}`);
    if (piece.kind === 'data') piece.data.copy(out, at - offset);
    at += piece.kind === 'data' ? piece.data.length : piece.length;
  }
  if (at !== offset + length) throw new Error('read pieces do not cover the range');
  return out;
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return -1;
}

async function checkRead(model: Model, real: Real, name: string, offset: number, length: number): Promise<void> {
  const expected = model.get(name)!.data.subarray(offset, offset + length);
  for (const into of [false, true]) {
    const actual = await readAll(await device(real, name), offset, length, into);
    const at = firstDifference(actual, expected);
    if (at !== -1) {
      throw new Error(`${name}: byte ${offset + at} is ${actual[at]}, model says ${expected[at]} (${into ? 'into a buffer' : 'own buffers'})`);
    }
  }
}

/** Offsets are generated independently of sizes and folded into the volume here. */
function range(volume: ModelVolume, at: number, length: number): [number, number] {
  const offset = at % volume.data.length;
  return [offset, Math.max(1, Math.min(length, volume.data.length - offset))];
}

type Command = fc.AsyncCommand<Model, Real>;

/** Targets are indexes into the names present (volumes only where it matters), so few commands are wasted. */
function pick(model: Model, index: number, volumesOnly: boolean): string | undefined {
  const names = [...model.keys()].filter((name) => !volumesOnly || !model.get(name)!.snapshot).sort();
  return names.length === 0 ? undefined : names[index % names.length];
}

class Create implements Command {
  constructor(readonly name: string, readonly size: number) {}
  check = (model: Model) => !model.has(this.name);
  async run(model: Model, real: Real) {
    await real.pool.createVolume(this.name, this.size);
    model.set(this.name, { data: new Uint8Array(this.size), snapshot: false });
  }
  toString = () => `create(${this.name}, ${this.size})`;
}

class Write implements Command {
  name = '';
  constructor(readonly target: number, readonly at: number, readonly length: number, readonly seed: number, readonly fua: boolean) {}
  check = (model: Model) => (this.name = pick(model, this.target, true) ?? '') !== '';
  async run(model: Model, real: Real) {
    this.check(model);
    const volume = model.get(this.name)!;
    const [offset, length] = range(volume, this.at, this.length);
    const data = bytesOf(this.seed, length);
    await (await device(real, this.name)).write(offset, data, this.fua);
    volume.data.set(data, offset);
  }
  toString = () => `write(${this.name}, @${this.at}, ${this.length}, seed ${this.seed}, fua ${this.fua})`;
}

class Zero implements Command {
  name = '';
  constructor(readonly target: number, readonly at: number, readonly length: number, readonly trim: boolean) {}
  check = (model: Model) => (this.name = pick(model, this.target, true) ?? '') !== '';
  async run(model: Model, real: Real) {
    this.check(model);
    const volume = model.get(this.name)!;
    const [offset, length] = range(volume, this.at, this.length);
    const handle = await device(real, this.name);
    if (this.trim) await handle.trim(offset, length, false);
    else await handle.zero(offset, length, { mayTrim: false, fua: false });
    volume.data.fill(0, offset, offset + length);
  }
  toString = () => `${this.trim ? 'trim' : 'zero'}(${this.name}, @${this.at}, ${this.length})`;
}

class Read implements Command {
  name = '';
  constructor(readonly target: number, readonly at: number, readonly length: number) {}
  check = (model: Model) => (this.name = pick(model, this.target, false) ?? '') !== '';
  async run(model: Model, real: Real) {
    this.check(model);
    const [offset, length] = range(model.get(this.name)!, this.at, this.length);
    await checkRead(model, real, this.name, offset, length);
  }
  toString = () => `read(${this.name}, @${this.at}, ${this.length})`;
}

class ReadAll implements Command {
  check = () => true;
  async run(model: Model, real: Real) {
    for (const [name, volume] of model) await checkRead(model, real, name, 0, volume.data.length);
  }
  toString = () => 'readAll';
}

class Flush implements Command {
  check = () => true;
  async run(_model: Model, real: Real) {
    await real.pool.flush();
  }
  toString = () => 'flush';
}

class Snapshot implements Command {
  source = '';
  constructor(readonly target: number, readonly name: string) {}
  check = (model: Model) => (this.source = pick(model, this.target, false) ?? '') !== '' && !model.has(this.name);
  async run(model: Model, real: Real) {
    this.check(model);
    await real.pool.snapshot(this.source, this.name);
    model.set(this.name, { data: model.get(this.source)!.data.slice(), snapshot: true });
  }
  toString = () => `snapshot(${this.source}, ${this.name})`;
}

class Clone implements Command {
  source = '';
  constructor(readonly target: number, readonly name: string, readonly extra: number) {}
  check = (model: Model) => (this.source = pick(model, this.target, false) ?? '') !== '' && !model.has(this.name);
  async run(model: Model, real: Real) {
    this.check(model);
    const source = model.get(this.source)!.data;
    const size = source.length + this.extra;
    await real.pool.clone(this.source, this.name, { size });
    const data = new Uint8Array(size);
    data.set(source);
    model.set(this.name, { data, snapshot: false });
  }
  toString = () => `clone(${this.source}, ${this.name}, +${this.extra})`;
}

class Delete implements Command {
  name = '';
  constructor(readonly target: number) {}
  check = (model: Model) => (this.name = pick(model, this.target, false) ?? '') !== '';
  async run(model: Model, real: Real) {
    this.check(model);
    await real.handles.get(this.name)?.close();
    real.handles.delete(this.name);
    await real.pool.delete(this.name);
    model.delete(this.name);
  }
  toString = () => `delete(${this.name})`;
}

class Flatten implements Command {
  name = '';
  constructor(readonly target: number) {}
  check = (model: Model) => (this.name = pick(model, this.target, true) ?? '') !== '';
  async run(model: Model, real: Real) {
    this.check(model);
    let last = -1;
    await real.pool.flatten(this.name, (done, total) => {
      if (done < last || done > total) throw new Error(`bad progress ${done}/${total}`);
      last = done;
    });
  }
  toString = () => `flatten(${this.name})`;
}

class Grow implements Command {
  name = '';
  constructor(readonly target: number, readonly extra: number) {}
  check = (model: Model) => (this.name = pick(model, this.target, true) ?? '') !== '';
  async run(model: Model, real: Real) {
    this.check(model);
    const volume = model.get(this.name)!;
    const size = volume.data.length + this.extra;
    await real.pool.grow(this.name, size);
    const data = new Uint8Array(size);
    data.set(volume.data);
    volume.data = data;
  }
  toString = () => `grow(${this.name}, +${this.extra})`;
}

class Reopen implements Command {
  check = () => true;
  async run(model: Model, real: Real) {
    await real.pool.close();
    real.handles.clear();
    real.pool = await real.reopen();
    const names = real.pool.volumes().map((volume) => volume.name);
    if (names.join() !== [...model.keys()].sort().join()) throw new Error(`after reopen: ${names.join()}`);
    for (const [name, volume] of model) await checkRead(model, real, name, 0, volume.data.length);
  }
  toString = () => 'reopen';
}

const name = fc.constantFrom(...NAMES);
const target = fc.nat(15);
const at = fc.nat(1 << 20);
const length = fc.oneof(fc.integer({ min: 1, max: 600 }), fc.integer({ min: 1, max: 40 * KiB }), fc.constant(4096));
const write = fc.tuple(target, at, length, fc.nat(255), fc.boolean()).map(([t, a, l, s, f]) => new Write(t, a, l, s, f));
const commands = [
  fc.tuple(name, fc.integer({ min: 16, max: 256 })).map(([n, k]) => new Create(n, k * KiB - (k % 3) * 512)),
  write,
  write,
  write,
  fc.tuple(target, at, length, fc.boolean()).map(([t, a, l, z]) => new Zero(t, a, l, z)),
  fc.tuple(target, at, length).map(([t, a, l]) => new Read(t, a, l)),
  fc.constant(new ReadAll()),
  fc.constant(new Flush()),
  fc.tuple(target, name).map(([t, n]) => new Snapshot(t, n)),
  fc.tuple(target, name, fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 64 * KiB }))).map(([t, n, e]) => new Clone(t, n, e)),
  target.map((t) => new Delete(t)),
  target.map((t) => new Flatten(t)),
  fc.tuple(target, fc.integer({ min: 0, max: 64 * KiB })).map(([t, e]) => new Grow(t, e)),
  fc.constant(new Reopen()),
];

async function runModel(open: () => Promise<Pool>, cmds: Iterable<Command>): Promise<void> {
  const real: Real = { pool: await open(), reopen: open, handles: new Map() };
  try {
    await fc.asyncModelRun(() => ({ model: new Map(), real }), cmds);
  } finally {
    await real.pool.close();
  }
}

describe('store model', () => {
  const cleanups: Array<() => Promise<void>> = [];
  afterAll(async () => {
    for (const cleanup of cleanups) await cleanup();
  });

  it('matches Map<name, bytes> on an in-memory file system (small checkpoints)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.commands(commands, { maxCommands: 80, size: 'large' }), async (cmds) => {
        const files = new MemoryFiles();
        await runModel(() => Pool.open('/pool', { files, checkpointBytes: 4096 }), cmds);
      }),
      { numRuns: 150 },
    );
  });

  it('matches Map<name, bytes> on the real file system', async () => {
    await fc.assert(
      fc.asyncProperty(fc.commands(commands, { maxCommands: 50, size: 'large' }), async (cmds) => {
        const dir = await tempDir();
        cleanups.push(dir.remove);
        await runModel(() => Pool.open(dir.path), cmds);
      }),
      { numRuns: 25 },
    );
  });
});
