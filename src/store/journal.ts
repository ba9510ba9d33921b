/**
 * Metadata durability: an append-only journal plus checkpoints.
 *
 *   pool/checkpoint       full metadata at generation G (volumes, layers, the shared map nodes)
 *   pool/journal.G        records since that checkpoint, each framed as
 *                         [u32 payload length][u32 crc32(payload)][payload]
 *
 * Records are buffered in memory and written by commit(), which the pool calls after syncing
 * the data files the records point at; one write + one fsync per commit, however many records.
 * Recovery reads frames until the first that is short, zero or fails its checksum (a torn tail
 * from a crash), truncates the file there, and replays what came before.
 *
 * A checkpoint is written to checkpoint.tmp, fsynced, renamed over checkpoint and the directory
 * fsynced; only then does journal.G+1 start and journal.G go. A crash in between leaves either
 * the old checkpoint with its complete journal, or the new one with an empty or missing journal.
 */
import { crc32 } from './crc32.js';
import type { FileHandle, FileLayer } from './file-layer.js';
import type { Labels } from './names.js';

export type MetaRecord =
  | { op: 'assign'; layer: number; start: number; end: number; value: number }
  | { op: 'create'; name: string; size: number; head: number; createdAt: string; labels?: Labels }
  /** `head`: the source's new head, or null when its head was unchanged and is not frozen. */
  | { op: 'snapshot'; source: string; name: string; head: number | null; createdAt: string; labels?: Labels }
  | {
      op: 'clone';
      source: string;
      name: string;
      size: number;
      head: number;
      sourceHead: number | null;
      createdAt: string;
      labels?: Labels;
    }
  | { op: 'grow'; name: string; size: number }
  | { op: 'delete'; name: string }
  /**
   * Flatten or compaction finished: the volume's head takes `parent` as its parent (null: no
   * ancestors; absent in older journals: null), dropping the layers in between.
   */
  | { op: 'detach'; name: string; parent?: number | null }
  /** Compaction: frozen `layer` is folded into its only child `into` (see pool.ts). */
  | { op: 'fold'; layer: number; into: number }
  /** Compaction: frozen `layer` is absorbed into its parent `into`, which takes its place. */
  | { op: 'absorb'; layer: number; into: number };

const ASSIGN = 1;
const JSON_RECORD = 2;
const FRAME_HEADER = 8;
const JOURNAL_MAGIC = Buffer.from('CBDJRNL1');
const JOURNAL_HEADER = 16;
const CHECKPOINT_MAGIC = Buffer.from('CBDCKPT1');

const ASSIGN_PAYLOAD = 1 + 4 + 8 + 8 + 4;

/** Records other than block assignments are stored as JSON. */
function jsonOf(record: MetaRecord): string | undefined {
  return record.op === 'assign' ? undefined : JSON.stringify(record);
}

function frameLength(json: string | undefined): number {
  return FRAME_HEADER + (json === undefined ? ASSIGN_PAYLOAD : 1 + Buffer.byteLength(json));
}

/** Writes the frame of `record` at `at`; `target` must have frameLength(json) bytes there. */
function writeFrame(record: MetaRecord, json: string | undefined, target: Buffer, at: number): number {
  const payload = at + FRAME_HEADER;
  let end: number;
  if (record.op === 'assign') {
    target.writeUInt8(ASSIGN, payload);
    target.writeUInt32LE(record.layer, payload + 1);
    target.writeDoubleLE(record.start, payload + 5);
    target.writeDoubleLE(record.end, payload + 13);
    target.writeUInt32LE(record.value, payload + 21);
    end = payload + ASSIGN_PAYLOAD;
  } else {
    target.writeUInt8(JSON_RECORD, payload);
    end = payload + 1 + target.write(json!, payload + 1);
  }
  target.writeUInt32LE(end - payload, at);
  target.writeUInt32LE(crc32(target, payload, end), at + 4);
  return end;
}

function decodePayload(payload: Buffer): MetaRecord {
  if (payload[0] === ASSIGN && payload.length === 25) {
    return {
      op: 'assign',
      layer: payload.readUInt32LE(1),
      start: payload.readDoubleLE(5),
      end: payload.readDoubleLE(13),
      value: payload.readUInt32LE(21),
    };
  }
  if (payload[0] === JSON_RECORD) return JSON.parse(payload.subarray(1).toString()) as MetaRecord;
  throw new Error(`unknown journal record type ${payload[0]}`);
}

/** Decodes frames up to the first damaged one; `valid` is the byte length of the good prefix. */
export function decodeRecords(bytes: Buffer, from: number): { records: MetaRecord[]; valid: number } {
  const records: MetaRecord[] = [];
  let at = from;
  while (at + FRAME_HEADER <= bytes.length) {
    const length = bytes.readUInt32LE(at);
    if (length === 0 || at + FRAME_HEADER + length > bytes.length) break;
    const payload = bytes.subarray(at + FRAME_HEADER, at + FRAME_HEADER + length);
    if (crc32(payload) !== bytes.readUInt32LE(at + 4)) break;
    records.push(decodePayload(payload));
    at += FRAME_HEADER + length;
  }
  return { records, valid: at };
}

export async function readWhole(files: FileLayer, path: string): Promise<Buffer> {
  const handle = await files.open(path, 'read');
  try {
    const size = await handle.size();
    const buffer = Buffer.alloc(size);
    const read = await handle.read(buffer, 0, size, 0);
    return buffer.subarray(0, read);
  } finally {
    await handle.close();
  }
}

/** Writes a file completely and durably under `path` via a temporary name. */
export async function writeDurably(files: FileLayer, dir: string, name: string, data: Buffer): Promise<void> {
  const tmp = `${dir}/${name}.tmp`;
  const handle = await files.open(tmp, 'create');
  try {
    await handle.truncate(0);
    await handle.write(data, 0, data.length, 0);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await files.rename(tmp, `${dir}/${name}`);
  await files.syncDir(dir);
}

export function journalName(generation: number): string {
  return `journal.${generation}`;
}

/**
 * Records waiting for a commit are framed back to back in chunks: a record costs its frame's
 * bytes (33 for a block assignment), not an object and a Buffer of its own. Chunks start small
 * after each commit, since a client flushing after every write commits a record at a time.
 */
const FIRST_CHUNK_BYTES = 512;
const LARGEST_CHUNK_BYTES = 64 * 1024;

/** An open journal file: appends buffered records on commit. */
export class Journal {
  readonly #handle: FileHandle;
  #end: number;
  /** Filled runs of frames, oldest first; the last chunk being filled is #tail. */
  #sealed: Buffer[] = [];
  #tail: Buffer | undefined;
  #tailUsed = 0;
  #nextChunkBytes = FIRST_CHUNK_BYTES;
  #pendingBytes = 0;

  private constructor(handle: FileHandle, end: number) {
    this.#handle = handle;
    this.#end = end;
  }

  /** Starts an empty journal for `generation`, durably. */
  static async create(files: FileLayer, dir: string, generation: number): Promise<Journal> {
    const handle = await files.open(`${dir}/${journalName(generation)}`, 'create');
    const header = Buffer.alloc(JOURNAL_HEADER);
    JOURNAL_MAGIC.copy(header, 0);
    header.writeUInt32LE(generation, 8);
    await handle.truncate(0);
    await handle.write(header, 0, header.length, 0);
    await handle.sync();
    await files.syncDir(dir);
    return new Journal(handle, JOURNAL_HEADER);
  }

  /**
   * Opens the journal of `generation` and returns its intact records, cutting off a torn tail.
   * A missing journal (a crash right after its checkpoint) is created empty.
   */
  static async recover(
    files: FileLayer,
    dir: string,
    generation: number,
  ): Promise<{ journal: Journal; records: MetaRecord[] }> {
    const path = `${dir}/${journalName(generation)}`;
    let bytes: Buffer;
    try {
      bytes = await readWhole(files, path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      return { journal: await Journal.create(files, dir, generation), records: [] };
    }
    if (
      bytes.length < JOURNAL_HEADER ||
      !bytes.subarray(0, 8).equals(JOURNAL_MAGIC) ||
      bytes.readUInt32LE(8) !== generation
    ) {
      return { journal: await Journal.create(files, dir, generation), records: [] };
    }
    const { records, valid } = decodeRecords(bytes, JOURNAL_HEADER);
    const handle = await files.open(path, 'readWrite');
    if (valid < bytes.length) {
      await handle.truncate(valid);
      await handle.sync();
    }
    return { journal: new Journal(handle, valid), records };
  }

  get size(): number {
    return this.#end + this.#pendingBytes;
  }

  /** Bytes of records appended and not yet taken for writing. */
  get pendingBytes(): number {
    return this.#pendingBytes;
  }

  append(record: MetaRecord): void {
    const json = jsonOf(record);
    const length = frameLength(json);
    if (this.#tail === undefined || this.#tailUsed + length > this.#tail.length) {
      this.#seal();
      this.#tail = Buffer.allocUnsafe(Math.max(this.#nextChunkBytes, length));
      this.#nextChunkBytes = Math.min(this.#nextChunkBytes * 4, LARGEST_CHUNK_BYTES);
    }
    this.#tailUsed = writeFrame(record, json, this.#tail, this.#tailUsed);
    this.#pendingBytes += length;
  }

  /**
   * Takes the buffered records as runs of whole frames; the caller writes them with `write` or
   * puts them back.
   */
  take(): Buffer[] {
    this.#seal();
    const taken = this.#sealed;
    this.#sealed = [];
    this.#pendingBytes = 0;
    this.#nextChunkBytes = FIRST_CHUNK_BYTES;
    return taken;
  }

  putBack(frames: Buffer[]): void {
    this.#seal();
    this.#sealed = frames.concat(this.#sealed);
    this.#pendingBytes = this.#sealed.reduce((sum, run) => sum + run.length, 0);
  }

  /** Ends the tail chunk: what it holds may be handed out, so later frames go to a new one. */
  #seal(): void {
    if (this.#tail !== undefined && this.#tailUsed > 0) this.#sealed.push(this.#tail.subarray(0, this.#tailUsed));
    this.#tail = undefined;
    this.#tailUsed = 0;
  }

  /** Appends frames and fsyncs. */
  async write(frames: Buffer[]): Promise<void> {
    if (frames.length === 0) return;
    const data = frames.length === 1 ? frames[0]! : Buffer.concat(frames);
    await this.#handle.write(data, 0, data.length, this.#end);
    await this.#handle.sync();
    this.#end += data.length;
  }

  close(): Promise<void> {
    return this.#handle.close();
  }
}

export interface CheckpointLayer {
  id: number;
  parent: number | null;
  size: number;
  blocks: number;
  /** Index into the encoded map nodes, -1 for an empty map. */
  root: number;
}

export interface CheckpointVolume {
  name: string;
  kind: 'volume' | 'snapshot';
  size: number;
  layer: number;
  parent: string | null;
  createdAt: string;
  labels?: Labels;
}

export interface CheckpointMeta {
  generation: number;
  nextLayerId: number;
  layers: CheckpointLayer[];
  volumes: CheckpointVolume[];
}

/** checkpoint = magic, u32 json length, json, map nodes, u32 crc32 of everything before. */
export function encodeCheckpoint(meta: CheckpointMeta, nodes: Buffer): Buffer {
  const json = Buffer.from(JSON.stringify(meta));
  const out = Buffer.allocUnsafe(8 + 4 + json.length + nodes.length + 4);
  CHECKPOINT_MAGIC.copy(out, 0);
  out.writeUInt32LE(json.length, 8);
  json.copy(out, 12);
  nodes.copy(out, 12 + json.length);
  out.writeUInt32LE(crc32(out, 0, out.length - 4), out.length - 4);
  return out;
}

export function decodeCheckpoint(bytes: Buffer): { meta: CheckpointMeta; nodes: Buffer } {
  if (
    bytes.length < 16 ||
    !bytes.subarray(0, 8).equals(CHECKPOINT_MAGIC) ||
    crc32(bytes, 0, bytes.length - 4) !== bytes.readUInt32LE(bytes.length - 4)
  ) {
    throw new Error('checkpoint is damaged');
  }
  const jsonLength = bytes.readUInt32LE(8);
  const meta = JSON.parse(bytes.subarray(12, 12 + jsonLength).toString()) as CheckpointMeta;
  return { meta, nodes: bytes.subarray(12 + jsonLength, bytes.length - 4) };
}
