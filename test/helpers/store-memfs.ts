/**
 * An in-memory FileLayer for store tests that models what survives a power loss.
 *
 * Each file keeps its durable bytes (as of its last fsync) and the operations since. Each
 * directory entry is durable once its directory is synced. crash() freezes the file system
 * (every later call fails with EIO, like a dead machine); recover() then builds what a reboot
 * would find: the durable names, each file's durable bytes, and every unsynced write, truncate
 * or punch either dropped, applied, or torn (a random subset of its 512-byte sectors applied).
 * `crashAfter` arms a crash on the Nth mutating call, so crashes land inside operations.
 */
import type { FileHandle, FileLayer, OpenMode } from '../../src/store/file-layer.js';
import { Pool, type PoolOptions } from '../../src/store/index.js';

type PendingOp =
  | { kind: 'write'; position: number; bytes: Buffer }
  | { kind: 'truncate'; size: number }
  | { kind: 'punch'; position: number; length: number };

class Inode {
  data: Buffer = Buffer.alloc(0);
  durable: Buffer = Buffer.alloc(0);
  pending: PendingOp[] = [];

  apply(op: PendingOp, target: Buffer): Buffer {
    if (op.kind === 'truncate') {
      const out = Buffer.alloc(op.size);
      target.copy(out, 0, 0, Math.min(op.size, target.length));
      return out;
    }
    const end = op.position + (op.kind === 'write' ? op.bytes.length : op.length);
    let out = target;
    if (op.kind === 'write' && end > target.length) {
      out = Buffer.alloc(end);
      target.copy(out);
    }
    if (op.kind === 'write') op.bytes.copy(out, op.position);
    else out.fill(0, op.position, Math.min(end, out.length));
    return out;
  }
}

function errno(code: string, message: string): NodeJS.ErrnoException {
  const error: NodeJS.ErrnoException = new Error(`${code}: ${message}`);
  error.code = code;
  return error;
}

function parentOf(path: string): string {
  const slash = path.lastIndexOf('/');
  return slash <= 0 ? '/' : path.slice(0, slash);
}

/** A small deterministic generator, so a failing seed replays exactly. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x100000000;
  };
}

export class MemoryFiles implements FileLayer {
  #names = new Map<string, Inode>();
  #durableNames = new Map<string, Inode>();
  readonly #dirs = new Set<string>(['/']);
  #epoch = 0;
  #crashed = false;
  #countdown = Infinity;
  /** Mutating calls so far; useful to pick crash points. */
  mutations = 0;

  /** Crash on the nth mutating call from now (the call itself fails and does nothing). */
  crashAfter(n: number): void {
    this.#countdown = n;
  }

  get crashed(): boolean {
    return this.#crashed;
  }

  crash(): void {
    this.#crashed = true;
  }

  /** The machine comes back: see the class comment. Handles from before are dead. */
  recover(random: () => number): void {
    const names = new Map<string, Inode>();
    for (const [path, inode] of this.#durableNames) {
      let data = inode.durable;
      for (const op of inode.pending) {
        const roll = random();
        if (roll < 1 / 3) continue;
        if (roll < 2 / 3 || op.kind === 'truncate') {
          data = inode.apply(op, data);
          continue;
        }
        const start = op.position;
        const length = op.kind === 'write' ? op.bytes.length : op.length;
        for (let sector = 0; sector < length; sector += 512) {
          if (random() < 0.5) continue;
          const piece: PendingOp =
            op.kind === 'write'
              ? { kind: 'write', position: start + sector, bytes: op.bytes.subarray(sector, sector + 512) }
              : { kind: 'punch', position: start + sector, length: Math.min(512, length - sector) };
          data = inode.apply(piece, data);
        }
      }
      const fresh = new Inode();
      fresh.data = Buffer.from(data);
      fresh.durable = Buffer.from(data);
      names.set(path, fresh);
    }
    this.#names = names;
    this.#durableNames = new Map(names);
    this.#crashed = false;
    this.#countdown = Infinity;
    this.#epoch++;
  }

  /** Test access: remove a file without going through a pool (e.g. a dead process's lock). */
  remove(path: string): void {
    this.#names.delete(path);
    this.#durableNames.delete(path);
  }

  exists(path: string): boolean {
    return this.#names.has(path);
  }

  #mutate(): void {
    this.#alive();
    this.mutations++;
    if (--this.#countdown <= 0) {
      this.#crashed = true;
      throw errno('EIO', 'simulated crash');
    }
  }

  #alive(): void {
    if (this.#crashed) throw errno('EIO', 'simulated crash');
  }

  async open(path: string, mode: OpenMode): Promise<FileHandle> {
    this.#alive();
    if (!this.#dirs.has(parentOf(path))) throw errno('ENOENT', path);
    let inode = this.#names.get(path);
    if (inode !== undefined && mode === 'createExclusive') throw errno('EEXIST', path);
    if (inode === undefined) {
      if (mode === 'read' || mode === 'readWrite') throw errno('ENOENT', path);
      this.#mutate();
      inode = new Inode();
      this.#names.set(path, inode);
    }
    return this.#handle(inode, mode === 'read');
  }

  #handle(inode: Inode, readOnly: boolean): FileHandle {
    const epoch = this.#epoch;
    let closed = false;
    const live = (): void => {
      if (closed || epoch !== this.#epoch) throw errno('EBADF', 'stale handle');
      this.#alive();
    };
    const change = (op: PendingOp): void => {
      live();
      if (readOnly) throw errno('EBADF', 'read-only handle');
      this.#mutate();
      inode.data = inode.apply(op, inode.data);
      inode.pending.push(op);
    };
    return {
      read: async (buffer, offset, length, position) => {
        live();
        const available = Math.max(0, Math.min(length, inode.data.length - position));
        inode.data.copy(buffer, offset, position, position + available);
        return available;
      },
      // Memory has no cache to warm; a stale handle still fails as a read would.
      prefetch: async () => live(),
      write: async (buffer, offset, length, position) => {
        change({ kind: 'write', position, bytes: Buffer.from(buffer.subarray(offset, offset + length)) });
      },
      truncate: async (size) => change({ kind: 'truncate', size }),
      sync: async () => {
        live();
        this.#mutate();
        inode.durable = Buffer.from(inode.data);
        inode.pending = [];
      },
      size: async () => {
        live();
        return inode.data.length;
      },
      close: async () => {
        closed = true;
      },
    };
  }

  async rename(from: string, to: string): Promise<void> {
    this.#mutate();
    const inode = this.#names.get(from);
    if (inode === undefined) throw errno('ENOENT', from);
    this.#names.delete(from);
    this.#names.set(to, inode);
  }

  async unlink(path: string): Promise<void> {
    this.#mutate();
    if (!this.#names.delete(path)) throw errno('ENOENT', path);
  }

  async mkdir(path: string): Promise<void> {
    this.#alive();
    for (let at = path; at !== '/' && !this.#dirs.has(at); at = parentOf(at)) this.#dirs.add(at);
  }

  async readdir(path: string): Promise<string[]> {
    this.#alive();
    if (!this.#dirs.has(path)) throw errno('ENOENT', path);
    const prefix = path === '/' ? '/' : `${path}/`;
    const out = new Set<string>();
    for (const name of [...this.#names.keys(), ...this.#dirs]) {
      if (name.startsWith(prefix) && name.length > prefix.length) out.add(name.slice(prefix.length).split('/')[0]!);
    }
    return [...out].sort();
  }

  async syncDir(path: string): Promise<void> {
    this.#mutate();
    const inDir = (name: string): boolean => parentOf(name) === path;
    for (const name of [...this.#durableNames.keys()]) {
      if (inDir(name) && this.#names.get(name) !== this.#durableNames.get(name)) this.#durableNames.delete(name);
    }
    for (const [name, inode] of this.#names) if (inDir(name)) this.#durableNames.set(name, inode);
  }

  async punchHole(path: string, offset: number, length: number): Promise<boolean> {
    const inode = this.#names.get(path);
    if (inode === undefined) throw errno('ENOENT', path);
    this.#mutate();
    const op: PendingOp = { kind: 'punch', position: offset, length };
    inode.data = inode.apply(op, inode.data);
    inode.pending.push(op);
    return true;
  }

  async freeBytes(): Promise<number> {
    this.#alive();
    return 2 ** 40;
  }

  /** What largestFile reports, as a file system with a file size limit would. */
  largestFileSize = Infinity;

  async largestFile(_path: string, limit: number): Promise<number> {
    this.#alive();
    return Math.min(limit, this.largestFileSize);
  }
}

/**
 * Cuts the power under `pool` (open at `dir` on `files`), reboots the file system with unsynced
 * writes dropped or torn as `seed` decides, and opens the pool again as a restarted process
 * would: the crashed process is gone, so its lock is stale.
 */
export async function crashAndReopen(files: MemoryFiles, pool: Pool, dir: string, seed: number, options: PoolOptions = {}): Promise<Pool> {
  files.crash();
  await pool.close().catch(() => undefined);
  files.recover(rng(seed));
  files.remove(`${dir}/lock`);
  return Pool.open(dir, { ...options, files });
}
