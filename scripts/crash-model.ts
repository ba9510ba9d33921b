/**
 * What a crash may and may not do to a volume, block by block: the model the crash harness checks
 * the server against after every SIGKILL.
 *
 * Every write (data, TRIM or WRITE_ZEROES) gets a fresh id, and every 4 KiB block it covers gets
 * content derived from (id, block), so a block read back names the write it came from. The harness
 * never has two writes to one block in flight at once, so a block's writes are totally ordered and
 * later writes have larger ids. Per block the model keeps:
 * - `durable`: the writes one of which the block must at least hold after a crash: the last write
 *   acknowledged before a completed FLUSH was sent, or an acknowledged FUA write. It is a set
 *   because a clone inherits whatever its source held while it was being made.
 * - `pending`: writes issued after that point; a crash may keep any of them.
 * - `current`: what the block reads as now, and `inflight`, the write under way.
 * After a crash a block must read as one of durable ∪ pending, and what it reads as becomes the
 * new durable state (a killed process loses no page cache, so what a restart reads survives the
 * next kill too).
 */

export const BLOCK_SIZE = 4096;
/** Id 0: the zeros a new volume starts with. */
export const INITIAL = 0;

const MAGIC = 0x43424448;

/** The block `block` as write `id` left it: a header naming both, then a pattern of the id. */
export function blockContent(id: number, block: number): Buffer {
  const data = Buffer.allocUnsafe(BLOCK_SIZE);
  let state = (id * 2654435761 + block * 40503 + 1) >>> 0;
  for (let at = 0; at < BLOCK_SIZE; at += 4) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    data.writeUInt32LE(state >>> 0, at);
  }
  data.writeUInt32LE(MAGIC, 0);
  data.writeUInt32LE(block, 4);
  data.writeDoubleLE(id, 8);
  return data;
}

export type Observation = { kind: 'zero' } | { kind: 'write'; id: number } | { kind: 'garbage'; detail: string };

export function observe(data: Buffer, block: number): Observation {
  if (data.every((byte) => byte === 0)) return { kind: 'zero' };
  const id = data.readDoubleLE(8);
  if (data.readUInt32LE(0) !== MAGIC || !Number.isSafeInteger(id) || id <= 0) {
    return { kind: 'garbage', detail: 'no write header' };
  }
  if (data.readUInt32LE(4) !== block) return { kind: 'garbage', detail: `header names block ${data.readUInt32LE(4)}` };
  if (!data.equals(blockContent(id, block))) return { kind: 'garbage', detail: `write ${id} torn or corrupt` };
  return { kind: 'write', id };
}

interface BlockState {
  durable: Set<number>;
  pending: Set<number>;
  current: Set<number>;
  inflight: number | undefined;
}

function maxOf(ids: Iterable<number>): number {
  let max = -1;
  for (const id of ids) max = Math.max(max, id);
  return max;
}

export class VolumeModel {
  readonly blocks: BlockState[];

  constructor(
    readonly name: string,
    readonly kind: 'volume' | 'snapshot',
    initial: readonly ReadonlySet<number>[],
  ) {
    this.blocks = initial.map((ids) => ({ durable: new Set(ids), pending: new Set(), current: new Set(ids), inflight: undefined }));
  }

  static empty(name: string, blocks: number): VolumeModel {
    return new VolumeModel(name, 'volume', Array.from({ length: blocks }, () => new Set([INITIAL])));
  }

  isBusy(first: number, count: number): boolean {
    for (let block = first; block < first + count; block++) if (this.blocks[block]!.inflight !== undefined) return true;
    return false;
  }

  issue(id: number, first: number, count: number): void {
    for (let block = first; block < first + count; block++) {
      const state = this.blocks[block]!;
      if (state.inflight !== undefined) throw new Error(`block ${block} of ${this.name} already has write ${state.inflight} in flight`);
      state.inflight = id;
      state.pending.add(id);
    }
  }

  acknowledge(id: number, first: number, count: number, fua: boolean): void {
    for (let block = first; block < first + count; block++) {
      const state = this.blocks[block]!;
      state.inflight = undefined;
      state.current = new Set([id]);
      if (fua) {
        state.durable = new Set([id]);
        state.pending.clear();
      }
    }
  }

  /** The write failed or its connection died: it may or may not have happened. */
  abandon(first: number, count: number): void {
    for (let block = first; block < first + count; block++) {
      const state = this.blocks[block]!;
      if (state.inflight !== undefined) state.current.add(state.inflight);
      state.inflight = undefined;
    }
  }

  /** A FLUSH is sent: it covers what is acknowledged now. Call the result when it completes. */
  flushSent(): () => void {
    const covered = this.blocks.map((state) => new Set(state.current));
    return () => {
      covered.forEach((ids, block) => {
        const state = this.blocks[block]!;
        const newest = maxOf(ids);
        if (newest < maxOf(state.durable)) return;
        state.durable = ids;
        state.pending = new Set([...state.pending].filter((id) => id > newest));
      });
    };
  }

  /** What a copy made now could hold: the current contents, and any write in flight. */
  contentsNow(): Set<number>[] {
    return this.blocks.map((state) => new Set(state.inflight === undefined ? state.current : [...state.current, state.inflight]));
  }

  /** Checks the block against what a crash may leave, then takes what it holds as durable. */
  settle(block: number, seen: Observation, isZeroWrite: (id: number) => boolean): string | undefined {
    const state = this.blocks[block]!;
    const allowed = new Set([...state.durable, ...state.pending]);
    let now: Set<number>;
    if (seen.kind === 'garbage') {
      return `${this.name} block ${block}: ${seen.detail}; allowed ${describe(allowed)}`;
    } else if (seen.kind === 'zero') {
      now = new Set([...allowed].filter(isZeroWrite));
      if (now.size === 0) return `${this.name} block ${block}: zeros, but allowed only ${describe(allowed)}`;
    } else {
      if (!allowed.has(seen.id)) return `${this.name} block ${block}: write ${seen.id}, but allowed only ${describe(allowed)}`;
      now = new Set([seen.id]);
    }
    state.durable = now;
    state.current = new Set(now);
    state.pending.clear();
    state.inflight = undefined;
    return undefined;
  }
}

function describe(ids: ReadonlySet<number>): string {
  const sorted = [...ids].sort((a, b) => a - b);
  return `{${sorted.length > 8 ? `${sorted.slice(0, 8).join(', ')}, … ${sorted.length} in all` : sorted.join(', ')}}`;
}

/**
 * Follows a clone or snapshot being made of `source`: whatever the source held when it was asked
 * for, and every write issued to it until the copy exists, may be in the copy.
 */
export class CopyInProgress {
  readonly #candidates: Set<number>[];

  constructor(source: VolumeModel) {
    this.#candidates = source.contentsNow();
  }

  noteWrite(id: number, first: number, count: number): void {
    for (let block = first; block < first + count; block++) this.#candidates[block]!.add(id);
  }

  /** The copy returns once durable: what it may hold is its durable state. */
  model(name: string, kind: 'volume' | 'snapshot'): VolumeModel {
    return new VolumeModel(name, kind, this.#candidates);
  }
}
