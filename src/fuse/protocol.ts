/**
 * The kernel FUSE protocol (7.x, as in Linux's include/uapi/linux/fuse.h), the few messages a
 * one-file filesystem needs: sans-IO, pure functions over Buffers.
 *
 *   kernel ── read(/dev/fuse) ──▶ [in_header 40 B][op body]         decodeRequest
 *   kernel ◀── write(/dev/fuse) ── [out_header 16 B][reply body]     encode*
 *   kernel ◀── write(/dev/fuse) ── [out_header unique=0, error=code][notify body]
 *
 * Everything is little-endian (FUSE runs on the host it serves). Decoding never throws: a request
 * the kernel could not have sent (too short, a length that disagrees with the bytes read, a body
 * shorter than its struct, a name without NUL) decodes as `malformed`, with the header when there
 * was one so that the request can still be answered with an error. Unknown opcodes decode as
 * `unsupported` (answered ENOSYS). 64-bit offsets are read as two u32 halves; one past 2^53 decodes
 * as OFFSET_BEYOND (2^53), which is past the end of any file this server can serve, so it reads as
 * end of file and writes as out of space without a BigInt on the hot path.
 */

export const FUSE_KERNEL_VERSION = 7;
/** The minor version we speak: 7.28 brought max_pages; nothing newer is used. */
export const FUSE_KERNEL_MINOR_VERSION = 31;
/** The oldest kernel minor we accept: 7.23 fixed fuse_init_out at 64 bytes. */
export const FUSE_MIN_KERNEL_MINOR = 23;
export const FUSE_ROOT_ID = 1;

export const FUSE_LOOKUP = 1;
export const FUSE_FORGET = 2;
export const FUSE_GETATTR = 3;
export const FUSE_SETATTR = 4;
export const FUSE_OPEN = 14;
export const FUSE_READ = 15;
export const FUSE_WRITE = 16;
export const FUSE_STATFS = 17;
export const FUSE_RELEASE = 18;
export const FUSE_FSYNC = 20;
export const FUSE_FLUSH = 25;
export const FUSE_INIT = 26;
export const FUSE_OPENDIR = 27;
export const FUSE_READDIR = 28;
export const FUSE_RELEASEDIR = 29;
export const FUSE_ACCESS = 34;
export const FUSE_INTERRUPT = 36;
export const FUSE_DESTROY = 38;
export const FUSE_BATCH_FORGET = 42;
export const FUSE_FALLOCATE = 43;

/** fuse_notify_code */
export const FUSE_NOTIFY_INVAL_INODE = 2;

/** INIT flags */
export const FUSE_ASYNC_READ = 1 << 0;
export const FUSE_BIG_WRITES = 1 << 5;
export const FUSE_ASYNC_DIO = 1 << 15;
export const FUSE_MAX_PAGES = 1 << 22;

/** fuse_open_out.open_flags */
export const FOPEN_DIRECT_IO = 1 << 0;

/** fuse_setattr_in.valid: the bits the server accepts (MODE, UID and GID, bits 0-2, it refuses). */
export const FATTR_SIZE = 1 << 3;
export const FATTR_ATIME = 1 << 4;
export const FATTR_MTIME = 1 << 5;
export const FATTR_FH = 1 << 6;
export const FATTR_ATIME_NOW = 1 << 7;
export const FATTR_MTIME_NOW = 1 << 8;
export const FATTR_LOCKOWNER = 1 << 9;
export const FATTR_CTIME = 1 << 10;
export const FATTR_KILL_SUIDGID = 1 << 11;

/** fallocate(2) modes, from linux/falloc.h. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** open(2) access modes. */
export const O_ACCMODE = 0o3;
export const O_RDONLY = 0o0;

/** d_type values for READDIR. */
export const DT_DIR = 4;
export const DT_REG = 8;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
export const INIT_OUT_SIZE = 64;
export const OPEN_OUT_SIZE = 16;
export const WRITE_OUT_SIZE = 8;
export const STATFS_OUT_SIZE = 80;
export const NOTIFY_INVAL_INODE_SIZE = 24;
const DIRENT_NAME_OFFSET = 24;

/** What any 64-bit offset at or past 2^53 decodes to. */
export const OFFSET_BEYOND = 2 ** 53;

const INIT_IN_MIN = 16;
const SETATTR_IN_SIZE = 88;
const OPEN_IN_SIZE = 8;
const READ_IN_SIZE = 40;
const WRITE_IN_SIZE = 40;
const FSYNC_IN_SIZE = 16;
const FALLOCATE_IN_SIZE = 32;
const INTERRUPT_IN_SIZE = 8;
const ACCESS_IN_SIZE = 8;
const BATCH_FORGET_IN_SIZE = 8;
const FORGET_ONE_SIZE = 16;

export interface FuseHeader {
  /** Total request length, header included. */
  length: number;
  opcode: number;
  unique: bigint;
  /** The inode the request is about; OFFSET_BEYOND when it does not fit in 53 bits (never ours). */
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
}

export type FuseRequest =
  | { op: 'init'; major: number; minor: number; maxReadahead: number; flags: number }
  | { op: 'lookup'; name: Buffer }
  | { op: 'forget' }
  | { op: 'getattr' }
  | {
      op: 'setattr';
      valid: number;
      /** Meaningful when `valid` has FATTR_SIZE. */
      size: number;
    }
  | { op: 'open'; flags: number }
  | { op: 'read'; offset: number; size: number }
  | { op: 'write'; offset: number; data: Buffer }
  | { op: 'flush' }
  | { op: 'fsync' }
  | { op: 'release' }
  | { op: 'opendir'; flags: number }
  | { op: 'readdir'; offset: number; size: number }
  | { op: 'releasedir' }
  | { op: 'statfs' }
  | { op: 'fallocate'; offset: number; length: number; mode: number }
  | { op: 'interrupt' }
  | { op: 'destroy' }
  | { op: 'access'; mask: number }
  | { op: 'unsupported' };

export type Decoded =
  | { kind: 'request'; header: FuseHeader; request: FuseRequest }
  | { kind: 'malformed'; header: FuseHeader | undefined; reason: string };

/** Opcodes the kernel expects no reply to. */
const NO_REPLY = new Set([FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT]);

export function expectsReply(opcode: number): boolean {
  return !NO_REPLY.has(opcode);
}

/** A u64 at `at` as a number, or OFFSET_BEYOND when it is 2^53 or more. */
function readU64(buffer: Buffer, at: number): number {
  const high = buffer.readUInt32LE(at + 4);
  if (high >= 2 ** 21) return OFFSET_BEYOND;
  return high * 2 ** 32 + buffer.readUInt32LE(at);
}

function decodeHeader(message: Buffer): FuseHeader {
  return {
    length: message.readUInt32LE(0),
    opcode: message.readUInt32LE(4),
    unique: message.readBigUInt64LE(8),
    nodeid: readU64(message, 16),
    uid: message.readUInt32LE(24),
    gid: message.readUInt32LE(28),
    pid: message.readUInt32LE(32),
  };
}

/** Decodes one message as read from /dev/fuse (exactly the bytes one read returned). */
export function decodeRequest(message: Buffer): Decoded {
  if (message.length < IN_HEADER_SIZE) {
    return { kind: 'malformed', header: undefined, reason: `${message.length} bytes is shorter than a request header` };
  }
  const header = decodeHeader(message);
  if (header.length !== message.length) {
    return { kind: 'malformed', header, reason: `header says ${header.length} bytes, ${message.length} were read` };
  }
  const body = message.subarray(IN_HEADER_SIZE);
  const request = decodeBody(header.opcode, body);
  if (typeof request === 'string') return { kind: 'malformed', header, reason: request };
  return { kind: 'request', header, request };
}

/** The body of one opcode, or why it cannot be one. */
function decodeBody(opcode: number, body: Buffer): FuseRequest | string {
  const need = (size: number, name: string): string | undefined =>
    body.length < size ? `${name} body of ${body.length} bytes, ${size} needed` : undefined;
  switch (opcode) {
    case FUSE_INIT:
      return (
        need(INIT_IN_MIN, 'INIT') ?? {
          op: 'init',
          major: body.readUInt32LE(0),
          minor: body.readUInt32LE(4),
          maxReadahead: body.readUInt32LE(8),
          flags: body.readUInt32LE(12),
        }
      );
    case FUSE_LOOKUP: {
      const end = body.indexOf(0);
      if (end < 0) return 'LOOKUP name without NUL';
      return { op: 'lookup', name: body.subarray(0, end) };
    }
    case FUSE_FORGET:
      return { op: 'forget' };
    case FUSE_BATCH_FORGET: {
      const short = need(BATCH_FORGET_IN_SIZE, 'BATCH_FORGET');
      if (short !== undefined) return short;
      const count = body.readUInt32LE(0);
      if (body.length < BATCH_FORGET_IN_SIZE + count * FORGET_ONE_SIZE) return `BATCH_FORGET of ${count} entries in ${body.length} bytes`;
      return { op: 'forget' };
    }
    case FUSE_GETATTR:
      return { op: 'getattr' };
    case FUSE_SETATTR:
      return need(SETATTR_IN_SIZE, 'SETATTR') ?? { op: 'setattr', valid: body.readUInt32LE(0), size: readU64(body, 16) };
    case FUSE_OPEN:
      return need(OPEN_IN_SIZE, 'OPEN') ?? { op: 'open', flags: body.readUInt32LE(0) };
    case FUSE_OPENDIR:
      return need(OPEN_IN_SIZE, 'OPENDIR') ?? { op: 'opendir', flags: body.readUInt32LE(0) };
    case FUSE_READ:
      return need(READ_IN_SIZE, 'READ') ?? { op: 'read', offset: readU64(body, 8), size: body.readUInt32LE(16) };
    case FUSE_READDIR:
      return need(READ_IN_SIZE, 'READDIR') ?? { op: 'readdir', offset: readU64(body, 8), size: body.readUInt32LE(16) };
    case FUSE_WRITE: {
      const short = need(WRITE_IN_SIZE, 'WRITE');
      if (short !== undefined) return short;
      const size = body.readUInt32LE(16);
      if (body.length - WRITE_IN_SIZE !== size) return `WRITE of ${size} bytes carries ${body.length - WRITE_IN_SIZE}`;
      return { op: 'write', offset: readU64(body, 8), data: body.subarray(WRITE_IN_SIZE) };
    }
    case FUSE_FLUSH:
      return { op: 'flush' };
    case FUSE_FSYNC:
      return need(FSYNC_IN_SIZE, 'FSYNC') ?? { op: 'fsync' };
    case FUSE_RELEASE:
      return { op: 'release' };
    case FUSE_RELEASEDIR:
      return { op: 'releasedir' };
    case FUSE_STATFS:
      return { op: 'statfs' };
    case FUSE_FALLOCATE:
      return (
        need(FALLOCATE_IN_SIZE, 'FALLOCATE') ?? {
          op: 'fallocate',
          offset: readU64(body, 8),
          length: readU64(body, 16),
          mode: body.readUInt32LE(24),
        }
      );
    case FUSE_INTERRUPT:
      return need(INTERRUPT_IN_SIZE, 'INTERRUPT') ?? { op: 'interrupt' };
    case FUSE_DESTROY:
      return { op: 'destroy' };
    case FUSE_ACCESS:
      return need(ACCESS_IN_SIZE, 'ACCESS') ?? { op: 'access', mask: body.readUInt32LE(0) };
    default:
      return { op: 'unsupported' };
  }
}

// ---- replies

function writeU64(buffer: Buffer, at: number, value: number): void {
  buffer.writeUInt32LE(value % 2 ** 32, at);
  buffer.writeUInt32LE(Math.floor(value / 2 ** 32), at + 4);
}

/** An out header for a reply of `bodyLength` bytes; send the body after it in the same write. */
export function encodeReplyHeader(unique: bigint, bodyLength: number): Buffer {
  const header = Buffer.allocUnsafe(OUT_HEADER_SIZE);
  header.writeUInt32LE(OUT_HEADER_SIZE + bodyLength, 0);
  header.writeInt32LE(0, 4);
  header.writeBigUInt64LE(unique, 8);
  return header;
}

/** A reply whose header and body share one buffer; the body part is returned zeroed for the caller to fill. */
function reply(unique: bigint, bodyLength: number): { message: Buffer; body: Buffer } {
  const message = Buffer.alloc(OUT_HEADER_SIZE + bodyLength);
  message.writeUInt32LE(message.length, 0);
  message.writeBigUInt64LE(unique, 8);
  return { message, body: message.subarray(OUT_HEADER_SIZE) };
}

/** An error reply: the header alone, carrying -errno. */
export function encodeError(unique: bigint, errno: number): Buffer {
  const message = Buffer.alloc(OUT_HEADER_SIZE);
  message.writeUInt32LE(OUT_HEADER_SIZE, 0);
  message.writeInt32LE(-Math.abs(errno), 4);
  message.writeBigUInt64LE(unique, 8);
  return message;
}

/** A success reply with no body (FLUSH, FSYNC, RELEASE, ACCESS, FALLOCATE, ...). */
export function encodeEmpty(unique: bigint): Buffer {
  return reply(unique, 0).message;
}

export interface FuseAttr {
  ino: number;
  size: number;
  blocks: number;
  /** Seconds since the epoch, used for atime, mtime and ctime alike. */
  time: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  blksize: number;
}

function writeAttr(buffer: Buffer, at: number, attr: FuseAttr): void {
  writeU64(buffer, at, attr.ino);
  writeU64(buffer, at + 8, attr.size);
  writeU64(buffer, at + 16, attr.blocks);
  writeU64(buffer, at + 24, attr.time);
  writeU64(buffer, at + 32, attr.time);
  writeU64(buffer, at + 40, attr.time);
  buffer.writeUInt32LE(attr.mode, at + 60);
  buffer.writeUInt32LE(attr.nlink, at + 64);
  buffer.writeUInt32LE(attr.uid, at + 68);
  buffer.writeUInt32LE(attr.gid, at + 72);
  buffer.writeUInt32LE(attr.blksize, at + 80);
}

/** Splits a cache lifetime in milliseconds into whole seconds and nanoseconds. */
function writeValid(buffer: Buffer, secondsAt: number, nanosAt: number, validMs: number): void {
  writeU64(buffer, secondsAt, Math.floor(validMs / 1000));
  buffer.writeUInt32LE((validMs % 1000) * 1_000_000, nanosAt);
}

export function encodeEntry(unique: bigint, attr: FuseAttr, validMs: number): Buffer {
  const { message, body } = reply(unique, ENTRY_OUT_SIZE);
  writeU64(body, 0, attr.ino);
  writeU64(body, 8, 1);
  writeValid(body, 16, 32, validMs);
  writeValid(body, 24, 36, validMs);
  writeAttr(body, 40, attr);
  return message;
}

export function encodeAttr(unique: bigint, attr: FuseAttr, validMs: number): Buffer {
  const { message, body } = reply(unique, ATTR_OUT_SIZE);
  writeValid(body, 0, 8, validMs);
  writeAttr(body, 16, attr);
  return message;
}

export interface InitReply {
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  maxPages: number;
}

export function encodeInit(unique: bigint, init: InitReply): Buffer {
  const { message, body } = reply(unique, INIT_OUT_SIZE);
  body.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
  body.writeUInt32LE(init.minor, 4);
  body.writeUInt32LE(init.maxReadahead, 8);
  body.writeUInt32LE(init.flags >>> 0, 12);
  body.writeUInt16LE(init.maxBackground, 16);
  body.writeUInt16LE(init.congestionThreshold, 18);
  body.writeUInt32LE(init.maxWrite, 20);
  // time_gran: timestamps are whole seconds anyway.
  body.writeUInt32LE(1, 24);
  body.writeUInt16LE(init.maxPages, 28);
  return message;
}

/** An INIT reply that only names our version: what the protocol asks for a kernel major we do not speak. */
export function encodeInitVersionOnly(unique: bigint): Buffer {
  const { message, body } = reply(unique, 8);
  body.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
  body.writeUInt32LE(FUSE_KERNEL_MINOR_VERSION, 4);
  return message;
}

export function encodeOpen(unique: bigint, openFlags: number): Buffer {
  const { message, body } = reply(unique, OPEN_OUT_SIZE);
  body.writeUInt32LE(openFlags, 8);
  return message;
}

export function encodeWrite(unique: bigint, size: number): Buffer {
  const { message, body } = reply(unique, WRITE_OUT_SIZE);
  body.writeUInt32LE(size, 0);
  return message;
}

export interface StatfsReply {
  blocks: number;
  files: number;
  blockSize: number;
  nameLength: number;
}

/** A full filesystem: no free blocks or inodes, since nothing can be created in it. */
export function encodeStatfs(unique: bigint, statfs: StatfsReply): Buffer {
  const { message, body } = reply(unique, STATFS_OUT_SIZE);
  writeU64(body, 0, statfs.blocks);
  writeU64(body, 24, statfs.files);
  body.writeUInt32LE(statfs.blockSize, 40);
  body.writeUInt32LE(statfs.nameLength, 44);
  body.writeUInt32LE(statfs.blockSize, 48);
  return message;
}

export interface DirEntry {
  ino: number;
  name: string;
  type: number;
}

function direntSize(nameLength: number): number {
  return (DIRENT_NAME_OFFSET + nameLength + 7) & ~7;
}

/**
 * A READDIR reply: the entries from index `offset` on, as many whole ones as fit in `size` bytes.
 * Each entry's `off` is the index of the next one, which is where the kernel asks to resume.
 */
export function encodeDirents(unique: bigint, entries: readonly DirEntry[], offset: number, size: number): Buffer {
  const names = entries.map((entry) => Buffer.from(entry.name));
  let length = 0;
  let end = offset;
  while (end < entries.length && length + direntSize(names[end]!.length) <= size) {
    length += direntSize(names[end]!.length);
    end += 1;
  }
  const { message, body } = reply(unique, length);
  let at = 0;
  for (let index = offset; index < end; index += 1) {
    const entry = entries[index]!;
    const name = names[index]!;
    writeU64(body, at, entry.ino);
    writeU64(body, at + 8, index + 1);
    body.writeUInt32LE(name.length, at + 16);
    body.writeUInt32LE(entry.type, at + 20);
    name.copy(body, at + DIRENT_NAME_OFFSET);
    at += direntSize(name.length);
  }
  return message;
}

/**
 * FUSE_NOTIFY_INVAL_INODE: the kernel forgets the inode's cached attributes (and, for `offset` >= 0,
 * its cached pages from there on). A notification is an out header with unique 0 and the notify
 * code in the error field.
 */
export function encodeNotifyInvalInode(ino: number, offset: number, length: number): Buffer {
  const message = Buffer.alloc(OUT_HEADER_SIZE + NOTIFY_INVAL_INODE_SIZE);
  message.writeUInt32LE(message.length, 0);
  message.writeInt32LE(FUSE_NOTIFY_INVAL_INODE, 4);
  message.writeBigUInt64LE(0n, 8);
  writeU64(message, OUT_HEADER_SIZE, ino);
  message.writeBigInt64LE(BigInt(offset), OUT_HEADER_SIZE + 8);
  message.writeBigInt64LE(BigInt(length), OUT_HEADER_SIZE + 16);
  return message;
}
