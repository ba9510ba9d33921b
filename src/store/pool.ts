/**
 * The pool: volumes, snapshots and clones as copy-on-write layers over identity-mapped sparse
 * files, with a journal.
 *
 *   pool/format             format version
 *   pool/lock               pid of the process that has the pool open
 *   pool/checkpoint         metadata at generation G        (see journal.ts)
 *   pool/journal.G          metadata changes since then
 *   pool/layers/<id>.raw    one sparse file per layer; virtual offset X lives at file offset X
 *
 * A volume is a writable head layer over frozen ancestors; a snapshot is a name for a frozen
 * layer. Every layer carries a BlockMap (block -> layer holding it, or ZERO): a head's map
 * changes as it is written, a frozen layer's map is fixed. Freezing a head (snapshot, clone)
 * hands the same map to the new heads, so creation is O(1) and reads never walk the chain.
 *
 *        snapshot "s1"            volume "a"              clone "b"
 *             |                        |                       |
 *        layer 17 (frozen) <-parent- layer 19 (head)           |
 *             ^----------------------------------parent- layer 20 (head)
 *
 * Lifetimes: a layer is referenced by the volume or snapshot naming it and by each layer whose
 * parent it is; at zero it leaves the metadata, and its file is removed once that change is
 * durable. Deleting a snapshot or clone can leave frozen layers that nothing names and only one
 * layer descends from (a volume snapshotted and cloned many times over would otherwise collect one
 * per copy, each with a file descriptor and a map); compaction merges each with that child:
 * - child a head: the blocks the head still reads from it are copied into the head under the
 *   volume's gate, step by step like a flatten, then the head is re-parented past it;
 * - child frozen, merged whichever way copies fewer blocks:
 *   - fold down: the blocks the child's map reads from the layer are copied into the child's
 *     file, where they are holes (a frozen layer's file only ever holds blocks its own map
 *     claims, and those are never these);
 *   - absorb up: the child's own blocks are copied into the layer's file, over blocks no map can
 *     read any more (the child hides them, and nothing else reads the layer), and the layer
 *     takes the child's place, its map, children and names. The root only absorbs: it usually
 *     holds the bulk of the data, and absorbing keeps it the one place data collects in, so a
 *     block is copied about once however long the churn goes on.
 *   Both copy with no gate: both layers are immutable. Then, with the gates of every volume
 *   reading through the child held, one journal record (`fold` or `absorb`) remaps every map below
 *   and re-parents. A frozen layer's file is thus written after it froze, but only at places no
 *   map reads from it; what an absorbed child had trimmed over its parent's blocks is punched.
 * Compaction runs in the background, after deletions and at open, and gives up on a layer if the
 * tree changes under it.
 *
 * A layer's data file is written while it is a head and by compaction as above, and only blocks
 * its own map points at are ever read from it; so a block a head no longer maps (overwritten
 * elsewhere, trimmed) is garbage, and hole punching may take it back at any later time, checking
 * the map when it runs. An absorb waits until no punch is due in the parent's file first: one
 * landing where the copy wrote would take the copied block.
 *
 * Concurrency per volume: I/O enters its Gate shared; snapshot, clone, grow, delete, flatten
 * steps and hole punching hold it exclusive. A partial-block write over a block the head does
 * not hold copies the block up under a per-block lock, so two such writes never lose each other.
 *
 * Durability: a write lands in the head's file, then updates the map and appends a journal
 * record. flush() (shared by all volumes and handles) fsyncs every dirty layer file, then writes
 * and fsyncs the records. Holes are punched only for ranges whose trim is already durable.
 * Unflushed records are committed without a FLUSH once they fill `commitBytes`.
 *
 * Known limits: every layer file that is read keeps a descriptor open; hole punching spawns
 * `fallocate` (see file-layer.ts) and pauses the volume's I/O while it runs; trim and write-zeroes
 * record zeros alike, so NO_HOLE does not keep space allocated.
 */
import type { Logger } from 'pino';
import { OperationError } from '../util/errors.js';
import { BlockMap, FIRST_LAYER_ID, UNALLOCATED, ZERO, decodeMaps, encodeMaps, type MapNode } from './block-map.js';
import { nodeFileLayer, type FileHandle, type FileLayer } from './file-layer.js';
import { BlockLocks, Gate } from './gate.js';
import {
  Journal,
  decodeCheckpoint,
  encodeCheckpoint,
  journalName,
  readWhole,
  writeDurably,
  type CheckpointMeta,
  type MetaRecord,
} from './journal.js';
import { validateLabels, validateName, type Labels } from './names.js';
import { acquireLock, releaseLock } from './pool-lock.js';
import { READAHEAD_STEP_BYTES, SequentialReadahead } from './readahead.js';
import type { BlockDevice, ExportCatalog, ExportDescription, Extent, ReadPiece, ZeroOptions } from './types.js';

export const BLOCK_SIZE = 4096;
/** 4 PiB: block numbers and byte offsets stay exact in doubles. */
export const MAX_VOLUME_SIZE = 2 ** 52;
const FORMAT = 'clonebd-pool 1\n';
const DEFAULT_CHECKPOINT_BYTES = 16 * 1024 * 1024;
/**
 * Records a client has not flushed are committed anyway once they fill this much (about 508,000
 * newly written blocks), so a client that never flushes cannot grow the server without bound;
 * writes wait for the commit once records reach COMMIT_WAIT_FACTOR times it.
 */
const DEFAULT_COMMIT_BYTES = 16 * 1024 * 1024;
const COMMIT_WAIT_FACTOR = 4;
/** Blocks copied per exclusive step of flatten: bounds the pause writers see. */
const FLATTEN_STEP = 256;
/** Times a frozen fold takes the readers' gates again when copies appeared while it copied. */
const FOLD_GATE_ATTEMPTS = 3;
/** Most extents one blockStatus call returns; NBD lets a reply cover less than asked. */
const MAX_STATUS_RUNS = 4096;
/** Reads ahead under way at most, pool-wide (see #readAhead); more are not started. */
const MAX_READS_AHEAD = 64;
const TRIM_COMMIT_DELAY_MS = 500;
const FREE_SPACE_REFRESH_MS = 1000;

export interface PoolOptions {
  logger?: Logger;
  /** Pool capacity in bytes; without it, the file system's free space is the limit. */
  capacityBytes?: number;
  /** File access, replaceable for fault injection. */
  files?: FileLayer;
  /** Journal size that triggers a checkpoint. */
  checkpointBytes?: number;
  /** Unflushed journal records, in bytes, that start a commit without a FLUSH. */
  commitBytes?: number;
}

export interface VolumeInfo {
  name: string;
  kind: 'volume' | 'snapshot';
  size: number;
  readOnly: boolean;
  /** The volume or snapshot this one was cloned or snapshotted from (it may since be deleted). */
  parent: string | null;
  createdAt: string;
  /** The caller's notes, given at creation. */
  labels: Labels;
  /** Snapshots taken of this volume that still exist. */
  snapshots: string[];
}

export interface VolumeUsage {
  name: string;
  kind: 'volume' | 'snapshot';
  size: number;
  /** Bytes its map points at that no other volume or snapshot points at. */
  exclusiveBytes: number;
  /** Bytes its map points at that others point at too. */
  sharedBytes: number;
}

export interface PoolUsage {
  /** capacityBytes if configured, else used + the file system's free space. */
  capacityBytes: number;
  /** Bytes held in layer files (including blocks no map points at any more). */
  usedBytes: number;
  freeBytes: number;
  layers: number;
  /** Bytes of metadata journal since the last checkpoint: what a restart replays. */
  journalBytes: number;
  /** The largest volume size the pool's file system can hold (its largest file). */
  largestVolumeBytes: number;
  volumes: VolumeUsage[];
}

interface Layer {
  readonly id: number;
  parent: Layer | null;
  map: BlockMap;
  /** Length of the layer's file: the volume's size when it was the head. */
  size: number;
  /** Blocks its own map points at itself: what its file holds. */
  blocks: number;
  refs: number;
  /** The volume whose head it is; null once frozen. */
  owner: Volume | null;
}

interface Volume {
  readonly name: string;
  readonly kind: 'volume' | 'snapshot';
  size: number;
  readonly parent: string | null;
  readonly createdAt: string;
  readonly labels: Labels;
  /** The head (volume) or the frozen layer (snapshot). */
  layer: Layer;
  readonly gate: Gate;
  readonly locks: BlockLocks;
  readonly readahead: SequentialReadahead;
  deleted: boolean;
}

type VolumeIdentity = Pick<Volume, 'name' | 'kind' | 'size' | 'parent' | 'createdAt' | 'labels'>;

/** Records and checkpoints carry labels only when there are some, so unlabelled pools read as before. */
function labelled(labels: Labels): { labels?: Labels } {
  return Object.keys(labels).length === 0 ? {} : { labels };
}

function describedBy(record: { name: string; createdAt: string; labels?: Labels }): Pick<Volume, 'name' | 'createdAt' | 'labels'> {
  return { name: record.name, createdAt: record.createdAt, labels: record.labels ?? {} };
}

function ioError(error: unknown, what: string): OperationError {
  if (error instanceof OperationError) return error;
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  const mapped = code === 'ENOSPC' || code === 'EDQUOT' ? 'ENOSPC' : 'EIO';
  return new OperationError(mapped, `${what}: ${(error as Error | undefined)?.message ?? String(error)}`, { cause: error });
}

function isErrno(error: unknown, code: string): boolean {
  return (error as NodeJS.ErrnoException | undefined)?.code === code;
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_VOLUME_SIZE) {
    throw new OperationError('EINVAL', `invalid size ${size}: 1 to ${MAX_VOLUME_SIZE} bytes`);
  }
}

const SIZE_PROBE = 'size-probe';

/** The extents of `map` holding `value`, as [start, end) block ranges. */
function runsHolding(map: BlockMap, value: number): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  map.extents(0, Infinity, (start, end, held) => {
    if (held === value) runs.push([start, end]);
  });
  return runs;
}

function blocksOf(size: number): number {
  return Math.ceil(size / BLOCK_SIZE);
}

/** Bytes [from, to) of a read that layer `layer` holds. */
interface DataRun {
  from: number;
  to: number;
  layer: number;
}

/**
 * The layer holding most of the runs' bytes, from its first run's start to its last's end, when it
 * has more than one run and the bytes between them are no more than its own; else undefined.
 */
function spanningLayer(runs: readonly DataRun[]): DataRun | undefined {
  const { layer, bytes } = majorLayer(runs);
  const own = runs.filter((run) => run.layer === layer);
  if (own.length < 2) return undefined;
  const span = { from: own[0]!.from, to: own[own.length - 1]!.to, layer: layer! };
  return span.to - span.from <= 2 * bytes ? span : undefined;
}

/** The layer holding most of the runs' bytes (the first to get there, on a tie), and those bytes. */
function majorLayer(runs: readonly DataRun[]): { layer: number | undefined; bytes: number } {
  const bytesOf = new Map<number, number>();
  const major: { layer: number | undefined; bytes: number } = { layer: undefined, bytes: 0 };
  for (const { from, to, layer } of runs) {
    const bytes = (bytesOf.get(layer) ?? 0) + to - from;
    bytesOf.set(layer, bytes);
    if (bytes > major.bytes) [major.layer, major.bytes] = [layer, bytes];
  }
  return major;
}

/** The I/O a handle needs; bound to one pool. */
interface VolumeIo {
  read(volume: Volume, offset: number, length: number, into?: Buffer): Promise<ReadPiece[]>;
  write(volume: Volume, offset: number, data: Uint8Array, fua: boolean): Promise<void>;
  zero(volume: Volume, offset: number, length: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  blockStatus(volume: Volume, offset: number, length: number): Promise<Extent[]>;
  check(volume: Volume): void;
}

class VolumeHandle implements BlockDevice {
  readonly #volume: Volume;
  readonly #io: VolumeIo;
  #closed = false;

  constructor(volume: Volume, io: VolumeIo) {
    this.#volume = volume;
    this.#io = io;
  }

  get name(): string {
    return this.#volume.name;
  }

  get size(): number {
    return this.#volume.size;
  }

  get readOnly(): boolean {
    return this.#volume.kind === 'snapshot';
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadPiece[]> {
    this.#check();
    return this.#io.read(this.#volume, offset, length, into);
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.#checkWritable();
    return this.#io.write(this.#volume, offset, data, fua);
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    this.#checkWritable();
    return this.#io.zero(this.#volume, offset, length, fua);
  }

  async zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    this.#checkWritable();
    return this.#io.zero(this.#volume, offset, length, options.fua);
  }

  async flush(): Promise<void> {
    this.#check();
    return this.#io.flush();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.#check();
    return this.#io.blockStatus(this.#volume, offset, length);
  }

  async cache(): Promise<void> {
    this.#check();
  }

  async close(): Promise<void> {
    this.#closed = true;
  }

  #check(): void {
    if (this.#closed) throw new OperationError('ESHUTDOWN', `handle of ${this.#volume.name} is closed`);
    this.#io.check(this.#volume);
  }

  #checkWritable(): void {
    this.#check();
    if (this.readOnly) throw new OperationError('EPERM', `${this.#volume.name} is a read-only snapshot`);
  }
}

export class Pool implements ExportCatalog {
  readonly #dir: string;
  readonly #layersDir: string;
  readonly #files: FileLayer;
  readonly #log: Logger | undefined;
  readonly #capacityBytes: number | undefined;
  readonly #checkpointBytes: number;
  readonly #commitBytes: number;
  /** A volume lives at its own offsets in one file, so it is no larger than a file can be. */
  #largestVolume = MAX_VOLUME_SIZE;

  readonly #volumes = new Map<string, Volume>();
  readonly #layers = new Map<number, Layer>();
  #nextLayerId = FIRST_LAYER_ID;
  /** Reads and writes started and not finished, all volumes together. */
  #ioUnderWay = 0;
  /** Prefetches started by #readAhead and not settled. */
  #readsAhead = 0;
  #generation = 0;
  #journal: Journal | undefined;

  /** Blocks held by all layer files, and blocks reserved by writes in flight. */
  #usedBlocks = 0;
  #reservedBlocks = 0;
  #fsFree = Infinity;
  #usedAtFsFree = 0;
  #fsFreeAt = 0;
  #fsRefresh: Promise<void> | undefined;

  readonly #handles = new Map<number, Promise<FileHandle>>();
  readonly #onDisk = new Set<number>();
  readonly #dirty = new Set<number>();
  #layersDirDirty = false;

  #commitRunning: Promise<void> | undefined;
  #commitQueued: Promise<void> | undefined;
  #checkpointWanted = false;

  /** Ranges [layer, start, end) whose trim is not yet durable, then those ready to punch. */
  #trimmed: Array<[number, number, number]> = [];
  #punchable: Array<[number, number, number]> = [];
  #punching: Promise<void> | undefined;
  #trimCommitTimer: NodeJS.Timeout | undefined;

  #compacting: Promise<void> | undefined;
  #compactAgain = false;
  /** Files of folded layers being removed: unlinking a fragmented file can take a second. */
  #removing: Promise<void> | undefined;

  #closed = false;
  readonly #io: VolumeIo;

  private constructor(dir: string, options: PoolOptions) {
    this.#dir = dir;
    this.#layersDir = `${dir}/layers`;
    this.#files = options.files ?? nodeFileLayer();
    this.#log = options.logger;
    this.#capacityBytes = options.capacityBytes;
    this.#checkpointBytes = options.checkpointBytes ?? DEFAULT_CHECKPOINT_BYTES;
    this.#commitBytes = options.commitBytes ?? DEFAULT_COMMIT_BYTES;
    this.#io = {
      read: (volume, offset, length, into) => this.#read(volume, offset, length, into),
      write: (volume, offset, data, fua) => this.#write(volume, offset, data, fua),
      zero: (volume, offset, length, fua) => this.#zero(volume, offset, length, fua),
      flush: () => this.flush(),
      blockStatus: (volume, offset, length) => this.#blockStatus(volume, offset, length),
      check: (volume) => this.#checkOpen(volume),
    };
  }

  /** Opens the pool in `dir`, creating it if `dir` is absent or empty. */
  static async open(dir: string, options: PoolOptions = {}): Promise<Pool> {
    const pool = new Pool(dir, options);
    const files = pool.#files;
    await files.mkdir(dir);
    await acquireLock(files, `${dir}/lock`);
    try {
      await pool.#load();
      pool.#largestVolume = await files.largestFile(`${dir}/${SIZE_PROBE}`, MAX_VOLUME_SIZE);
    } catch (error) {
      await pool.#closeFiles();
      await releaseLock(files, `${dir}/lock`);
      throw error;
    }
    return pool;
  }

  // ---- catalog -------------------------------------------------------------------------------

  list(): ExportDescription[] {
    return this.volumes().map((info) => this.#describe(info));
  }

  describe(name: string): ExportDescription | undefined {
    const info = this.info(name);
    return info === undefined ? undefined : this.#describe(info);
  }

  async open(name: string): Promise<BlockDevice> {
    this.#checkNotClosed();
    return new VolumeHandle(this.#volume(name), this.#io);
  }

  volumes(): VolumeInfo[] {
    return [...this.#volumes.keys()].sort().map((name) => this.info(name)!);
  }

  info(name: string): VolumeInfo | undefined {
    const volume = this.#volumes.get(name);
    if (volume === undefined) return undefined;
    const snapshots: string[] = [];
    if (volume.kind === 'volume') {
      for (const other of this.#volumes.values()) {
        if (other.kind === 'snapshot' && other.parent === name) snapshots.push(other.name);
      }
    }
    return {
      name: volume.name,
      kind: volume.kind,
      size: volume.size,
      readOnly: volume.kind === 'snapshot',
      parent: volume.parent,
      createdAt: volume.createdAt,
      labels: volume.labels,
      snapshots: snapshots.sort(),
    };
  }

  // ---- lifecycle -----------------------------------------------------------------------------

  async createVolume(name: string, size: number, options: { labels?: Labels } = {}): Promise<VolumeInfo> {
    this.#checkNotClosed();
    validateName(name);
    this.#checkSize(size);
    const labels = validateLabels(options.labels);
    this.#checkFree(name);
    this.#record({ op: 'create', name, size, head: this.#nextLayerId, createdAt: new Date().toISOString(), ...labelled(labels) });
    await this.flush();
    return this.info(name)!;
  }

  async snapshot(source: string, name: string, options: { labels?: Labels } = {}): Promise<VolumeInfo> {
    this.#checkNotClosed();
    validateName(name);
    const labels = validateLabels(options.labels);
    const volume = this.#volume(source);
    await volume.gate.exclusive(() => {
      this.#checkOpen(volume);
      this.#checkFree(name);
      this.#record({
        op: 'snapshot',
        source,
        name,
        head: volume.kind === 'volume' && this.#mustFreeze(volume.layer) ? this.#nextLayerId : null,
        createdAt: new Date().toISOString(),
        ...labelled(labels),
      });
    });
    await this.flush();
    return this.info(name)!;
  }

  async clone(source: string, name: string, options: { size?: number; labels?: Labels } = {}): Promise<VolumeInfo> {
    this.#checkNotClosed();
    validateName(name);
    const labels = validateLabels(options.labels);
    const volume = this.#volume(source);
    await volume.gate.exclusive(() => {
      this.#checkOpen(volume);
      this.#checkFree(name);
      const size = options.size ?? volume.size;
      this.#checkSize(size);
      if (size < volume.size) {
        throw new OperationError('ERANGE', `a clone cannot be smaller than its source (${size} < ${volume.size})`);
      }
      const sourceHead = volume.kind === 'volume' && this.#mustFreeze(volume.layer) ? this.#nextLayerId : null;
      const head = sourceHead === null ? this.#nextLayerId : sourceHead + 1;
      this.#record({ op: 'clone', source, name, size, head, sourceHead, createdAt: new Date().toISOString(), ...labelled(labels) });
    });
    await this.flush();
    return this.info(name)!;
  }

  async grow(name: string, size: number): Promise<VolumeInfo> {
    this.#checkNotClosed();
    const volume = this.#volume(name);
    this.#checkSize(size);
    await volume.gate.exclusive(async () => {
      this.#checkOpen(volume);
      if (volume.kind === 'snapshot') throw new OperationError('EINVAL', `${name} is a snapshot; snapshots do not grow`);
      if (size < volume.size) {
        throw new OperationError('ERANGE', `shrinking is not supported (${name} is ${volume.size} bytes, asked ${size})`);
      }
      if (size === volume.size) return;
      const handle = this.#onDisk.has(volume.layer.id) ? await this.#file(volume.layer, false) : undefined;
      await handle?.truncate(size).catch((error: unknown) => {
        throw ioError(error, `growing ${name}`);
      });
      this.#record({ op: 'grow', name, size });
    });
    await this.flush();
    return this.info(name)!;
  }

  #checkSize(size: number): void {
    checkSize(size);
    if (size > this.#largestVolume) {
      throw new OperationError(
        'ERANGE',
        `${size} bytes is more than the pool's file system holds in one file (${this.#largestVolume} bytes at most)`,
      );
    }
  }

  async delete(name: string): Promise<void> {
    this.#checkNotClosed();
    const volume = this.#volume(name);
    const freed = await volume.gate.exclusive(() => {
      this.#checkOpen(volume);
      return this.#record({ op: 'delete', name });
    });
    await this.flush();
    await this.#removeLayerFiles(freed);
    this.#scheduleCompaction();
  }

  /**
   * Copies every block the volume inherits into its head, online, then detaches the head from
   * its ancestors. Blocks written meanwhile are left alone: each step re-reads the map under the
   * volume's gate. onProgress gets bytes copied and bytes to copy (the total grows if a
   * snapshot or clone during the flatten makes blocks inherited again).
   */
  async flatten(name: string, onProgress?: (done: number, total: number) => void): Promise<void> {
    this.#checkNotClosed();
    const volume = this.#volume(name);
    if (volume.kind === 'snapshot') throw new OperationError('EINVAL', `${name} is a snapshot; only volumes flatten`);
    const inherited = (head: Layer): number => {
      let count = 0;
      head.map.extents(0, Infinity, (start, end, value) => {
        if (value >= FIRST_LAYER_ID && value !== head.id) count += end - start;
      });
      return count;
    };
    let head = volume.layer;
    let total = inherited(head) * BLOCK_SIZE;
    let done = 0;
    let cursor = 0;
    onProgress?.(done, total);
    let freed: Layer[] | undefined;
    while (freed === undefined) {
      freed = await volume.gate.exclusive(async () => {
        this.#checkOpen(volume);
        if (volume.layer !== head) {
          head = volume.layer;
          cursor = 0;
          total = done + inherited(head) * BLOCK_SIZE;
        }
        let run: [number, number, number] | undefined;
        head.map.extents(cursor, Infinity, (start, end, value) => {
          if (value < FIRST_LAYER_ID || value === head.id) return false;
          run = [start, Math.min(end, start + FLATTEN_STEP), value];
          return true;
        });
        if (run === undefined) return head.parent === null ? [] : this.#record({ op: 'detach', name, parent: null });
        const [start, end, value] = run;
        await this.#copyBlocks(head, start, end, this.#layers.get(value)!);
        done += (end - start) * BLOCK_SIZE;
        cursor = end;
        return undefined;
      });
      if (freed === undefined) onProgress?.(done, total);
    }
    await this.flush();
    onProgress?.(done, total);
    await this.#removeLayerFiles(freed);
  }

  /** Bytes the volume's map points at in layer files: all shared for a copy just made. */
  mappedBytes(name: string): number {
    return this.#volume(name).layer.map.layerBlocks() * BLOCK_SIZE;
  }

  async usage(): Promise<PoolUsage> {
    this.#checkNotClosed();
    await this.#refreshFree();
    // A block is exclusive to a volume when no other volume's map points at the same place
    // (layer, block); sweeping each layer's intervals from all maps finds how many do.
    const byLayer = new Map<number, Array<[position: number, delta: 1 | -1, volume: Volume]>>();
    for (const volume of this.#volumes.values()) {
      volume.layer.map.extents(0, Infinity, (start, end, value) => {
        if (value < FIRST_LAYER_ID) return;
        let events = byLayer.get(value);
        if (events === undefined) byLayer.set(value, (events = []));
        events.push([start, 1, volume], [end, -1, volume]);
      });
    }
    const exclusive = new Map<Volume, number>();
    const shared = new Map<Volume, number>();
    const add = (totals: Map<Volume, number>, volume: Volume, blocks: number): void => {
      totals.set(volume, (totals.get(volume) ?? 0) + blocks);
    };
    for (const events of byLayer.values()) {
      events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      const active = new Map<Volume, number>();
      let previous = 0;
      for (const [position, delta, volume] of events) {
        if (position > previous && active.size > 0) {
          const blocks = position - previous;
          if (active.size === 1) add(exclusive, active.keys().next().value!, blocks);
          else for (const holder of active.keys()) add(shared, holder, blocks);
        }
        previous = position;
        const depth = (active.get(volume) ?? 0) + delta;
        if (depth === 0) active.delete(volume);
        else active.set(volume, depth);
      }
    }
    const volumes: VolumeUsage[] = [...this.#volumes.values()].map((volume) => ({
      name: volume.name,
      kind: volume.kind,
      size: volume.size,
      exclusiveBytes: (exclusive.get(volume) ?? 0) * BLOCK_SIZE,
      sharedBytes: (shared.get(volume) ?? 0) * BLOCK_SIZE,
    }));
    volumes.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const usedBytes = this.#usedBlocks * BLOCK_SIZE;
    const freeBytes = Math.max(0, this.#freeBytes());
    return {
      capacityBytes: this.#capacityBytes ?? usedBytes + freeBytes,
      usedBytes,
      freeBytes,
      layers: this.#layers.size,
      journalBytes: this.#journal?.size ?? 0,
      largestVolumeBytes: this.#largestVolume,
      volumes,
    };
  }

  /**
   * Makes every write completed so far, on every volume, durable: data files first, then the
   * journal records that point at them. Concurrent calls share one commit.
   */
  flush(): Promise<void> {
    if (this.#commitQueued !== undefined) return this.#commitQueued;
    if (this.#commitRunning === undefined) return this.#startCommit();
    const queued = this.#commitRunning
      .catch(() => undefined)
      .then(() => {
        this.#commitQueued = undefined;
        return this.#startCommit();
      });
    this.#commitQueued = queued;
    return queued;
  }

  /** Resolves when background work (compaction, hole punching of durable trims) is done. */
  async idle(): Promise<void> {
    while (this.#compacting !== undefined || this.#punching !== undefined || this.#removing !== undefined) {
      await this.#compacting;
      await this.#punching;
      await this.#removing;
    }
  }

  /** Waits for I/O in flight, makes everything durable, writes a checkpoint, releases the lock. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#trimCommitTimer);
    for (const volume of this.#volumes.values()) await volume.gate.exclusive(() => undefined);
    try {
      this.#checkpointWanted = true;
      await this.flush();
      await this.idle();
    } finally {
      await this.#closeFiles();
      await releaseLock(this.#files, `${this.#dir}/lock`);
    }
  }

  // ---- I/O -----------------------------------------------------------------------------------

  async #read(volume: Volume, offset: number, length: number, into?: Buffer): Promise<ReadPiece[]> {
    this.#ioUnderWay++;
    try {
      await volume.gate.enterShared();
      try {
        this.#checkOpen(volume);
        const pieces: ReadPiece[] = [];
        const reads: Array<Promise<void>> = [];
        const runs: DataRun[] = [];
        const end = offset + length;
        volume.layer.map.runs(Math.floor(offset / BLOCK_SIZE), blocksOf(end), (start, stop, value) => {
          const from = Math.max(start * BLOCK_SIZE, offset);
          const to = Math.min(stop * BLOCK_SIZE, end);
          const last = pieces[pieces.length - 1];
          if (value < FIRST_LAYER_ID) {
            if (last?.kind === 'zero') last.length += to - from;
            else pieces.push({ kind: 'zero', offset: from, length: to - from });
            return;
          }
          if (into === undefined) {
            const data = Buffer.allocUnsafe(to - from);
            pieces.push({ kind: 'data', offset: from, data });
            reads.push(this.#readLayer(this.#layers.get(value)!, data, from));
            return;
          }
          // Runs from different layers that meet are one piece when they share `into`.
          if (last?.kind === 'data') last.data = into.subarray(last.offset - offset, to - offset);
          else pieces.push({ kind: 'data', offset: from, data: into.subarray(from - offset, to - offset) });
          runs.push({ from, to, layer: value });
        });
        this.#readAhead(volume, offset, end);
        await (into === undefined ? Promise.all(reads) : this.#readRuns(runs, into, offset));
        return pieces;
      } finally {
        volume.gate.leaveShared();
      }
    } finally {
      this.#ioUnderWay--;
    }
  }

  /**
   * Starts reading other layers' blocks ahead of a sequential reader (see readahead.ts): in each
   * step of the range, every run of a layer other than the one holding most of the step's bytes.
   * That one the kernel reads ahead by itself, since its reads are sequential in its file.
   */
  #readAhead(volume: Volume, from: number, to: number): void {
    const range = volume.readahead.advance(from, to, volume.size);
    if (range === undefined) return;
    for (let step = range[0]; step < range[1]; step += READAHEAD_STEP_BYTES) {
      const runs: DataRun[] = [];
      const stepEnd = Math.min(step + READAHEAD_STEP_BYTES, range[1]);
      volume.layer.map.runs(Math.floor(step / BLOCK_SIZE), blocksOf(stepEnd), (start, stop, value) => {
        if (value >= FIRST_LAYER_ID) runs.push({ from: start * BLOCK_SIZE, to: stop * BLOCK_SIZE, layer: value });
      });
      const major = majorLayer(runs).layer;
      for (const run of runs) {
        if (run.layer === major) continue;
        if (this.#readsAhead >= MAX_READS_AHEAD) return;
        void this.#readLayerAhead(this.#layers.get(run.layer)!, run.from, run.to - run.from);
      }
    }
  }

  async #readLayerAhead(layer: Layer, position: number, length: number): Promise<void> {
    this.#readsAhead++;
    try {
      await (await this.#file(layer, false))?.prefetch(position, length);
    } catch {
      // Only a hint: the read that needs these blocks reports what is wrong with the file.
    } finally {
      this.#readsAhead--;
    }
  }

  /**
   * Reads data runs (in order) into `into`, which starts at byte `offset`. A clone reads mostly one
   * layer with other layers' blocks sprinkled in: that layer is read across all its runs with one
   * transfer when what it reads in vain between them is no more than what it reads for use, and the
   * runs between are read aside and laid over it afterwards. One transfer instead of one per gap
   * costs less CPU, and the kernel's readahead sees a plain sequential read. Bytes of `into` outside
   * the runs are left undefined.
   */
  async #readRuns(runs: readonly DataRun[], into: Buffer, offset: number): Promise<void> {
    if (runs.length === 1) {
      const run = runs[0]!;
      return this.#readLayer(this.#layers.get(run.layer)!, into.subarray(run.from - offset, run.to - offset), run.from);
    }
    const over = spanningLayer(runs);
    const within = (run: DataRun): boolean => over !== undefined && run.layer !== over.layer && run.from > over.from && run.from < over.to;
    let asideBytes = 0;
    for (const run of runs) if (within(run)) asideBytes += run.to - run.from;
    const aside = Buffer.allocUnsafe(asideBytes);
    const reads: Array<Promise<void>> = [];
    if (over !== undefined) {
      reads.push(this.#readLayer(this.#layers.get(over.layer)!, into.subarray(over.from - offset, over.to - offset), over.from));
    }
    let at = 0;
    for (const run of runs) {
      if (run.layer === over?.layer) continue;
      const buffer = within(run) ? aside.subarray(at, (at += run.to - run.from)) : into.subarray(run.from - offset, run.to - offset);
      reads.push(this.#readLayer(this.#layers.get(run.layer)!, buffer, run.from));
    }
    await Promise.all(reads);
    at = 0;
    for (const run of runs) if (within(run)) aside.copy(into, run.from - offset, at, (at += run.to - run.from));
  }

  async #write(volume: Volume, offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.#ioUnderWay++;
    try {
      await volume.gate.enterShared();
      try {
        this.#checkOpen(volume);
        await this.#writeAt(volume.layer, volume, offset, data);
      } finally {
        volume.gate.leaveShared();
      }
    } finally {
      this.#ioUnderWay--;
    }
    if (fua) await this.flush();
    else await this.#journalRoom();
  }

  /** Waits for a commit while unflushed records have outgrown what a background commit keeps up with. */
  async #journalRoom(): Promise<void> {
    if (this.#journal!.pendingBytes >= this.#commitBytes * COMMIT_WAIT_FACTOR) await this.flush();
  }

  /**
   * Writes into the head with one pwrite. Whole blocks are written as they come; a partial block
   * the head already holds is written in place; a partial block it does not hold is completed
   * from what the volume reads there (copy-up) under that block's lock.
   */
  async #writeAt(head: Layer, volume: Volume, offset: number, data: Uint8Array): Promise<void> {
    const end = offset + data.length;
    const first = Math.floor(offset / BLOCK_SIZE);
    const last = blocksOf(end) - 1;
    const headEdge = offset % BLOCK_SIZE !== 0;
    const tailEdge = end % BLOCK_SIZE !== 0;
    const releases: Array<() => void> = [];
    let reserved = 0;
    try {
      if (headEdge || (tailEdge && last === first)) releases.push(await volume.locks.lock(first));
      if (tailEdge && last !== first) releases.push(await volume.locks.lock(last));
      const copyFirst = headEdge && head.map.get(first) !== head.id;
      const copyLast = tailEdge && head.map.get(last) !== head.id;
      const fresh = last + 1 - first - head.map.count(first, last + 1, head.id);
      reserved = this.#reserve(fresh);
      const handle = await this.#file(head, true);
      if (!copyFirst && !copyLast) {
        await handle.write(data, 0, data.length, offset, this.#ioUnderWay === 1);
      } else {
        const from = copyFirst ? first * BLOCK_SIZE : offset;
        const to = copyLast ? (last + 1) * BLOCK_SIZE : end;
        const buffer = Buffer.allocUnsafe(to - from);
        const fills: Array<Promise<void>> = [];
        if (copyFirst) fills.push(this.#readVolumeBlock(head, first, buffer, 0));
        if (copyLast && !(copyFirst && last === first)) {
          fills.push(this.#readVolumeBlock(head, last, buffer, buffer.length - BLOCK_SIZE));
        }
        await Promise.all(fills);
        buffer.set(data, offset - from);
        await handle.write(buffer, 0, buffer.length, from, this.#ioUnderWay === 1);
      }
      this.#dirty.add(head.id);
      if (fresh > 0) this.#record({ op: 'assign', layer: head.id, start: first, end: last + 1, value: head.id });
    } catch (error) {
      throw ioError(error, `writing ${volume.name}`);
    } finally {
      this.#reservedBlocks -= reserved;
      for (const release of releases) release();
    }
  }

  /** Fills one block of `buffer` with what the head's map says the block holds. */
  async #readVolumeBlock(head: Layer, block: number, buffer: Buffer, at: number): Promise<void> {
    const value = head.map.get(block);
    const target = buffer.subarray(at, at + BLOCK_SIZE);
    if (value < FIRST_LAYER_ID) target.fill(0);
    else await this.#readLayer(this.#layers.get(value)!, target, block * BLOCK_SIZE);
  }

  async #readLayer(layer: Layer, target: Buffer, position: number): Promise<void> {
    let read = 0;
    try {
      const handle = await this.#file(layer, false);
      if (handle !== undefined) read = await handle.read(target, 0, target.length, position, this.#ioUnderWay === 1);
    } catch (error) {
      throw ioError(error, `reading layer ${layer.id}`);
    }
    if (read < target.length) target.fill(0, read);
  }

  /** TRIM and WRITE_ZEROES: whole blocks become ZERO in the map, partial edges are written. */
  async #zero(volume: Volume, offset: number, length: number, fua: boolean): Promise<void> {
    await volume.gate.enterShared();
    try {
      this.#checkOpen(volume);
      const head = volume.layer;
      const end = offset + length;
      const first = Math.ceil(offset / BLOCK_SIZE);
      const stop = Math.floor(end / BLOCK_SIZE);
      const edges: Array<[number, number]> = [];
      if (first > stop) edges.push([offset, end]);
      else {
        if (offset < first * BLOCK_SIZE) edges.push([offset, first * BLOCK_SIZE]);
        if (stop * BLOCK_SIZE < end && stop * BLOCK_SIZE >= offset) edges.push([stop * BLOCK_SIZE, end]);
      }
      await Promise.all(
        edges.map(([from, to]) =>
          head.map.get(Math.floor(from / BLOCK_SIZE)) < FIRST_LAYER_ID
            ? undefined
            : this.#writeAt(head, volume, from, Buffer.alloc(to - from)),
        ),
      );
      if (first < stop) {
        head.map.extents(first, stop, (start, to, value) => {
          if (value === head.id) this.#trimmed.push([head.id, start, to]);
        });
        this.#record({
          op: 'assign',
          layer: head.id,
          start: first,
          end: stop,
          value: head.parent === null ? UNALLOCATED : ZERO,
        });
        this.#scheduleTrimCommit();
      }
    } finally {
      volume.gate.leaveShared();
    }
    if (fua) await this.flush();
    else await this.#journalRoom();
  }

  async #blockStatus(volume: Volume, offset: number, length: number): Promise<Extent[]> {
    this.#checkOpen(volume);
    const end = offset + length;
    const extents: Extent[] = [];
    let runs = 0;
    volume.layer.map.runs(Math.floor(offset / BLOCK_SIZE), blocksOf(end), (start, stop, value) => {
      const from = Math.max(start * BLOCK_SIZE, offset);
      const to = Math.min(stop * BLOCK_SIZE, end);
      const hole = value < FIRST_LAYER_ID;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.hole === hole) last.length += to - from;
      else {
        extents.push({ length: to - from, hole, zero: hole });
        runs++;
      }
      return runs >= MAX_STATUS_RUNS;
    });
    return extents;
  }

  /** Flatten and compaction step: copies [start, end) from `source` into the head, under the exclusive gate. */
  async #copyBlocks(head: Layer, start: number, end: number, source: Layer): Promise<void> {
    const reserved = this.#reserve(end - start);
    try {
      const buffer = Buffer.allocUnsafe((end - start) * BLOCK_SIZE);
      await this.#readLayer(source, buffer, start * BLOCK_SIZE);
      const handle = await this.#file(head, true);
      await handle.write(buffer, 0, buffer.length, start * BLOCK_SIZE);
      this.#dirty.add(head.id);
      this.#record({ op: 'assign', layer: head.id, start, end, value: head.id });
    } catch (error) {
      throw ioError(error, `copying blocks into layer ${head.id}`);
    } finally {
      this.#reservedBlocks -= reserved;
    }
  }

  // ---- space ---------------------------------------------------------------------------------

  #freeBytes(): number {
    if (this.#capacityBytes !== undefined) {
      return this.#capacityBytes - (this.#usedBlocks + this.#reservedBlocks) * BLOCK_SIZE;
    }
    return this.#fsFree - (this.#usedBlocks + this.#reservedBlocks - this.#usedAtFsFree) * BLOCK_SIZE;
  }

  /** Reserves room for `blocks` new blocks or throws ENOSPC; returns what to give back. */
  #reserve(blocks: number): number {
    if (blocks <= 0) return 0;
    if (this.#capacityBytes === undefined && Date.now() - this.#fsFreeAt > FREE_SPACE_REFRESH_MS) {
      void this.#refreshFree();
    }
    if (blocks * BLOCK_SIZE > this.#freeBytes()) {
      throw new OperationError('ENOSPC', `pool is full (${blocks * BLOCK_SIZE} bytes needed)`);
    }
    this.#reservedBlocks += blocks;
    return blocks;
  }

  #refreshFree(): Promise<void> {
    if (this.#capacityBytes !== undefined) return Promise.resolve();
    this.#fsRefresh ??= this.#files
      .freeBytes(this.#dir)
      .then(
        (free) => {
          this.#fsFree = free;
          this.#usedAtFsFree = this.#usedBlocks + this.#reservedBlocks;
          this.#fsFreeAt = Date.now();
        },
        (error: unknown) => this.#log?.warn({ err: error }, 'cannot read free space of the pool file system'),
      )
      .finally(() => (this.#fsRefresh = undefined));
    return this.#fsRefresh;
  }

  // ---- metadata: one path for live changes and for replay ------------------------------------

  /** Applies a change to the in-memory metadata and journals it; returns layers it freed. */
  #record(record: MetaRecord): Layer[] {
    const freed = this.#apply(record);
    const journal = this.#journal!;
    journal.append(record);
    if (journal.pendingBytes >= this.#commitBytes && this.#commitQueued === undefined && !this.#closed) {
      this.flush().catch((error: unknown) => this.#log?.warn({ err: error }, 'background commit failed'));
    }
    return freed;
  }

  #apply(record: MetaRecord): Layer[] {
    switch (record.op) {
      case 'assign': {
        const layer = this.#layers.get(record.layer);
        if (layer === undefined) throw new Error(`assign to unknown layer ${record.layer}`);
        const before = layer.map.count(record.start, record.end, layer.id);
        layer.map = layer.map.assignInPlace(record.start, record.end, record.value);
        const delta = (record.value === layer.id ? record.end - record.start : 0) - before;
        layer.blocks += delta;
        this.#usedBlocks += delta;
        return [];
      }
      case 'create': {
        const head = this.#newLayer(record.head, null, BlockMap.EMPTY, record.size);
        this.#addVolume({ ...describedBy(record), kind: 'volume', size: record.size, parent: null }, head);
        return [];
      }
      case 'snapshot': {
        const source = this.#existing(record.source);
        const frozen = this.#freeze(source, record.head);
        this.#addVolume({ ...describedBy(record), kind: 'snapshot', size: source.size, parent: source.name }, frozen);
        return [];
      }
      case 'clone': {
        const source = this.#existing(record.source);
        const frozen = this.#freeze(source, record.sourceHead);
        const head = this.#newLayer(record.head, frozen, frozen.map, record.size);
        this.#addVolume({ ...describedBy(record), kind: 'volume', size: record.size, parent: source.name }, head);
        return [];
      }
      case 'grow': {
        const volume = this.#existing(record.name);
        volume.size = record.size;
        volume.layer.size = record.size;
        return [];
      }
      case 'delete': {
        const volume = this.#existing(record.name);
        volume.deleted = true;
        this.#volumes.delete(record.name);
        return this.#release(volume.layer);
      }
      case 'fold': {
        const layer = this.#layers.get(record.layer);
        const child = this.#layers.get(record.into);
        if (layer === undefined || child === undefined) throw new Error(`fold of unknown layers ${record.layer} into ${record.into}`);
        return this.#applyFold(layer, child);
      }
      case 'absorb': {
        const layer = this.#layers.get(record.layer);
        const parent = this.#layers.get(record.into);
        if (layer === undefined || parent === undefined) throw new Error(`absorb of unknown layers ${record.layer} into ${record.into}`);
        return this.#applyAbsorb(layer, parent);
      }
      case 'detach': {
        const head = this.#existing(record.name).layer;
        const parent = head.parent;
        const kept = record.parent === undefined || record.parent === null ? null : this.#layers.get(record.parent)!;
        if (kept !== null) kept.refs++;
        head.parent = kept;
        return parent === null ? [] : this.#release(parent);
      }
    }
  }

  /**
   * The frozen layer standing for `source` now. A snapshot is already frozen. A volume's head is
   * frozen and replaced by `newHead`, unless `newHead` is null: then the head holds nothing
   * beyond its parent (same map) and the parent stands for it.
   */
  #freeze(source: Volume, newHead: number | null): Layer {
    if (source.kind === 'snapshot') return source.layer;
    const head = source.layer;
    if (newHead === null) return head.parent!;
    head.owner = null;
    const replacement = this.#newLayer(newHead, head, head.map, source.size);
    head.refs--;
    replacement.refs++;
    replacement.owner = source;
    source.layer = replacement;
    return head;
  }

  #mustFreeze(head: Layer): boolean {
    return head.parent === null || head.map !== head.parent.map;
  }

  #newLayer(id: number, parent: Layer | null, map: BlockMap, size: number): Layer {
    if (this.#layers.has(id)) throw new Error(`layer ${id} exists`);
    // The map may already be another layer's: neither may change its nodes in place from now on.
    const layer: Layer = { id, parent, map: map.share(), size, blocks: 0, refs: 0, owner: null };
    if (parent !== null) parent.refs++;
    this.#layers.set(id, layer);
    this.#nextLayerId = Math.max(this.#nextLayerId, id + 1);
    return layer;
  }

  #addVolume(identity: VolumeIdentity, layer: Layer): Volume {
    if (this.#volumes.has(identity.name)) throw new Error(`volume ${identity.name} exists`);
    const { name, kind, size, parent, createdAt, labels } = identity;
    const volume: Volume = { name, kind, size, parent, createdAt, labels, layer, gate: new Gate(), locks: new BlockLocks(), readahead: new SequentialReadahead(), deleted: false };
    if (kind === 'volume') layer.owner = volume;
    layer.refs++;
    this.#volumes.set(name, volume);
    return volume;
  }

  /** Drops one reference; layers reaching zero leave the metadata (their files go later). */
  #release(layer: Layer): Layer[] {
    const freed: Layer[] = [];
    for (let at: Layer | null = layer; at !== null && --at.refs === 0; at = at.parent) {
      this.#layers.delete(at.id);
      this.#usedBlocks -= at.blocks;
      freed.push(at);
    }
    return freed;
  }

  #existing(name: string): Volume {
    const volume = this.#volumes.get(name);
    if (volume === undefined) throw new Error(`journal names unknown volume ${name}`);
    return volume;
  }

  // ---- layer files ---------------------------------------------------------------------------

  #layerPath(id: number): string {
    return `${this.#layersDir}/${id.toString(16).padStart(8, '0')}.raw`;
  }

  #file(layer: Layer, create: true): Promise<FileHandle>;
  #file(layer: Layer, create: false): Promise<FileHandle | undefined>;
  #file(layer: Layer, create: boolean): Promise<FileHandle | undefined> {
    const open = this.#handles.get(layer.id);
    if (open !== undefined) return open;
    const exists = this.#onDisk.has(layer.id);
    if (!exists && !create) return Promise.resolve(undefined);
    const path = this.#layerPath(layer.id);
    const opening = exists
      ? this.#files.open(path, 'readWrite')
      : this.#files.open(path, 'create').then(async (handle) => {
          await handle.truncate(layer.size);
          this.#layersDirDirty = true;
          return handle;
        });
    this.#onDisk.add(layer.id);
    this.#handles.set(layer.id, opening);
    opening.catch(() => {
      this.#handles.delete(layer.id);
      if (!exists) this.#onDisk.delete(layer.id);
    });
    return opening;
  }

  async #removeLayerFiles(layers: Layer[]): Promise<void> {
    for (const layer of layers) {
      const handle = this.#handles.get(layer.id);
      this.#handles.delete(layer.id);
      this.#dirty.delete(layer.id);
      await handle?.then((open) => open.close()).catch(() => undefined);
      if (this.#onDisk.delete(layer.id)) {
        await this.#files.unlink(this.#layerPath(layer.id)).catch((error: unknown) => {
          if (!isErrno(error, 'ENOENT')) this.#log?.warn({ err: error, layer: layer.id }, 'cannot remove layer file');
        });
      }
    }
  }

  async #closeFiles(): Promise<void> {
    const handles = [...this.#handles.values()];
    this.#handles.clear();
    await Promise.all(handles.map((handle) => handle.then((open) => open.close()).catch(() => undefined)));
    await this.#journal?.close().catch(() => undefined);
  }

  // ---- commit, checkpoint, recovery ----------------------------------------------------------

  #startCommit(): Promise<void> {
    const running = this.#commit().finally(() => {
      if (this.#commitRunning === running) this.#commitRunning = undefined;
    });
    this.#commitRunning = running;
    return running;
  }

  async #commit(): Promise<void> {
    const journal = this.#journal!;
    if (this.#checkpointWanted || journal.size >= this.#checkpointBytes) {
      await this.#checkpoint();
      return;
    }
    const frames = journal.take();
    const trimmed = this.#trimmed;
    this.#trimmed = [];
    const synced = await this.#syncData().catch((error: unknown) => {
      journal.putBack(frames);
      this.#trimmed = trimmed.concat(this.#trimmed);
      throw ioError(error, 'flushing data');
    });
    try {
      await journal.write(frames);
    } catch (error) {
      journal.putBack(frames);
      this.#trimmed = trimmed.concat(this.#trimmed);
      for (const id of synced) this.#dirty.add(id);
      throw ioError(error, 'writing the journal');
    }
    this.#punch(trimmed);
  }

  /** fsyncs dirty layer files (and the layers directory if files were created). */
  async #syncData(): Promise<number[]> {
    const dirty = [...this.#dirty];
    this.#dirty.clear();
    const dirDirty = this.#layersDirDirty;
    this.#layersDirDirty = false;
    try {
      await Promise.all(
        dirty.map(async (id) => {
          const handle = this.#handles.get(id);
          if (handle === undefined) return;
          try {
            await (await handle).sync();
          } catch (error) {
            if (this.#layers.has(id)) throw error;
          }
        }),
      );
      if (dirDirty) await this.#files.syncDir(this.#layersDir);
    } catch (error) {
      for (const id of dirty) this.#dirty.add(id);
      this.#layersDirDirty ||= dirDirty;
      throw error;
    }
    return dirty;
  }

  /**
   * Writes all metadata as it is at this instant (records still pending are in it), then starts
   * the next journal generation. Runs inside the commit chain, so nothing else writes a journal.
   */
  async #checkpoint(): Promise<void> {
    this.#checkpointWanted = false;
    const old = this.#journal!;
    const frames = old.take();
    const trimmed = this.#trimmed;
    this.#trimmed = [];
    const generation = this.#generation + 1;
    const layers = [...this.#layers.values()];
    const { bytes: nodes, roots } = encodeMaps(layers.map((layer) => layer.map));
    const meta: CheckpointMeta = {
      generation,
      nextLayerId: this.#nextLayerId,
      layers: layers.map((layer, i) => ({
        id: layer.id,
        parent: layer.parent?.id ?? null,
        size: layer.size,
        blocks: layer.blocks,
        root: roots[i]!,
      })),
      volumes: [...this.#volumes.values()].map((volume) => ({
        name: volume.name,
        kind: volume.kind,
        size: volume.size,
        layer: volume.layer.id,
        parent: volume.parent,
        createdAt: volume.createdAt,
        ...labelled(volume.labels),
      })),
    };
    let next: Journal;
    try {
      await this.#syncData();
      await writeDurably(this.#files, this.#dir, 'checkpoint', encodeCheckpoint(meta, nodes));
      next = await Journal.create(this.#files, this.#dir, generation);
    } catch (error) {
      old.putBack(frames);
      this.#trimmed = trimmed.concat(this.#trimmed);
      throw ioError(error, 'writing a checkpoint');
    }
    next.putBack(old.take());
    this.#journal = next;
    this.#generation = generation;
    await old.close().catch(() => undefined);
    await this.#files.unlink(`${this.#dir}/${journalName(generation - 1)}`).catch(() => undefined);
    this.#punch(trimmed);
  }

  async #load(): Promise<void> {
    const files = this.#files;
    const entries = await files.readdir(this.#dir);
    if (!entries.includes('format')) {
      // A pool whose creation was interrupted has no format file yet and no data: start over.
      const partial = (entry: string): boolean =>
        entry === 'lock' ||
        entry === 'layers' ||
        entry.startsWith('checkpoint') ||
        entry.startsWith('journal.') ||
        entry === 'format.tmp' ||
        entry === SIZE_PROBE;
      const layerFiles = entries.includes('layers') ? await files.readdir(this.#layersDir) : [];
      if (!entries.every(partial) || layerFiles.length > 0) {
        throw new OperationError('EINVAL', `${this.#dir} is not empty and holds no clonebd pool`);
      }
      await files.mkdir(this.#layersDir);
      await files.syncDir(this.#dir);
      this.#journal = await Journal.create(files, this.#dir, 0);
      await this.#checkpoint();
      await writeDurably(files, this.#dir, 'format', Buffer.from(FORMAT));
      await this.#refreshFree();
      return;
    }
    const format = (await readWhole(files, `${this.#dir}/format`)).toString();
    if (format !== FORMAT) {
      throw new OperationError('EINVAL', `${this.#dir} has pool format ${JSON.stringify(format.trim())}; expected ${FORMAT.trim()}`);
    }
    let meta: CheckpointMeta;
    let maps: BlockMap[];
    try {
      const decoded = decodeCheckpoint(await readWhole(files, `${this.#dir}/checkpoint`));
      meta = decoded.meta;
      maps = decodeMaps(decoded.nodes, meta.layers.map((layer) => layer.root));
    } catch (error) {
      throw new OperationError('EIO', `cannot read the pool checkpoint: ${(error as Error).message}`, { cause: error });
    }
    this.#generation = meta.generation;
    this.#nextLayerId = meta.nextLayerId;
    meta.layers.forEach((saved, i) => {
      this.#layers.set(saved.id, {
        id: saved.id,
        parent: null,
        map: maps[i]!,
        size: saved.size,
        blocks: saved.blocks,
        refs: 0,
        owner: null,
      });
      this.#usedBlocks += saved.blocks;
    });
    for (const saved of meta.layers) {
      if (saved.parent === null) continue;
      const parent = this.#layers.get(saved.parent)!;
      this.#layers.get(saved.id)!.parent = parent;
      parent.refs++;
    }
    for (const saved of meta.volumes) {
      this.#addVolume({ ...saved, labels: saved.labels ?? {} }, this.#layers.get(saved.layer)!);
    }
    const { journal, records } = await Journal.recover(files, this.#dir, this.#generation);
    this.#journal = journal;
    await files.mkdir(this.#layersDir);
    try {
      for (const record of records) this.#apply(record);
    } catch (error) {
      throw new OperationError('EIO', `cannot replay the pool journal: ${(error as Error).message}`, { cause: error });
    }
    for (const entry of await files.readdir(this.#layersDir)) {
      const id = /^[0-9a-f]{8}\.raw$/.test(entry) ? Number.parseInt(entry, 16) : NaN;
      if (this.#layers.has(id)) this.#onDisk.add(id);
      else await files.unlink(`${this.#layersDir}/${entry}`).catch(() => undefined);
    }
    for (const entry of entries) {
      if (entry.startsWith('journal.') && entry !== journalName(this.#generation)) {
        await files.unlink(`${this.#dir}/${entry}`).catch(() => undefined);
      }
    }
    await this.#refreshFree();
    this.#log?.info({ volumes: this.#volumes.size, layers: this.#layers.size, replayed: records.length }, 'pool opened');
    // A compaction cut short by a crash, or layers left by an older version, are folded now.
    this.#scheduleCompaction();
  }

  // ---- compaction ----------------------------------------------------------------------------

  /**
   * The frozen layers right above `head` that nothing but `head` uses (no snapshot names them, no
   * other layer descends from them), and the first ancestor past them that stays.
   */
  #foldable(head: Layer): { layers: Set<number>; kept: Layer } | undefined {
    const layers = new Set<number>();
    let at = head.parent;
    while (at !== null && at.parent !== null && at.refs === 1) {
      layers.add(at.id);
      at = at.parent;
    }
    return layers.size === 0 || at === null ? undefined : { layers, kept: at };
  }

  #scheduleCompaction(): void {
    if (this.#closed) return;
    if (this.#compacting !== undefined) {
      this.#compactAgain = true;
      return;
    }
    this.#compacting = (async () => {
      const failed = (error: unknown): false => {
        if (!this.#closed) this.#log?.warn({ err: error }, 'compaction failed; the layers stay');
        return false;
      };
      do {
        this.#compactAgain = false;
        const tried = new Set<Layer>();
        for (let next = this.#frozenFoldable(tried); next !== undefined; next = this.#frozenFoldable(tried)) {
          if (this.#closed) return;
          tried.add(next.layer);
          // A merge can make the surviving layer foldable again: look once more after this pass.
          if (await this.#compactPair(next.layer, next.child).catch(failed)) this.#compactAgain = true;
        }
        for (const volume of [...this.#volumes.values()]) {
          if (this.#closed) return;
          if (volume.kind !== 'volume' || volume.deleted) continue;
          await this.#fold(volume).catch(failed);
        }
      } while (this.#compactAgain);
    })().finally(() => (this.#compacting = undefined));
  }

  /** Folds the layers #foldable finds, step by step like flatten; gives up if the volume changes. */
  async #fold(volume: Volume): Promise<void> {
    const head = volume.layer;
    const plan = this.#foldable(head);
    if (plan === undefined) return;
    let cursor = 0;
    let freed: Layer[] | undefined;
    while (freed === undefined) {
      freed = await volume.gate.exclusive(async () => {
        if (this.#closed || volume.deleted || volume.layer !== head || this.#foldable(head)?.kept !== plan.kept) return [];
        let run: [number, number, number] | undefined;
        head.map.extents(cursor, Infinity, (start, end, value) => {
          if (!plan.layers.has(value)) return false;
          run = [start, Math.min(end, start + FLATTEN_STEP), value];
          return true;
        });
        if (run === undefined) return this.#record({ op: 'detach', name: volume.name, parent: plan.kept.id });
        const [start, end, value] = run;
        await this.#copyBlocks(head, start, end, this.#layers.get(value)!);
        cursor = end;
        return undefined;
      });
    }
    if (freed.length === 0) return;
    await this.flush();
    this.#removeInBackground(freed);
    this.#log?.debug({ volume: volume.name, layers: freed.map((layer) => layer.id) }, 'folded layers');
  }

  /** A frozen layer nothing names, with exactly one child, itself frozen. */
  #frozenFoldable(skip: ReadonlySet<Layer>): { layer: Layer; child: Layer } | undefined {
    const children = new Map<Layer, Layer[]>();
    for (const layer of this.#layers.values()) {
      if (layer.parent === null) continue;
      const siblings = children.get(layer.parent);
      if (siblings === undefined) children.set(layer.parent, [layer]);
      else siblings.push(layer);
    }
    for (const [layer, [child, ...others]] of children) {
      if (skip.has(layer) || others.length > 0 || child === undefined) continue;
      if (layer.refs === 1 && layer.owner === null && child.owner === null) return { layer, child };
    }
    return undefined;
  }

  #stillFrozenFoldable(layer: Layer, child: Layer): boolean {
    return this.#layers.get(layer.id) === layer && layer.refs === 1 && child.parent === layer && child.owner === null;
  }

  /** Volumes whose layer is `layer` or descends from it: those reading through its map. */
  #volumesUnder(layer: Layer): Volume[] {
    const under = (at: Layer | null): boolean => {
      for (; at !== null; at = at.parent) if (at === layer) return true;
      return false;
    };
    return [...this.#volumes.values()].filter((volume) => under(volume.layer)).sort((a, b) => (a.name < b.name ? -1 : 1));
  }

  /** Runs `fn` with every volume's gate held exclusive, taken in name order. */
  async #exclusiveAll<T>(volumes: readonly Volume[], fn: () => T | Promise<T>): Promise<T> {
    const [first, ...rest] = volumes;
    if (first === undefined) return fn();
    return first.gate.exclusive(() => this.#exclusiveAll(rest, fn));
  }

  /**
   * Merges `layer` and its only child by copying the fewer blocks: the child's own into `layer`
   * (absorb), or the blocks the child reads from `layer` into the child (fold). The root only
   * absorbs: it usually holds the bulk of the data.
   */
  #compactPair(layer: Layer, child: Layer): Promise<boolean> {
    const inherited = child.map.count(0, Infinity, layer.id);
    return layer.parent === null || child.blocks <= inherited ? this.#absorb(child, layer) : this.#foldFrozen(layer, child);
  }

  #stillAbsorbable(layer: Layer, parent: Layer): boolean {
    return (
      !this.#closed &&
      this.#layers.get(layer.id) === layer &&
      this.#layers.get(parent.id) === parent &&
      layer.parent === parent &&
      parent.refs === 1 &&
      layer.owner === null
    );
  }

  /** Absorbs frozen `layer` into its parent, which nothing else uses (see the design comment). */
  async #absorb(layer: Layer, parent: Layer): Promise<boolean> {
    // A punch still due in the parent's file could land where the child's blocks are copied.
    const punchDue = (): boolean => [...this.#trimmed, ...this.#punchable].some(([id]) => id === parent.id);
    if (punchDue()) await this.flush();
    while (this.#punching !== undefined) await this.#punching;
    if (punchDue()) return false;
    return this.#copyAndCommit({
      source: layer,
      target: parent,
      runs: runsHolding(layer.map, layer.id),
      readersOf: layer,
      valid: () => this.#stillAbsorbable(layer, parent),
      record: { op: 'absorb', layer: layer.id, into: parent.id },
      done: 'absorbed a frozen layer into its parent',
    });
  }

  /**
   * `parent` takes `layer`'s place: its map becomes `layer`'s, every map below reads `parent`
   * where it read `layer`, and `layer`'s children and names move to `parent`.
   */
  #applyAbsorb(layer: Layer, parent: Layer): Layer[] {
    const shared = new Map<MapNode, MapNode>();
    for (const at of this.#layers.values()) {
      let below = false;
      for (let up: Layer | null = at.parent; up !== null && !below; up = up.parent) below = up === layer;
      if (below) at.map = at.map.replaceValue(layer.id, parent.id, shared);
    }
    parent.map = layer.map.replaceValue(layer.id, parent.id, shared);
    parent.size = Math.max(parent.size, layer.size);
    const owned = parent.map.count(0, Infinity, parent.id);
    this.#usedBlocks += owned - parent.blocks - layer.blocks;
    parent.blocks = owned;
    // What the child trimmed or zeroed over the parent's blocks is garbage in the parent's file.
    layer.map.extents(0, Infinity, (start, end, value) => {
      if (value === ZERO) this.#trimmed.push([parent.id, start, end]);
    });
    for (const at of this.#layers.values()) {
      if (at.parent === layer) {
        at.parent = parent;
        parent.refs++;
      }
    }
    for (const volume of this.#volumes.values()) {
      if (volume.layer === layer) {
        volume.layer = parent;
        parent.refs++;
      }
    }
    parent.refs--;
    this.#layers.delete(layer.id);
    return [layer];
  }

  /** Folds frozen `layer` into its frozen only child (see the design comment). */
  #foldFrozen(layer: Layer, child: Layer): Promise<boolean> {
    return this.#copyAndCommit({
      source: layer,
      target: child,
      runs: runsHolding(child.map, layer.id),
      readersOf: child,
      valid: () => !this.#closed && this.#stillFrozenFoldable(layer, child),
      record: { op: 'fold', layer: layer.id, into: child.id },
      done: 'folded a frozen layer',
    });
  }

  /**
   * A fold's or an absorb's work: copies `runs` of blocks from `source`'s file into `target`'s
   * with no gate (both are frozen), then writes `record` with the gates of every volume reading
   * through `readersOf` held. False, and nothing recorded, once `valid` fails.
   */
  async #copyAndCommit(merge: {
    source: Layer;
    target: Layer;
    runs: ReadonlyArray<[number, number]>;
    readersOf: Layer;
    valid: () => boolean;
    record: MetaRecord;
    done: string;
  }): Promise<boolean> {
    const { source, target, runs, readersOf, valid, record } = merge;
    const startedAt = Date.now();
    for (const [start, end] of runs) {
      for (let at = start; at < end; at += FLATTEN_STEP) {
        if (!valid()) return false;
        const stop = Math.min(end, at + FLATTEN_STEP);
        const reserved = this.#reserve(stop - at);
        try {
          const buffer = Buffer.allocUnsafe((stop - at) * BLOCK_SIZE);
          await this.#readLayer(source, buffer, at * BLOCK_SIZE);
          // Checked again with no await before the target's file is opened: a target released
          // meanwhile has had its file removed, and opening it would create it anew.
          if (!valid()) return false;
          const handle = await this.#file(target, true);
          await handle.write(buffer, 0, buffer.length, at * BLOCK_SIZE);
          this.#dirty.add(target.id);
        } catch (error) {
          if (!valid()) return false;
          throw ioError(error, `copying blocks into layer ${target.id}`);
        } finally {
          this.#reservedBlocks -= reserved;
        }
      }
    }
    const copied = Date.now();
    // A copy made of a volume while this one copied adds a reader whose gate is not held yet:
    // take the gates again rather than throw the copying away.
    for (let attempt = 0; attempt < FOLD_GATE_ATTEMPTS; attempt++) {
      const readers = this.#volumesUnder(readersOf);
      const freed = await this.#exclusiveAll(readers, () => {
        if (!valid()) return [];
        const now = this.#volumesUnder(readersOf);
        if (now.length !== readers.length || now.some((volume, i) => volume !== readers[i])) return undefined;
        return this.#record(record);
      });
      if (freed === undefined) continue;
      if (freed.length === 0) return false;
      const held = Date.now();
      await this.flush();
      this.#removeInBackground(freed);
      this.#log?.debug(
        { layer: source.id, into: target.id, runs: runs.length, copyMs: copied - startedAt, commitMs: Date.now() - held },
        merge.done,
      );
      return true;
    }
    return false;
  }

  #removeInBackground(layers: Layer[]): void {
    const removing = (this.#removing ?? Promise.resolve())
      .then(() => this.#removeLayerFiles(layers))
      .finally(() => {
        if (this.#removing === removing) this.#removing = undefined;
      });
    this.#removing = removing;
  }

  /** Points every map at or below `child` that reads `layer` at `child`, and drops `layer`. */
  #applyFold(layer: Layer, child: Layer): Layer[] {
    const shared = new Map<MapNode, MapNode>();
    const remap = (map: BlockMap): BlockMap => map.replaceValue(layer.id, child.id, shared);
    for (const at of this.#layers.values()) {
      let below = false;
      for (let up: Layer | null = at; up !== null && !below; up = up.parent) below = up === child;
      if (!below) continue;
      if (at === child) {
        const before = at.map.count(0, Infinity, child.id);
        at.map = remap(at.map);
        const gained = at.map.count(0, Infinity, child.id) - before;
        child.blocks += gained;
        this.#usedBlocks += gained;
      } else {
        at.map = remap(at.map);
      }
    }
    const grandparent = layer.parent;
    if (grandparent !== null) grandparent.refs++;
    child.parent = grandparent;
    return this.#release(layer);
  }

  // ---- hole punching -------------------------------------------------------------------------

  #scheduleTrimCommit(): void {
    if (this.#trimCommitTimer !== undefined) return;
    this.#trimCommitTimer = setTimeout(() => {
      this.#trimCommitTimer = undefined;
      if (!this.#closed) this.flush().catch((error: unknown) => this.#log?.warn({ err: error }, 'background commit failed'));
    }, TRIM_COMMIT_DELAY_MS);
    this.#trimCommitTimer.unref();
  }

  #punch(ranges: Array<[number, number, number]>): void {
    if (ranges.length === 0) return;
    this.#punchable.push(...ranges);
    if (this.#punching !== undefined) return;
    this.#punching = (async () => {
      while (this.#punchable.length > 0) {
        const batch = this.#punchable;
        this.#punchable = [];
        const byLayer = new Map<number, Array<[number, number]>>();
        for (const [id, start, end] of batch) {
          const list = byLayer.get(id) ?? [];
          list.push([start, end]);
          byLayer.set(id, list);
        }
        for (const [id, list] of byLayer) {
          const layer = this.#layers.get(id);
          if (layer === undefined || !this.#onDisk.has(id)) continue;
          const punch = (): Promise<void> => this.#punchLayer(layer, list);
          await (layer.owner === null ? punch() : layer.owner.gate.exclusive(punch)).catch((error: unknown) =>
            this.#log?.warn({ err: error, layer: id }, 'hole punching failed'),
          );
        }
      }
    })().finally(() => (this.#punching = undefined));
  }

  /** Punches the parts of `ranges` the layer's map no longer points at itself. */
  async #punchLayer(layer: Layer, ranges: Array<[number, number]>): Promise<void> {
    ranges.sort((a, b) => a[0] - b[0]);
    const holes: Array<[number, number]> = [];
    for (const [start, end] of ranges) {
      layer.map.runs(start, end, (from, to, value) => {
        if (value === layer.id) return;
        const last = holes[holes.length - 1];
        if (last !== undefined && last[1] >= from) last[1] = Math.max(last[1], to);
        else holes.push([from, to]);
      });
    }
    const path = this.#layerPath(layer.id);
    for (const [from, to] of holes) {
      if (!this.#layers.has(layer.id)) return;
      const punched = await this.#files.punchHole(path, from * BLOCK_SIZE, (to - from) * BLOCK_SIZE);
      if (!punched) return;
    }
  }

  // ---- checks --------------------------------------------------------------------------------

  #describe(info: VolumeInfo): ExportDescription {
    return {
      name: info.name,
      size: info.size,
      readOnly: info.readOnly,
      description: info.kind === 'snapshot' ? `snapshot of ${info.parent ?? '(deleted)'}` : info.parent === null ? 'volume' : `clone of ${info.parent}`,
    };
  }

  #volume(name: string): Volume {
    const volume = this.#volumes.get(name);
    if (volume === undefined) throw new OperationError('ENOENT', `no volume or snapshot named ${JSON.stringify(name)}`);
    return volume;
  }

  #checkFree(name: string): void {
    if (this.#volumes.has(name)) throw new OperationError('EEXIST', `${name} already exists`);
  }

  #checkNotClosed(): void {
    if (this.#closed) throw new OperationError('ESHUTDOWN', 'pool is closed');
  }

  #checkOpen(volume: Volume): void {
    this.#checkNotClosed();
    if (volume.deleted) throw new OperationError('ENOENT', `${volume.name} was deleted`);
  }
}
