/**
 * The client direction of the NBD wire codec, sans-IO: encoders for what a client sends
 * (handshake flags, option requests, command requests) and decoders for what a server sends
 * (greeting, option replies, simple and structured replies). Pure functions over Buffers.
 *
 * `ReplyFramer` turns an arbitrarily chunked byte stream of transmission-phase replies into whole
 * replies. A simple reply does not say how long its payload is: only a successful READ carries
 * data, of the length the client asked for, so the framer asks its owner for the payload length
 * expected for a cookie. Lengths are checked against a cap before anything is buffered.
 */
import { ByteQueue, readSafeU64, writeU64 } from './byte-queue.js';
import * as C from './constants.js';

/** The peer broke the framing; the only safe reaction is to drop the connection. */
export class NbdProtocolError extends Error {
  readonly code = 'EPROTO';

  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

function u64Safe(buffer: Buffer, offset: number, what: string): number {
  const value = readSafeU64(buffer, offset);
  if (value < 0) throw new NbdProtocolError(`${what} is not a safe integer`);
  return value;
}

// ---------------------------------------------------------------------------------------------
// Handshake

export const SERVER_GREETING_SIZE = 18;

/** Parses NBDMAGIC + IHAVEOPT + handshake flags; returns the handshake flags. */
export function decodeServerGreeting(bytes: Buffer): number {
  if (bytes.length < SERVER_GREETING_SIZE) throw new NbdProtocolError('short server greeting');
  if (bytes.readBigUInt64BE(0) !== C.NBDMAGIC) throw new NbdProtocolError('bad NBDMAGIC');
  if (bytes.readBigUInt64BE(8) !== C.IHAVEOPT) {
    throw new NbdProtocolError('not a newstyle server (no IHAVEOPT)');
  }
  return bytes.readUInt16BE(16);
}

export function encodeClientFlags(flags: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(flags >>> 0, 0);
  return out;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.allocUnsafe(C.OPTION_HEADER_SIZE + data.length);
  out.writeBigUInt64BE(C.IHAVEOPT, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(data.length, 12);
  data.copy(out, C.OPTION_HEADER_SIZE);
  return out;
}

function encodeString(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length > C.NBD_MAX_STRING) throw new RangeError(`string longer than ${C.NBD_MAX_STRING} bytes`);
  return bytes;
}

/** `NBD_OPT_EXPORT_NAME`: the name is the whole option data. */
export function encodeExportNameOption(exportName: string): Buffer {
  return encodeOption(C.NBD_OPT_EXPORT_NAME, encodeString(exportName));
}

/** `NBD_OPT_INFO` or `NBD_OPT_GO`: name length, name, count of info requests, the requests. */
export function encodeInfoOption(
  option: typeof C.NBD_OPT_INFO | typeof C.NBD_OPT_GO,
  exportName: string,
  infoRequests: readonly number[],
): Buffer {
  const name = encodeString(exportName);
  const data = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infoRequests.length);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  let at = 4 + name.length;
  data.writeUInt16BE(infoRequests.length, at);
  at += 2;
  for (const info of infoRequests) {
    data.writeUInt16BE(info, at);
    at += 2;
  }
  return encodeOption(option, data);
}

/** `NBD_OPT_SET_META_CONTEXT` or `NBD_OPT_LIST_META_CONTEXT`. */
export function encodeMetaContextOption(
  option: typeof C.NBD_OPT_SET_META_CONTEXT | typeof C.NBD_OPT_LIST_META_CONTEXT,
  exportName: string,
  queries: readonly string[],
): Buffer {
  const name = encodeString(exportName);
  const encoded = queries.map(encodeString);
  const size = 4 + name.length + 4 + encoded.reduce((sum, q) => sum + 4 + q.length, 0);
  const data = Buffer.allocUnsafe(size);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  let at = 4 + name.length;
  data.writeUInt32BE(encoded.length, at);
  at += 4;
  for (const query of encoded) {
    data.writeUInt32BE(query.length, at);
    query.copy(data, at + 4);
    at += 4 + query.length;
  }
  return encodeOption(option, data);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(bytes: Buffer): OptionReplyHeader {
  if (bytes.length < C.OPTION_REPLY_HEADER_SIZE) throw new NbdProtocolError('short option reply header');
  if (bytes.readBigUInt64BE(0) !== C.NBD_OPTION_REPLY_MAGIC) {
    throw new NbdProtocolError('bad option reply magic');
  }
  return { option: bytes.readUInt32BE(8), type: bytes.readUInt32BE(12), length: bytes.readUInt32BE(16) };
}

export interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  maximum: number;
}

export type ExportInfo =
  | { info: 'export'; size: number; flags: number }
  | { info: 'name'; name: string }
  | { info: 'description'; description: string }
  | { info: 'block-size'; blockSizes: BlockSizeInfo }
  | { info: 'unknown'; infoType: number; data: Buffer };

export type OptionReply =
  | { type: 'ack'; option: number }
  | { type: 'server'; option: number; name: string; description: string }
  | { type: 'info'; option: number; info: ExportInfo }
  | { type: 'meta-context'; option: number; id: number; name: string }
  | { type: 'error'; option: number; replyType: number; message: string }
  | { type: 'unknown'; option: number; replyType: number; data: Buffer };

function decodeInfo(data: Buffer): ExportInfo {
  if (data.length < 2) throw new NbdProtocolError('NBD_REP_INFO shorter than its type');
  const infoType = data.readUInt16BE(0);
  switch (infoType) {
    case C.NBD_INFO_EXPORT:
      if (data.length !== 12) throw new NbdProtocolError('NBD_INFO_EXPORT length is not 12');
      return { info: 'export', size: u64Safe(data, 2, 'export size'), flags: data.readUInt16BE(10) };
    case C.NBD_INFO_NAME:
      return { info: 'name', name: data.toString('utf8', 2) };
    case C.NBD_INFO_DESCRIPTION:
      return { info: 'description', description: data.toString('utf8', 2) };
    case C.NBD_INFO_BLOCK_SIZE:
      if (data.length !== 14) throw new NbdProtocolError('NBD_INFO_BLOCK_SIZE length is not 14');
      return {
        info: 'block-size',
        blockSizes: { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) },
      };
    default:
      return { info: 'unknown', infoType, data: data.subarray(2) };
  }
}

/** Decodes one option reply from its header and exactly `header.length` bytes of data. */
export function decodeOptionReply(header: OptionReplyHeader, data: Buffer): OptionReply {
  const { option, type } = header;
  if (data.length !== header.length) throw new NbdProtocolError('option reply data length mismatch');
  if (C.isOptionReplyError(type)) {
    return { type: 'error', option, replyType: type, message: data.toString('utf8') };
  }
  switch (type) {
    case C.NBD_REP_ACK:
      if (data.length !== 0) throw new NbdProtocolError('NBD_REP_ACK with data');
      return { type: 'ack', option };
    case C.NBD_REP_SERVER: {
      if (data.length < 4) throw new NbdProtocolError('NBD_REP_SERVER shorter than 4 bytes');
      const nameLength = data.readUInt32BE(0);
      if (nameLength > data.length - 4) throw new NbdProtocolError('NBD_REP_SERVER name overruns reply');
      return {
        type: 'server',
        option,
        name: data.toString('utf8', 4, 4 + nameLength),
        description: data.toString('utf8', 4 + nameLength),
      };
    }
    case C.NBD_REP_INFO:
      return { type: 'info', option, info: decodeInfo(data) };
    case C.NBD_REP_META_CONTEXT:
      if (data.length < 4) throw new NbdProtocolError('NBD_REP_META_CONTEXT shorter than 4 bytes');
      return { type: 'meta-context', option, id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
    default:
      return { type: 'unknown', option, replyType: type, data };
  }
}

/** The reply to `NBD_OPT_EXPORT_NAME`: size(64) + flags(16) [+ 124 zeroes]. */
export const EXPORT_NAME_REPLY_SIZE = 10;

export function decodeExportNameReply(bytes: Buffer): { size: number; flags: number } {
  if (bytes.length < EXPORT_NAME_REPLY_SIZE) throw new NbdProtocolError('short EXPORT_NAME reply');
  return { size: u64Safe(bytes, 0, 'export size'), flags: bytes.readUInt16BE(8) };
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

/** Writes the 28-byte request header into `target` at `at`. */
export function writeRequestHeader(target: Buffer, at: number, request: RequestHeader): void {
  target.writeUInt32BE(C.NBD_REQUEST_MAGIC, at);
  target.writeUInt16BE(request.flags, at + 4);
  target.writeUInt16BE(request.type, at + 6);
  target.writeBigUInt64BE(request.cookie, at + 8);
  writeU64(target, request.offset, at + 16);
  target.writeUInt32BE(request.length >>> 0, at + 24);
}

export function encodeRequest(request: RequestHeader): Buffer {
  const out = Buffer.allocUnsafe(C.REQUEST_HEADER_SIZE);
  writeRequestHeader(out, 0, request);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies

export type StructuredChunk =
  | { type: 'none' }
  | { type: 'data'; offset: number; data: Buffer }
  | { type: 'hole'; offset: number; length: number }
  | { type: 'block-status'; contextId: number; extents: { length: number; flags: number }[] }
  | { type: 'error'; replyType: number; error: number; message: string; offset?: number }
  | { type: 'unknown'; replyType: number; payload: Buffer };

export type Reply =
  | { kind: 'simple'; cookie: bigint; error: number; data: Buffer }
  | { kind: 'structured'; cookie: bigint; flags: number; done: boolean; chunk: StructuredChunk };

export function decodeSimpleReplyHeader(bytes: Buffer): { cookie: bigint; error: number } {
  if (bytes.readUInt32BE(0) !== C.NBD_SIMPLE_REPLY_MAGIC) throw new NbdProtocolError('bad simple reply magic');
  return { error: bytes.readUInt32BE(4), cookie: bytes.readBigUInt64BE(8) };
}

export interface StructuredReplyHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function decodeStructuredReplyHeader(bytes: Buffer): StructuredReplyHeader {
  if (bytes.readUInt32BE(0) !== C.NBD_STRUCTURED_REPLY_MAGIC) {
    throw new NbdProtocolError('bad structured reply magic');
  }
  return {
    flags: bytes.readUInt16BE(4),
    type: bytes.readUInt16BE(6),
    cookie: bytes.readBigUInt64BE(8),
    length: bytes.readUInt32BE(16),
  };
}

/** Decodes a structured chunk's payload; views into `payload` are returned, not copies. */
export function decodeStructuredChunk(type: number, payload: Buffer): StructuredChunk {
  if (C.isReplyTypeError(type)) {
    if (payload.length < 6) throw new NbdProtocolError('error chunk shorter than 6 bytes');
    const error = payload.readUInt32BE(0);
    const messageLength = payload.readUInt16BE(4);
    if (6 + messageLength > payload.length) throw new NbdProtocolError('error message overruns chunk');
    const message = payload.toString('utf8', 6, 6 + messageLength);
    if (error === 0) throw new NbdProtocolError('error chunk with error value 0');
    if (type === C.NBD_REPLY_TYPE_ERROR_OFFSET) {
      if (payload.length !== 6 + messageLength + 8) throw new NbdProtocolError('bad ERROR_OFFSET length');
      return { type: 'error', replyType: type, error, message, offset: u64Safe(payload, 6 + messageLength, 'error offset') };
    }
    return { type: 'error', replyType: type, error, message };
  }
  switch (type) {
    case C.NBD_REPLY_TYPE_NONE:
      if (payload.length !== 0) throw new NbdProtocolError('NONE chunk with payload');
      return { type: 'none' };
    case C.NBD_REPLY_TYPE_OFFSET_DATA:
      if (payload.length < 9) throw new NbdProtocolError('OFFSET_DATA chunk shorter than 9 bytes');
      return { type: 'data', offset: u64Safe(payload, 0, 'data offset'), data: payload.subarray(8) };
    case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
      if (payload.length !== 12) throw new NbdProtocolError('OFFSET_HOLE chunk length is not 12');
      const length = payload.readUInt32BE(8);
      if (length === 0) throw new NbdProtocolError('OFFSET_HOLE of size 0');
      return { type: 'hole', offset: u64Safe(payload, 0, 'hole offset'), length };
    }
    case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
      if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
        throw new NbdProtocolError('BLOCK_STATUS chunk length is not 4 + 8n with n > 0');
      }
      const extents: { length: number; flags: number }[] = [];
      for (let at = 4; at < payload.length; at += 8) {
        extents.push({ length: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
      }
      return { type: 'block-status', contextId: payload.readUInt32BE(0), extents };
    }
    default:
      return { type: 'unknown', replyType: type, payload };
  }
}

/** Largest structured chunk payload the framer buffers: max payload plus slack for headers. */
export const DEFAULT_MAX_REPLY_PAYLOAD = C.MAX_PAYLOAD + 4096;
/** A BLOCK_STATUS chunk may legitimately carry 2^20 descriptors. */
const MAX_BLOCK_STATUS_PAYLOAD = 4 + 8 * (1 << 20);

type FramerState =
  | { kind: 'header' }
  | { kind: 'simple-payload'; cookie: bigint; length: number }
  | { kind: 'structured-payload'; header: StructuredReplyHeader };

/**
 * Incremental reply framer. States: waiting for a header (4 bytes decide which kind), then for
 * the payload the header announced. `feed` never keeps a partial reply beyond its own queue.
 */
export class ReplyFramer {
  readonly #queue = new ByteQueue();
  readonly #simplePayloadLength: (cookie: bigint) => number | undefined;
  readonly #maxPayload: number;
  #state: FramerState = { kind: 'header' };

  /**
   * @param simplePayloadLength bytes of payload a successful simple reply to `cookie` carries
   *   (the READ length, else 0); `undefined` for a cookie the client never sent.
   */
  constructor(simplePayloadLength: (cookie: bigint) => number | undefined, maxPayload = DEFAULT_MAX_REPLY_PAYLOAD) {
    this.#simplePayloadLength = simplePayloadLength;
    this.#maxPayload = maxPayload;
  }

  /** Bytes received and not yet part of a whole reply (a consumed header included). */
  get buffered(): number {
    const header =
      this.#state.kind === 'simple-payload'
        ? C.SIMPLE_REPLY_HEADER_SIZE
        : this.#state.kind === 'structured-payload'
          ? C.STRUCTURED_REPLY_HEADER_SIZE
          : 0;
    return this.#queue.length + header;
  }

  /** Adds a chunk and returns every reply it completes, in stream order. */
  feed(chunk: Buffer): Reply[] {
    this.#queue.push(chunk);
    const replies: Reply[] = [];
    for (;;) {
      const reply = this.#next();
      if (reply === undefined) return replies;
      replies.push(reply);
    }
  }

  #next(): Reply | undefined {
    const queue = this.#queue;
    for (;;) {
      const state = this.#state;
      switch (state.kind) {
        case 'header': {
          if (queue.length < 4) return undefined;
          const magic = queue.peek(4).readUInt32BE(0);
          if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
            if (queue.length < C.SIMPLE_REPLY_HEADER_SIZE) return undefined;
            const { cookie, error } = decodeSimpleReplyHeader(queue.take(C.SIMPLE_REPLY_HEADER_SIZE));
            const expected = this.#simplePayloadLength(cookie);
            if (expected === undefined) throw new NbdProtocolError(`reply to unknown cookie ${cookie}`);
            if (error !== 0 || expected === 0) {
              return { kind: 'simple', cookie, error, data: Buffer.alloc(0) };
            }
            this.#state = { kind: 'simple-payload', cookie, length: expected };
            continue;
          }
          if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) {
            if (queue.length < C.STRUCTURED_REPLY_HEADER_SIZE) return undefined;
            const header = decodeStructuredReplyHeader(queue.take(C.STRUCTURED_REPLY_HEADER_SIZE));
            const cap =
              header.type === C.NBD_REPLY_TYPE_BLOCK_STATUS
                ? Math.max(MAX_BLOCK_STATUS_PAYLOAD, this.#maxPayload)
                : this.#maxPayload;
            if (header.length > cap) {
              throw new NbdProtocolError(`structured chunk of ${header.length} bytes exceeds the cap`);
            }
            this.#state = { kind: 'structured-payload', header };
            continue;
          }
          throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
        }
        case 'simple-payload': {
          if (queue.length < state.length) return undefined;
          this.#state = { kind: 'header' };
          return { kind: 'simple', cookie: state.cookie, error: 0, data: queue.take(state.length) };
        }
        case 'structured-payload': {
          const { header } = state;
          if (queue.length < header.length) return undefined;
          this.#state = { kind: 'header' };
          const chunk = decodeStructuredChunk(header.type, queue.take(header.length));
          const done = (header.flags & C.NBD_REPLY_FLAG_DONE) !== 0;
          return { kind: 'structured', cookie: header.cookie, flags: header.flags, done, chunk };
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

const ERROR_NAMES: Readonly<Record<number, string>> = {
  [C.NBD_EPERM]: 'EPERM',
  [C.NBD_EIO]: 'EIO',
  [C.NBD_ENOMEM]: 'ENOMEM',
  [C.NBD_EINVAL]: 'EINVAL',
  [C.NBD_ENOSPC]: 'ENOSPC',
  [C.NBD_EOVERFLOW]: 'EOVERFLOW',
  [C.NBD_ENOTSUP]: 'ENOTSUP',
  [C.NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** The errno-style code of an NBD error value; the spec says to read an unknown one as EINVAL. */
export function errorCodeForNbdError(error: number): string {
  return ERROR_NAMES[error] ?? 'EINVAL';
}

const OPTION_ERROR_NAMES: Readonly<Record<number, string>> = {
  [C.NBD_REP_ERR_UNSUP]: 'ENOTSUP',
  [C.NBD_REP_ERR_POLICY]: 'EPERM',
  [C.NBD_REP_ERR_INVALID]: 'EINVAL',
  [C.NBD_REP_ERR_PLATFORM]: 'ENOTSUP',
  [C.NBD_REP_ERR_TLS_REQD]: 'EPERM',
  [C.NBD_REP_ERR_UNKNOWN]: 'ENOENT',
  [C.NBD_REP_ERR_SHUTDOWN]: 'ESHUTDOWN',
  [C.NBD_REP_ERR_BLOCK_SIZE_REQD]: 'EINVAL',
  [C.NBD_REP_ERR_TOO_BIG]: 'EOVERFLOW',
};

/** The errno-style code of an option error reply (`NBD_REP_ERR_UNKNOWN` is ENOENT, ...). */
export function errorCodeForOptionError(replyType: number): string {
  return OPTION_ERROR_NAMES[replyType] ?? 'EINVAL';
}
