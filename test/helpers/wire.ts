/**
 * A deliberately naive NBD wire-byte builder and parser for tests.
 *
 * It shares no code with `src/nbd/` (not even constants): every number below is typed from
 * `doc/proto.md` of NetworkBlockDevice/nbd, so a wrong constant or layout in the production codec
 * cannot hide behind the same mistake here. Everything is big-endian (network order); 64-bit
 * fields are bigints; nothing here is tuned for speed.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const NBD_OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = {
  NBD_FLAG_FIXED_NEWSTYLE: 1 << 0,
  NBD_FLAG_NO_ZEROES: 1 << 1,
} as const;

export const ClientFlag = {
  NBD_FLAG_C_FIXED_NEWSTYLE: 1 << 0,
  NBD_FLAG_C_NO_ZEROES: 1 << 1,
} as const;

export const Opt = {
  NBD_OPT_EXPORT_NAME: 1,
  NBD_OPT_ABORT: 2,
  NBD_OPT_LIST: 3,
  NBD_OPT_PEEK_EXPORT: 4,
  NBD_OPT_STARTTLS: 5,
  NBD_OPT_INFO: 6,
  NBD_OPT_GO: 7,
  NBD_OPT_STRUCTURED_REPLY: 8,
  NBD_OPT_LIST_META_CONTEXT: 9,
  NBD_OPT_SET_META_CONTEXT: 10,
  NBD_OPT_EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 2 ** 31;

export const Rep = {
  NBD_REP_ACK: 1,
  NBD_REP_SERVER: 2,
  NBD_REP_INFO: 3,
  NBD_REP_META_CONTEXT: 4,
  NBD_REP_ERR_UNSUP: REP_ERR + 1,
  NBD_REP_ERR_POLICY: REP_ERR + 2,
  NBD_REP_ERR_INVALID: REP_ERR + 3,
  NBD_REP_ERR_PLATFORM: REP_ERR + 4,
  NBD_REP_ERR_TLS_REQD: REP_ERR + 5,
  NBD_REP_ERR_UNKNOWN: REP_ERR + 6,
  NBD_REP_ERR_SHUTDOWN: REP_ERR + 7,
  NBD_REP_ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  NBD_REP_ERR_TOO_BIG: REP_ERR + 9,
  NBD_REP_ERR_EXT_HEADER_REQD: REP_ERR + 10,
} as const;

export const Info = {
  NBD_INFO_EXPORT: 0,
  NBD_INFO_NAME: 1,
  NBD_INFO_DESCRIPTION: 2,
  NBD_INFO_BLOCK_SIZE: 3,
} as const;

export const TxFlag = {
  NBD_FLAG_HAS_FLAGS: 1 << 0,
  NBD_FLAG_READ_ONLY: 1 << 1,
  NBD_FLAG_SEND_FLUSH: 1 << 2,
  NBD_FLAG_SEND_FUA: 1 << 3,
  NBD_FLAG_ROTATIONAL: 1 << 4,
  NBD_FLAG_SEND_TRIM: 1 << 5,
  NBD_FLAG_SEND_WRITE_ZEROES: 1 << 6,
  NBD_FLAG_SEND_DF: 1 << 7,
  NBD_FLAG_CAN_MULTI_CONN: 1 << 8,
  NBD_FLAG_SEND_RESIZE: 1 << 9,
  NBD_FLAG_SEND_CACHE: 1 << 10,
  NBD_FLAG_SEND_FAST_ZERO: 1 << 11,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

export const Cmd = {
  NBD_CMD_READ: 0,
  NBD_CMD_WRITE: 1,
  NBD_CMD_DISC: 2,
  NBD_CMD_FLUSH: 3,
  NBD_CMD_TRIM: 4,
  NBD_CMD_CACHE: 5,
  NBD_CMD_WRITE_ZEROES: 6,
  NBD_CMD_BLOCK_STATUS: 7,
  NBD_CMD_RESIZE: 8,
} as const;

export const CmdFlag = {
  NBD_CMD_FLAG_FUA: 1 << 0,
  NBD_CMD_FLAG_NO_HOLE: 1 << 1,
  NBD_CMD_FLAG_DF: 1 << 2,
  NBD_CMD_FLAG_REQ_ONE: 1 << 3,
  NBD_CMD_FLAG_FAST_ZERO: 1 << 4,
  NBD_CMD_FLAG_PAYLOAD_LEN: 1 << 5,
} as const;

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const ReplyType = {
  NBD_REPLY_TYPE_NONE: 0,
  NBD_REPLY_TYPE_OFFSET_DATA: 1,
  NBD_REPLY_TYPE_OFFSET_HOLE: 2,
  NBD_REPLY_TYPE_BLOCK_STATUS: 5,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT: 6,
  NBD_REPLY_TYPE_ERROR: 2 ** 15 + 1,
  NBD_REPLY_TYPE_ERROR_OFFSET: 2 ** 15 + 2,
} as const;

export const StateFlag = {
  NBD_STATE_HOLE: 1 << 0,
  NBD_STATE_ZERO: 1 << 1,
} as const;

export const Errno = {
  NBD_EPERM: 1,
  NBD_EIO: 5,
  NBD_ENOMEM: 12,
  NBD_EINVAL: 22,
  NBD_ENOSPC: 28,
  NBD_EOVERFLOW: 75,
  NBD_ENOTSUP: 95,
  NBD_ESHUTDOWN: 108,
} as const;

/** 2^25: the payload every server must accept and no client may exceed without negotiation. */
export const MAX_DEFAULT_PAYLOAD = 32 * 1024 * 1024;

// ---- primitive encoders -------------------------------------------------------------------

export function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

export function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}

export function u64(value: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
}

export function bytesOf(text: string | Uint8Array): Buffer {
  return typeof text === 'string' ? Buffer.from(text, 'utf8') : Buffer.from(text);
}

/** An 8-byte opaque cookie. */
export function cookie(value: bigint | number): Buffer {
  return u64(value);
}

// ---- handshake, client side ---------------------------------------------------------------

export function clientFlags(flags: number): Buffer {
  return u32(flags);
}

/** An option whose header carries `declaredLength` (defaults to the data's real length). */
export function option(opt: number, data: Uint8Array = Buffer.alloc(0), declaredLength?: number): Buffer {
  return Buffer.concat([u64(IHAVEOPT), u32(opt), u32(declaredLength ?? data.length), data]);
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export function goData(name: string | Uint8Array, infos: readonly number[] = []): Buffer {
  const n = bytesOf(name);
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

/** Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export function metaContextData(name: string | Uint8Array, queries: readonly (string | Uint8Array)[]): Buffer {
  const n = bytesOf(name);
  const qs = queries.map((q) => {
    const b = bytesOf(q);
    return Buffer.concat([u32(b.length), b]);
  });
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...qs]);
}

// ---- handshake, server side parsers -------------------------------------------------------

export interface Greeting {
  nbdMagic: bigint;
  ihaveopt: bigint;
  handshakeFlags: number;
}

export const GREETING_LENGTH = 18;

export function parseGreeting(b: Buffer): Greeting {
  return {
    nbdMagic: b.readBigUInt64BE(0),
    ihaveopt: b.readBigUInt64BE(8),
    handshakeFlags: b.readUInt16BE(16),
  };
}

export interface OptionReplyHeader {
  magic: bigint;
  option: number;
  type: number;
  length: number;
}

export const OPTION_REPLY_HEADER_LENGTH = 20;

export function parseOptionReplyHeader(b: Buffer): OptionReplyHeader {
  return {
    magic: b.readBigUInt64BE(0),
    option: b.readUInt32BE(8),
    type: b.readUInt32BE(12),
    length: b.readUInt32BE(16),
  };
}

export function isErrorReplyType(type: number): boolean {
  return (type & 0x80000000) !== 0;
}

export type ParsedInfo =
  | { type: 0; length: number; size: bigint; transmissionFlags: number }
  | { type: 1; length: number; name: Buffer }
  | { type: 2; length: number; description: Buffer }
  | { type: 3; length: number; minimum: number; preferred: number; maximum: number }
  | { type: number; length: number; raw: Buffer };

/** Parses the data of an NBD_REP_INFO reply; `length` is the reply's data length. */
export function parseInfo(data: Buffer): ParsedInfo {
  const type = data.readUInt16BE(0);
  const length = data.length;
  if (type === Info.NBD_INFO_EXPORT && length === 12) {
    return { type, length, size: data.readBigUInt64BE(2), transmissionFlags: data.readUInt16BE(10) };
  }
  if (type === Info.NBD_INFO_NAME) return { type, length, name: data.subarray(2) };
  if (type === Info.NBD_INFO_DESCRIPTION) return { type, length, description: data.subarray(2) };
  if (type === Info.NBD_INFO_BLOCK_SIZE && length === 14) {
    return {
      type,
      length,
      minimum: data.readUInt32BE(2),
      preferred: data.readUInt32BE(6),
      maximum: data.readUInt32BE(10),
    };
  }
  return { type, length, raw: data.subarray(2) };
}

export function parseRepServer(data: Buffer): { name: Buffer; details: Buffer } {
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 4) throw new Error(`NBD_REP_SERVER name length ${nameLength} overruns ${data.length}`);
  return { name: data.subarray(4, 4 + nameLength), details: data.subarray(4 + nameLength) };
}

export function parseMetaContext(data: Buffer): { id: number; name: Buffer } {
  return { id: data.readUInt32BE(0), name: data.subarray(4) };
}

/** Parses the 10 bytes sent after a successful NBD_OPT_EXPORT_NAME (before any zeros). */
export function parseExportNameReply(b: Buffer): { size: bigint; transmissionFlags: number } {
  return { size: b.readBigUInt64BE(0), transmissionFlags: b.readUInt16BE(8) };
}

// ---- transmission -------------------------------------------------------------------------

export interface RequestFields {
  type: number;
  flags?: number;
  cookie: Buffer;
  offset?: bigint | number;
  length?: number;
  /** Sent after the header (WRITE). Its size does not have to agree with `length`. */
  payload?: Uint8Array;
  magic?: number;
}

export const REQUEST_HEADER_LENGTH = 28;

export function request(fields: RequestFields): Buffer {
  if (fields.cookie.length !== 8) throw new Error('a cookie is 8 bytes');
  const header = Buffer.concat([
    u32(fields.magic ?? NBD_REQUEST_MAGIC),
    u16(fields.flags ?? 0),
    u16(fields.type),
    fields.cookie,
    u64(fields.offset ?? 0),
    u32(fields.length ?? fields.payload?.length ?? 0),
  ]);
  return fields.payload === undefined ? header : Buffer.concat([header, fields.payload]);
}

export const SIMPLE_REPLY_HEADER_LENGTH = 16;
export const CHUNK_HEADER_LENGTH = 20;

export interface SimpleReplyHeader {
  magic: number;
  error: number;
  cookie: Buffer;
}

export function parseSimpleReplyHeader(b: Buffer): SimpleReplyHeader {
  return { magic: b.readUInt32BE(0), error: b.readUInt32BE(4), cookie: Buffer.from(b.subarray(8, 16)) };
}

export interface ChunkHeader {
  magic: number;
  flags: number;
  type: number;
  cookie: Buffer;
  length: number;
}

export function parseChunkHeader(b: Buffer): ChunkHeader {
  return {
    magic: b.readUInt32BE(0),
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: Buffer.from(b.subarray(8, 16)),
    length: b.readUInt32BE(16),
  };
}

export function isErrorChunkType(type: number): boolean {
  return (type & 0x8000) !== 0;
}

export function parseOffsetData(payload: Buffer): { offset: bigint; data: Buffer } {
  if (payload.length < 9) throw new Error(`OFFSET_DATA payload of ${payload.length} bytes (must be ≥ 9)`);
  return { offset: payload.readBigUInt64BE(0), data: payload.subarray(8) };
}

export function parseOffsetHole(payload: Buffer): { offset: bigint; size: number } {
  if (payload.length !== 12) throw new Error(`OFFSET_HOLE payload of ${payload.length} bytes (must be 12)`);
  return { offset: payload.readBigUInt64BE(0), size: payload.readUInt32BE(8) };
}

export interface ErrorChunk {
  error: number;
  message: Buffer;
  /** Present for NBD_REPLY_TYPE_ERROR_OFFSET. */
  offset?: bigint;
}

export function parseErrorChunk(type: number, payload: Buffer): ErrorChunk {
  if (payload.length < 6) throw new Error(`error chunk payload of ${payload.length} bytes (must be ≥ 6)`);
  const error = payload.readUInt32BE(0);
  const messageLength = payload.readUInt16BE(4);
  if (messageLength > payload.length - 6) throw new Error(`error message length ${messageLength} overruns chunk`);
  const message = payload.subarray(6, 6 + messageLength);
  if (type === ReplyType.NBD_REPLY_TYPE_ERROR_OFFSET) {
    if (payload.length !== 6 + messageLength + 8) throw new Error('ERROR_OFFSET chunk has the wrong length');
    return { error, message, offset: payload.readBigUInt64BE(6 + messageLength) };
  }
  return { error, message };
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function parseBlockStatus(payload: Buffer): { contextId: number; descriptors: StatusDescriptor[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw new Error(`BLOCK_STATUS payload of ${payload.length} bytes (must be 4 + a positive multiple of 8)`);
  }
  const descriptors: StatusDescriptor[] = [];
  for (let at = 4; at < payload.length; at += 8) {
    descriptors.push({ length: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
  }
  return { contextId: payload.readUInt32BE(0), descriptors };
}

/** True when `text` is well-formed UTF-8 with no NUL and at most 4096 bytes (the spec's strings). */
export function isValidNbdString(text: Uint8Array): boolean {
  if (text.length > 4096 || text.includes(0)) return false;
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(text);
    return true;
  } catch {
    return false;
  }
}
