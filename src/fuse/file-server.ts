/**
 * A filesystem of one directory holding one regular file, `disk`, whose bytes are a BackingFile's:
 * what each decoded FUSE request means, and its reply. No I/O of its own (the channel reads and
 * writes /dev/fuse), so it runs in tests on plain buffers.
 *
 *   inode 1  /       (dr-xr-xr-x)  nothing can be created, renamed or removed in it
 *   inode 2  /disk   (-rw-------)  size = the backing file's size, read through to it
 *
 * Caching. Every OPEN answers FOPEN_DIRECT_IO: reads and writes bypass the kernel's page cache
 * and reach the backing file one request each, so a loop device over the file, the file read
 * directly, and the export itself never disagree, and growing the file leaves no stale pages.
 * Attributes are cached for ATTR_VALID_MS only, and are invalidated at once when the size
 * changes. The cost: nothing is cached at this layer, so a re-read goes to the export again (a
 * filesystem above keeps its own page cache; small random reads that bypass it run at the export's
 * round-trip rate).
 *
 * Durability. A WRITE is answered once the backing file has the bytes; FSYNC (which the kernel
 * sends for fsync/fdatasync, O_SYNC writes, and a loop device's flushes) is answered once the
 * backing file's flush returns. FLUSH (sent at close) is not a durability point and returns at once.
 *
 * The size only grows: SETATTR accepts the current size and nothing else; writes stay inside it.
 */
import {
  DT_DIR,
  DT_REG,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  FATTR_ATIME,
  FATTR_ATIME_NOW,
  FATTR_CTIME,
  FATTR_FH,
  FATTR_KILL_SUIDGID,
  FATTR_LOCKOWNER,
  FATTR_MTIME,
  FATTR_MTIME_NOW,
  FATTR_SIZE,
  FOPEN_DIRECT_IO,
  FUSE_ASYNC_DIO,
  FUSE_ASYNC_READ,
  FUSE_BIG_WRITES,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_MAX_PAGES,
  FUSE_MIN_KERNEL_MINOR,
  FUSE_ROOT_ID,
  O_ACCMODE,
  O_RDONLY,
  encodeAttr,
  encodeDirents,
  encodeEmpty,
  encodeEntry,
  encodeError,
  encodeInit,
  encodeInitVersionOnly,
  encodeOpen,
  encodeReplyHeader,
  encodeStatfs,
  encodeWrite,
  expectsReply,
  type Decoded,
  type DirEntry,
  type FuseAttr,
  type FuseHeader,
  type FuseRequest,
} from './protocol.js';

/** The bytes behind the file. Every method may reject with an error carrying an errno-style `code`. */
export interface BackingFile {
  readonly size: number;
  readonly readOnly: boolean;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  /** Makes every write answered so far durable. */
  flush(): Promise<void>;
  /** Zeroes a range; with `punch` the space may be released, without it stays allocated. */
  zero(offset: number, length: number, options: { punch: boolean }): Promise<void>;
}

export const FILE_NAME = 'disk';
export const FILE_INO = 2;
/** Largest READ or WRITE the kernel is told to send: 256 pages of 4 KiB. */
export const MAX_WRITE = 1 << 20;
const MAX_PAGES = MAX_WRITE / 4096;
/** Attribute and name cache lifetime in the kernel. */
export const ATTR_VALID_MS = 1000;
const BLOCK_SIZE = 4096;
const NAME_MAX = 255;
const INIT_FLAGS = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES;

/** Linux errno values, the only ones the server answers with. */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EACCES: 13,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENOSYS: 38,
  EPROTO: 71,
  EOPNOTSUPP: 95,
} as const;

/** A backing file's error `code` as the errno the kernel gets: a lost connection is an I/O error. */
function errnoOf(error: unknown): number {
  const code = typeof error === 'object' && error !== null && 'code' in error ? (error as { code: unknown }).code : undefined;
  switch (code) {
    case 'ENOSPC':
      return ERRNO.ENOSPC;
    case 'EPERM':
    case 'EROFS':
      return ERRNO.EROFS;
    case 'EINVAL':
      return ERRNO.EINVAL;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return ERRNO.EOPNOTSUPP;
    default:
      return ERRNO.EIO;
  }
}

export interface FileServerOptions {
  uid: number;
  gid: number;
  /** Called with each failed backing operation, for the log. */
  onError?: (op: string, error: unknown) => void;
}

/** What the channel does with one request: write `reply` (buffers in one write) unless undefined; stop after it if `end`. */
export interface Outcome {
  reply: Buffer[] | undefined;
  end: boolean;
}

const none: Outcome = { reply: undefined, end: false };

function answer(...buffers: Buffer[]): Outcome {
  return { reply: buffers, end: false };
}

function fail(header: FuseHeader, errno: number): Outcome {
  return answer(encodeError(header.unique, errno));
}

export class FileServer {
  readonly #backing: BackingFile;
  readonly #options: FileServerOptions;
  readonly #started = Math.floor(Date.now() / 1000);
  #initialised = false;

  constructor(backing: BackingFile, options: FileServerOptions) {
    this.#backing = backing;
    this.#options = options;
  }

  /** INIT has been answered: the kernel sends other requests from now on. */
  get initialised(): boolean {
    return this.#initialised;
  }

  #attr(ino: number): FuseAttr {
    const { uid, gid } = this.#options;
    if (ino === FUSE_ROOT_ID) {
      return { ino, size: 0, blocks: 0, time: this.#started, mode: 0o40555, nlink: 2, uid, gid, blksize: BLOCK_SIZE };
    }
    const size = this.#backing.size;
    const mode = this.#backing.readOnly ? 0o100400 : 0o100600;
    return { ino, size, blocks: Math.ceil(size / 512), time: this.#started, mode, nlink: 1, uid, gid, blksize: BLOCK_SIZE };
  }

  /** The reply to one decoded message. Never rejects: a failed operation is an errno reply. */
  async handle(decoded: Decoded): Promise<Outcome> {
    if (decoded.kind === 'malformed') {
      const header = decoded.header;
      return header === undefined || !expectsReply(header.opcode) ? none : fail(header, ERRNO.EINVAL);
    }
    const { header, request } = decoded;
    if (!this.#initialised && request.op !== 'init') return expectsReply(header.opcode) ? fail(header, ERRNO.EIO) : none;
    try {
      return await this.#dispatch(header, request);
    } catch (error) {
      this.#options.onError?.(request.op, error);
      return expectsReply(header.opcode) ? fail(header, errnoOf(error)) : none;
    }
  }

  async #dispatch(header: FuseHeader, request: FuseRequest): Promise<Outcome> {
    const { unique, nodeid } = header;
    const isRoot = nodeid === FUSE_ROOT_ID;
    const isFile = nodeid === FILE_INO;
    switch (request.op) {
      case 'init':
        return this.#init(header, request);
      case 'lookup':
        if (!isRoot) return fail(header, ERRNO.ENOTDIR);
        if (request.name.toString('latin1') !== FILE_NAME) return fail(header, ERRNO.ENOENT);
        return answer(encodeEntry(unique, this.#attr(FILE_INO), ATTR_VALID_MS));
      case 'forget':
      case 'interrupt':
        // One inode that lives as long as the mount; NBD requests cannot be called back.
        return none;
      case 'getattr':
        if (!isRoot && !isFile) return fail(header, ERRNO.ENOENT);
        return answer(encodeAttr(unique, this.#attr(nodeid), ATTR_VALID_MS));
      case 'setattr':
        return this.#setattr(header, request.valid, request.size);
      case 'open':
        if (isRoot) return fail(header, ERRNO.EISDIR);
        if (!isFile) return fail(header, ERRNO.ENOENT);
        if (this.#backing.readOnly && (request.flags & O_ACCMODE) !== O_RDONLY) return fail(header, ERRNO.EROFS);
        return answer(encodeOpen(unique, FOPEN_DIRECT_IO));
      case 'read':
        return this.#read(header, request.offset, request.size);
      case 'write':
        return this.#write(header, request.offset, request.data);
      case 'fsync':
        if (!this.#backing.readOnly) await this.#backing.flush();
        return answer(encodeEmpty(unique));
      case 'flush':
      case 'release':
      case 'releasedir':
        return answer(encodeEmpty(unique));
      case 'opendir':
        if (!isRoot) return fail(header, ERRNO.ENOTDIR);
        return answer(encodeOpen(unique, 0));
      case 'readdir':
        if (!isRoot) return fail(header, ERRNO.ENOTDIR);
        return answer(encodeDirents(unique, this.#entries(), request.offset, request.size));
      case 'statfs':
        return answer(
          encodeStatfs(unique, { blocks: Math.ceil(this.#backing.size / BLOCK_SIZE), files: 2, blockSize: BLOCK_SIZE, nameLength: NAME_MAX }),
        );
      case 'fallocate':
        return this.#fallocate(header, request.offset, request.length, request.mode);
      case 'access':
        if (!isRoot && !isFile) return fail(header, ERRNO.ENOENT);
        // W_OK is 2: nothing in a read-only export may be written.
        return (request.mask & 2) !== 0 && (isRoot || this.#backing.readOnly) ? fail(header, ERRNO.EACCES) : answer(encodeEmpty(unique));
      case 'destroy':
        return { reply: [encodeEmpty(unique)], end: true };
      case 'unsupported':
        return fail(header, ERRNO.ENOSYS);
    }
  }

  #init(header: FuseHeader, request: Extract<FuseRequest, { op: 'init' }>): Outcome {
    // A newer major is answered with ours, and the kernel asks again in our version.
    if (request.major > FUSE_KERNEL_VERSION) return answer(encodeInitVersionOnly(header.unique));
    if (request.major < FUSE_KERNEL_VERSION || request.minor < FUSE_MIN_KERNEL_MINOR) {
      return { reply: [encodeError(header.unique, ERRNO.EPROTO)], end: true };
    }
    this.#initialised = true;
    return answer(
      encodeInit(header.unique, {
        minor: Math.min(request.minor, FUSE_KERNEL_MINOR_VERSION),
        maxReadahead: request.maxReadahead,
        flags: request.flags & INIT_FLAGS,
        maxBackground: 16,
        congestionThreshold: 12,
        maxWrite: MAX_WRITE,
        maxPages: MAX_PAGES,
      }),
    );
  }

  #entries(): DirEntry[] {
    return [
      { ino: FUSE_ROOT_ID, name: '.', type: DT_DIR },
      { ino: FUSE_ROOT_ID, name: '..', type: DT_DIR },
      { ino: FILE_INO, name: FILE_NAME, type: DT_REG },
    ];
  }

  #setattr(header: FuseHeader, valid: number, size: number): Outcome {
    const { nodeid } = header;
    if (nodeid !== FUSE_ROOT_ID && nodeid !== FILE_INO) return fail(header, ERRNO.ENOENT);
    // Times are not kept (they read as the mount's start) and handles and lock owners mean
    // nothing here: those are accepted and dropped. Mode and owners cannot change.
    const harmless = FATTR_ATIME | FATTR_MTIME | FATTR_CTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_FH | FATTR_LOCKOWNER | FATTR_KILL_SUIDGID;
    if ((valid & ~(harmless | FATTR_SIZE)) !== 0) return fail(header, ERRNO.EPERM);
    if ((valid & FATTR_SIZE) !== 0 && (nodeid !== FILE_INO || size !== this.#backing.size)) return fail(header, ERRNO.EPERM);
    return answer(encodeAttr(header.unique, this.#attr(nodeid), ATTR_VALID_MS));
  }

  async #read(header: FuseHeader, offset: number, size: number): Promise<Outcome> {
    if (header.nodeid !== FILE_INO) return fail(header, header.nodeid === FUSE_ROOT_ID ? ERRNO.EISDIR : ERRNO.ENOENT);
    if (size > MAX_WRITE) return fail(header, ERRNO.EINVAL);
    // Like any regular file: a read at or past the end returns what there is, possibly nothing.
    const length = Math.max(0, Math.min(size, this.#backing.size - offset));
    if (length === 0) return answer(encodeReplyHeader(header.unique, 0));
    const data = await this.#backing.read(offset, length);
    return answer(encodeReplyHeader(header.unique, data.length), data);
  }

  async #write(header: FuseHeader, offset: number, data: Buffer): Promise<Outcome> {
    if (header.nodeid !== FILE_INO) return fail(header, header.nodeid === FUSE_ROOT_ID ? ERRNO.EISDIR : ERRNO.ENOENT);
    if (this.#backing.readOnly) return fail(header, ERRNO.EROFS);
    // The file cannot grow by writing: its size is the export's.
    if (offset + data.length > this.#backing.size) return fail(header, offset >= this.#backing.size ? ERRNO.ENOSPC : ERRNO.EFBIG);
    if (data.length > 0) await this.#backing.write(offset, data);
    return answer(encodeWrite(header.unique, data.length));
  }

  /**
   * A loop device turns discards into PUNCH_HOLE|KEEP_SIZE and write-zeroes into ZERO_RANGE (or
   * PUNCH_HOLE when it may unmap). Both must read back as zeros afterwards, which NBD_CMD_TRIM
   * does not promise: both become NBD_CMD_WRITE_ZEROES, a punch allowed to release the space.
   * Plain allocation inside the file has nothing to do; anything that would change the size is refused.
   */
  async #fallocate(header: FuseHeader, offset: number, length: number, mode: number): Promise<Outcome> {
    if (header.nodeid !== FILE_INO) return fail(header, header.nodeid === FUSE_ROOT_ID ? ERRNO.EISDIR : ERRNO.ENOENT);
    const size = this.#backing.size;
    const end = offset + length;
    const punch = mode === (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    const zero = (mode & ~FALLOC_FL_KEEP_SIZE) === FALLOC_FL_ZERO_RANGE;
    const allocate = (mode & ~FALLOC_FL_KEEP_SIZE) === 0;
    if (!punch && !zero && !allocate) return fail(header, ERRNO.EOPNOTSUPP);
    if (length === 0) return fail(header, ERRNO.EINVAL);
    if (end > size && (mode & FALLOC_FL_KEEP_SIZE) === 0) return fail(header, ERRNO.EFBIG);
    if (!allocate && this.#backing.readOnly) return fail(header, ERRNO.EROFS);
    const last = Math.min(end, size);
    if (!allocate && last > offset) await this.#backing.zero(offset, last - offset, { punch });
    return answer(encodeEmpty(header.unique));
  }
}
