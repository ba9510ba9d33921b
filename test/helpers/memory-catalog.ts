/**
 * An in-memory ExportCatalog / BlockDevice test double.
 *
 * A volume is a sparse map from block index to block contents (block size 4 KiB unless the spec
 * says otherwise): an absent block is a hole (unallocated, reads as zeros), a block mapped to
 * `null` is allocated and reads as zeros, anything else is allocated data. So a volume may have a
 * virtual size of many GiB and cost only what was written.
 *
 *   blocks:   0 ─► Uint8Array(4096)   allocated data
 *             1 ─► null               allocated, zeros (WRITE_ZEROES with NO_HOLE)
 *             2    (absent)           hole
 *
 * Durability is modelled so FLUSH and FUA can be checked: the first time a block changes after a
 * flush its previous state is saved in `#shadow`; `durableBytes()` reads through the shadow.
 * `flush()` (from any handle) empties the shadow; a FUA operation drops the shadow entries of the
 * blocks it touched. Every handle of a volume shares this state, as the real store's handles do.
 *
 * Test controls: `hold()` parks the next matching operation until released (to force
 * out-of-order completion or keep a request in flight), `failNext()` makes the next call of an
 * operation throw an OperationError, `capacityBlocks` makes allocation beyond it fail with ENOSPC,
 * and `calls` records every operation the server made.
 */
import type {
  BlockDevice,
  ExportCatalog,
  ExportDescription,
  Extent,
  ReadPiece,
  ZeroOptions,
} from '../../src/store/types.js';
import { OperationError, type ErrorCode } from '../../src/util/errors.js';

export const DEFAULT_BLOCK_SIZE = 4096;

export type MemoryOperation = 'read' | 'write' | 'trim' | 'zero' | 'flush' | 'blockStatus' | 'cache';

export interface RecordedCall {
  op: MemoryOperation;
  offset: number;
  length: number;
  fua?: boolean;
  mayTrim?: boolean;
}

export interface MemoryVolumeSpec {
  name: string;
  size: number;
  readOnly?: boolean;
  description?: string;
  blockSize?: number;
  /** Most blocks that may be allocated at once; allocating more fails with ENOSPC. */
  capacityBlocks?: number;
}

export interface Hold {
  /** Resolves when a matching operation has arrived and is parked. */
  readonly reached: Promise<RecordedCall>;
  release(): void;
}

type Block = Uint8Array | null;

interface PendingHold {
  op: MemoryOperation;
  match: (call: RecordedCall) => boolean;
  arrived: (call: RecordedCall) => void;
  gate: Promise<void>;
}

export class MemoryVolume {
  readonly name: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly description: string;
  readonly blockSize: number;
  readonly capacityBlocks: number;
  readonly calls: RecordedCall[] = [];
  readonly #blocks = new Map<number, Block>();
  /** Pre-flush state of blocks changed since the last flush; `undefined` = was a hole. */
  readonly #shadow = new Map<number, Block | undefined>();
  readonly #holds: PendingHold[] = [];
  readonly #releases: Array<() => void> = [];
  readonly #failures: Array<{ op: MemoryOperation; code: ErrorCode }> = [];
  readonly #listeners = new Set<() => void>();
  #openHandles = 0;

  constructor(spec: MemoryVolumeSpec) {
    this.name = spec.name;
    this.size = spec.size;
    this.readOnly = spec.readOnly ?? false;
    this.description = spec.description ?? '';
    this.blockSize = spec.blockSize ?? DEFAULT_BLOCK_SIZE;
    this.capacityBlocks = spec.capacityBlocks ?? Number.POSITIVE_INFINITY;
  }

  /** Handles opened and not yet closed. */
  get openHandles(): number {
    return this.#openHandles;
  }

  handleOpened(): void {
    this.#openHandles++;
    this.#changed();
  }

  handleClosed(): void {
    this.#openHandles--;
    this.#changed();
  }

  get allocatedBlocks(): number {
    return this.#blocks.size;
  }

  countCalls(op: MemoryOperation): number {
    return this.calls.filter((c) => c.op === op).length;
  }

  /** Resolves once `predicate` holds; re-checked after every operation. */
  waitFor(predicate: () => boolean): Promise<void> {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve) => {
      const check = (): void => {
        if (predicate()) {
          this.#listeners.delete(check);
          resolve();
        }
      };
      this.#listeners.add(check);
    });
  }

  // ---- test-side access (no durability effects, no call records) ----------------------------

  /** Current contents. */
  bytes(offset: number, length: number): Buffer {
    return this.#readFrom((index) => this.#blocks.get(index), offset, length);
  }

  /** Contents as they would survive a crash now. */
  durableBytes(offset: number, length: number): Buffer {
    return this.#readFrom(
      (index) => (this.#shadow.has(index) ? this.#shadow.get(index) : this.#blocks.get(index)),
      offset,
      length,
    );
  }

  isAllocated(blockIndex: number): boolean {
    return this.#blocks.has(blockIndex);
  }

  /** Writes data durably, as setup. */
  fill(offset: number, data: Uint8Array): void {
    this.#apply(offset, data.length, (block, from, to, at) => block.set(data.subarray(at, at + (to - from)), from));
    this.#shadow.clear();
  }

  /** Marks whole blocks allocated-as-zero durably (cheap setup for fragmented maps). */
  allocateZeroBlock(blockIndex: number): void {
    this.#blocks.set(blockIndex, null);
  }

  // ---- controls ------------------------------------------------------------------------------

  /** Parks the next `op` call that matches until `release()`. */
  hold(op: MemoryOperation, match: (call: RecordedCall) => boolean = () => true): Hold {
    let release!: () => void;
    let arrived!: (call: RecordedCall) => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const reached = new Promise<RecordedCall>((resolve) => (arrived = resolve));
    this.#holds.push({ op, match, arrived, gate });
    this.#releases.push(release);
    return { reached, release };
  }

  /** Lets every parked and every not-yet-reached hold go (test cleanup). */
  releaseAll(): void {
    for (const release of this.#releases) release();
  }

  failNext(op: MemoryOperation, code: ErrorCode): void {
    this.#failures.push({ op, code });
  }

  // ---- the BlockDevice operations --------------------------------------------------------------

  async run<T>(call: RecordedCall, body: () => T): Promise<T> {
    this.calls.push(call);
    const holdIndex = this.#holds.findIndex((h) => h.op === call.op && h.match(call));
    const hold = holdIndex >= 0 ? this.#holds.splice(holdIndex, 1)[0] : undefined;
    if (hold !== undefined) {
      hold.arrived(call);
      await hold.gate;
    } else {
      await Promise.resolve();
    }
    try {
      const failureIndex = this.#failures.findIndex((f) => f.op === call.op);
      if (failureIndex >= 0) {
        const [failure] = this.#failures.splice(failureIndex, 1);
        throw new OperationError(failure?.code ?? 'EIO', `injected ${failure?.code} on ${call.op}`);
      }
      this.#checkRange(call);
      return body();
    } finally {
      this.#changed();
    }
  }

  #changed(): void {
    for (const listener of [...this.#listeners]) listener();
  }

  readPieces(offset: number, length: number): ReadPiece[] {
    // Runs of data are gathered as slices and joined once, so a long read stays linear.
    const pieces: ReadPiece[] = [];
    let slices: Buffer[] = [];
    let sliceStart = 0;
    const endData = (): void => {
      if (slices.length > 0) pieces.push({ kind: 'data', offset: sliceStart, data: Buffer.concat(slices) });
      slices = [];
    };
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const index = Math.floor(at / this.blockSize);
      const blockStart = index * this.blockSize;
      const stop = Math.min(end, blockStart + this.blockSize);
      const block = this.#blocks.get(index);
      if (block === undefined || block === null) {
        endData();
        const last = pieces[pieces.length - 1];
        if (last?.kind === 'zero' && last.offset + last.length === at) last.length += stop - at;
        else pieces.push({ kind: 'zero', offset: at, length: stop - at });
      } else {
        if (slices.length === 0) sliceStart = at;
        slices.push(Buffer.from(block.subarray(at - blockStart, stop - blockStart)));
      }
      at = stop;
    }
    endData();
    return pieces;
  }

  writeData(offset: number, data: Uint8Array, fua: boolean): void {
    this.#ensureCapacity(offset, data.length, true);
    this.#trackAndApply(offset, data.length, fua, (block, from, to, at) =>
      block.set(data.subarray(at, at + (to - from)), from),
    );
  }

  trimRange(offset: number, length: number, fua: boolean): void {
    for (const index of this.#wholeBlocks(offset, length, true)) {
      this.#remember(index);
      this.#blocks.delete(index);
      if (fua) this.#shadow.delete(index);
    }
  }

  zeroRange(offset: number, length: number, options: ZeroOptions): void {
    this.#ensureCapacity(offset, length, !options.mayTrim);
    for (const index of this.#wholeBlocks(offset, length, options.mayTrim)) {
      this.#remember(index);
      if (options.mayTrim) this.#blocks.delete(index);
      else this.#blocks.set(index, null);
      if (options.fua) this.#shadow.delete(index);
    }
    const firstWhole = Math.ceil(offset / this.blockSize);
    const endWhole = Math.floor((offset + length) / this.blockSize);
    // Partial blocks at either end: zero their bytes in place.
    this.#trackAndApply(
      offset,
      length,
      options.fua,
      (block, from, to) => block.fill(0, from, to),
      (index) => index < firstWhole || index >= endWhole,
    );
  }

  flushAll(): void {
    this.#shadow.clear();
  }

  extents(offset: number, length: number): Extent[] {
    const extents: Extent[] = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const index = Math.floor(at / this.blockSize);
      const stop = Math.min(end, (index + 1) * this.blockSize);
      const block = this.#blocks.get(index);
      const hole = block === undefined;
      const zero = block === undefined || block === null;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.hole === hole && last.zero === zero) last.length += stop - at;
      else extents.push({ length: stop - at, hole, zero });
      at = stop;
    }
    return extents;
  }

  // ---- internals -----------------------------------------------------------------------------

  #checkRange(call: RecordedCall): void {
    if (call.op === 'flush') return;
    if (!Number.isSafeInteger(call.offset) || call.offset < 0 || call.length < 0 || call.offset + call.length > this.size) {
      // The server must validate ranges before calling storage (types.ts says so).
      throw new Error(`${call.op} [${call.offset}, +${call.length}) beyond ${this.name} (${this.size}) reached storage`);
    }
    if (this.readOnly && (call.op === 'write' || call.op === 'trim' || call.op === 'zero')) {
      throw new OperationError('EPERM', `${this.name} is read-only`);
    }
  }

  #ensureCapacity(offset: number, length: number, allocates: boolean): void {
    if (!allocates || this.capacityBlocks === Number.POSITIVE_INFINITY || length === 0) return;
    let needed = 0;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    for (let index = first; index <= last; index++) if (!this.#blocks.has(index)) needed++;
    if (this.#blocks.size + needed > this.capacityBlocks) {
      throw new OperationError('ENOSPC', `${this.name}: no space for ${needed} more blocks`);
    }
  }

  #remember(index: number): void {
    if (!this.#shadow.has(index)) {
      const block = this.#blocks.get(index);
      this.#shadow.set(index, block === undefined || block === null ? block : Uint8Array.from(block));
    }
  }

  /** Indices of the blocks [offset, offset + length) covers completely. */
  *#wholeBlocks(offset: number, length: number, onlyAllocated: boolean): Generator<number> {
    const first = Math.ceil(offset / this.blockSize);
    const end = Math.floor((offset + length) / this.blockSize);
    if (onlyAllocated && end - first > this.#blocks.size) {
      // A huge range over a sparse volume: visit what exists rather than every index.
      for (const index of [...this.#blocks.keys()]) if (index >= first && index < end) yield index;
      return;
    }
    for (let index = first; index < end; index++) yield index;
  }

  #trackAndApply(
    offset: number,
    length: number,
    fua: boolean,
    edit: (block: Uint8Array, from: number, to: number, at: number) => void,
    only: (index: number) => boolean = () => true,
  ): void {
    this.#apply(
      offset,
      length,
      (block, from, to, at) => edit(block, from, to, at),
      (index) => {
        if (!only(index)) return false;
        this.#remember(index);
        return true;
      },
      (index) => {
        if (fua) this.#shadow.delete(index);
      },
    );
  }

  #apply(
    offset: number,
    length: number,
    edit: (block: Uint8Array, from: number, to: number, at: number) => void,
    before: (index: number) => boolean = () => true,
    after: (index: number) => void = () => undefined,
  ): void {
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const index = Math.floor(at / this.blockSize);
      const blockStart = index * this.blockSize;
      const stop = Math.min(end, blockStart + this.blockSize);
      if (before(index)) {
        let block = this.#blocks.get(index);
        if (block === undefined || block === null) {
          block = new Uint8Array(this.blockSize);
          this.#blocks.set(index, block);
        }
        edit(block, at - blockStart, stop - blockStart, at - offset);
        after(index);
      }
      at = stop;
    }
  }

  #readFrom(lookup: (index: number) => Block | undefined, offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const index = Math.floor(at / this.blockSize);
      const blockStart = index * this.blockSize;
      const stop = Math.min(end, blockStart + this.blockSize);
      const block = lookup(index);
      if (block !== undefined && block !== null) out.set(block.subarray(at - blockStart, stop - blockStart), at - offset);
      at = stop;
    }
    return out;
  }
}

class MemoryBlockDevice implements BlockDevice {
  readonly #volume: MemoryVolume;
  #closed = false;

  constructor(volume: MemoryVolume) {
    this.#volume = volume;
    volume.handleOpened();
  }

  get name(): string {
    return this.#volume.name;
  }

  get size(): number {
    return this.#volume.size;
  }

  get readOnly(): boolean {
    return this.#volume.readOnly;
  }

  read(offset: number, length: number): Promise<ReadPiece[]> {
    return this.#volume.run({ op: 'read', offset, length }, () => this.#volume.readPieces(offset, length));
  }

  write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    // Copy now: the server may reuse its buffer once the promise settles, not before.
    const copy = Uint8Array.from(data);
    return this.#volume.run({ op: 'write', offset, length: copy.length, fua }, () =>
      this.#volume.writeData(offset, copy, fua),
    );
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#volume.run({ op: 'trim', offset, length, fua }, () => this.#volume.trimRange(offset, length, fua));
  }

  zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    return this.#volume.run({ op: 'zero', offset, length, fua: options.fua, mayTrim: options.mayTrim }, () =>
      this.#volume.zeroRange(offset, length, options),
    );
  }

  flush(): Promise<void> {
    return this.#volume.run({ op: 'flush', offset: 0, length: 0 }, () => this.#volume.flushAll());
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#volume.run({ op: 'blockStatus', offset, length }, () => this.#volume.extents(offset, length));
  }

  cache(offset: number, length: number): Promise<void> {
    return this.#volume.run({ op: 'cache', offset, length }, () => undefined);
  }

  async close(): Promise<void> {
    if (this.#closed) throw new Error(`handle of ${this.name} closed twice`);
    this.#closed = true;
    this.#volume.handleClosed();
  }
}

export class MemoryCatalog implements ExportCatalog {
  readonly #volumes = new Map<string, MemoryVolume>();

  constructor(specs: readonly MemoryVolumeSpec[]) {
    for (const spec of specs) this.#volumes.set(spec.name, new MemoryVolume(spec));
  }

  volume(name: string): MemoryVolume {
    const volume = this.#volumes.get(name);
    if (volume === undefined) throw new Error(`no memory volume ${name}`);
    return volume;
  }

  list(): ExportDescription[] {
    return [...this.#volumes.values()].map((v) => describe(v));
  }

  volumes(): MemoryVolume[] {
    return [...this.#volumes.values()];
  }

  /** Releases every hold on every volume, so a graceful server close cannot wait on a test. */
  releaseAll(): void {
    for (const volume of this.#volumes.values()) {
      volume.releaseAll();
    }
  }

  describe(name: string): ExportDescription | undefined {
    const volume = this.#volumes.get(name);
    return volume === undefined ? undefined : describe(volume);
  }

  async open(name: string): Promise<BlockDevice> {
    const volume = this.#volumes.get(name);
    if (volume === undefined) throw new OperationError('ENOENT', `no export ${name}`);
    return new MemoryBlockDevice(volume);
  }
}

function describe(volume: MemoryVolume): ExportDescription {
  return { name: volume.name, size: volume.size, readOnly: volume.readOnly, description: volume.description };
}

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

/** The exports the protocol tests share; every test builds a fresh catalog from them. */
export function protocolTestExports(): MemoryVolumeSpec[] {
  return [
    { name: 'data', size: MiB, description: 'writable test export' },
    { name: 'ro', size: MiB, readOnly: true, description: 'read-only test export' },
    { name: 'odd', size: MiB + 123 },
    { name: 'dönnées-ünïcode', size: 64 * 1024, description: 'ein Export mit UTF-8-Namen ✓' },
    { name: 'big', size: 64 * MiB },
    { name: 'huge', size: 8 * GiB },
    { name: 'full', size: MiB, capacityBlocks: 4 },
  ];
}
