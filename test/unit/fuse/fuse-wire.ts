/**
 * FUSE messages built and read byte by byte from the struct layouts of Linux's
 * include/uapi/linux/fuse.h, sharing no code with src/fuse/: what the kernel would send, and
 * readers for what it would receive.
 */

export const OP = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  MKNOD: 8,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  GETXATTR: 22,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  LSEEK: 46,
} as const;

export const ERR = { EPERM: 1, ENOENT: 2, EIO: 5, EACCES: 13, ENOTDIR: 20, EISDIR: 21, EINVAL: 22, EFBIG: 27, ENOSPC: 28, EROFS: 30, ENOSYS: 38, EPROTO: 71, EOPNOTSUPP: 95 } as const;

function u64(value: bigint | number): Buffer {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64LE(BigInt(value));
  return bytes;
}

function u32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32LE(value >>> 0);
  return bytes;
}

/** fuse_in_header (40 bytes) followed by `body`; `length` overrides the header's len field. */
export function request(opcode: number, unique: bigint, nodeid: bigint | number, body: Buffer = Buffer.alloc(0), length?: number): Buffer {
  const total = 40 + body.length;
  return Buffer.concat([
    u32(length ?? total),
    u32(opcode),
    u64(unique),
    u64(nodeid),
    u32(0), // uid
    u32(0), // gid
    u32(1234), // pid
    Buffer.alloc(4), // total_extlen, padding
    body,
  ]);
}

export function initBody(major: number, minor: number, flags: number, maxReadahead = 131072): Buffer {
  return Buffer.concat([u32(major), u32(minor), u32(maxReadahead), u32(flags), Buffer.alloc(48)]);
}

export function nameBody(name: string): Buffer {
  return Buffer.concat([Buffer.from(name), Buffer.alloc(1)]);
}

/** fuse_read_in, also READDIR's body. */
export function readBody(offset: bigint | number, size: number): Buffer {
  return Buffer.concat([u64(7), u64(offset), u32(size), u32(0), u64(0), u32(0), u32(0)]);
}

export function writeBody(offset: bigint | number, data: Buffer, sizeField = data.length): Buffer {
  return Buffer.concat([u64(7), u64(offset), u32(sizeField), u32(0), u64(0), u32(0o2), u32(0), data]);
}

export function openBody(flags: number): Buffer {
  return Buffer.concat([u32(flags), u32(0)]);
}

/** fuse_setattr_in (88 bytes). */
export function setattrBody(valid: number, size: bigint | number, mode = 0): Buffer {
  const body = Buffer.alloc(88);
  body.writeUInt32LE(valid, 0);
  body.writeBigUInt64LE(BigInt(size), 16);
  body.writeUInt32LE(mode, 68);
  return body;
}

export function fsyncBody(): Buffer {
  return Buffer.concat([u64(7), u32(0), u32(0)]);
}

export function releaseBody(): Buffer {
  return Buffer.concat([u64(7), u32(0), u32(0), u64(0)]);
}

export function fallocateBody(offset: bigint | number, length: bigint | number, mode: number): Buffer {
  return Buffer.concat([u64(7), u64(offset), u64(length), u32(mode), u32(0)]);
}

export function accessBody(mask: number): Buffer {
  return Buffer.concat([u32(mask), u32(0)]);
}

export function interruptBody(unique: bigint): Buffer {
  return u64(unique);
}

export function batchForgetBody(entries: [bigint, bigint][]): Buffer {
  return Buffer.concat([u32(entries.length), u32(0), ...entries.flatMap(([node, count]) => [u64(node), u64(count)])]);
}

export interface Reply {
  length: number;
  error: number;
  unique: bigint;
  body: Buffer;
}

/** fuse_out_header (16 bytes) and what follows. */
export function parseReply(message: Buffer): Reply {
  return {
    length: message.readUInt32LE(0),
    error: message.readInt32LE(4),
    unique: message.readBigUInt64LE(8),
    body: message.subarray(16),
  };
}

/** fuse_attr (88 bytes) at `at`. */
export function parseAttr(body: Buffer, at: number): { ino: bigint; size: bigint; blocks: bigint; mode: number; nlink: number; blksize: number } {
  return {
    ino: body.readBigUInt64LE(at),
    size: body.readBigUInt64LE(at + 8),
    blocks: body.readBigUInt64LE(at + 16),
    mode: body.readUInt32LE(at + 60),
    nlink: body.readUInt32LE(at + 64),
    blksize: body.readUInt32LE(at + 80),
  };
}

/** fuse_dirent records: name, ino, type and the offset to resume at. */
export function parseDirents(body: Buffer): { ino: bigint; off: bigint; type: number; name: string; recordLength: number }[] {
  const entries = [];
  let at = 0;
  while (at < body.length) {
    const nameLength = body.readUInt32LE(at + 16);
    const recordLength = Math.ceil((24 + nameLength) / 8) * 8;
    entries.push({
      ino: body.readBigUInt64LE(at),
      off: body.readBigUInt64LE(at + 8),
      type: body.readUInt32LE(at + 20),
      name: body.subarray(at + 24, at + 24 + nameLength).toString(),
      recordLength,
    });
    at += recordLength;
  }
  return entries;
}
