/**
 * The server's side of the transmission phase, sans I/O: an incremental request parser and the
 * reply encoders.
 *
 * Parser states: header (28 bytes) → payload (WRITE only) → header …  A WRITE whose length
 * exceeds the payload limit is reported at once (so it can be refused) and its payload is then
 * discarded as it arrives, so framing survives without buffering it. A wrong request magic is
 * the only framing error: nothing after it can be trusted.
 *
 * A payload is always copied into a buffer of its own (from `allocate`), never a view of the
 * queued chunks, so the chunks may be lent and reused. While a payload is being received, its
 * remaining space is offered so that the caller can read the socket straight into it.
 */
import { ByteQueue, readSafeU64, writeU64 } from './byte-queue.js';
import * as C from './constants.js';

export interface NbdRequest {
  flags: number;
  type: number;
  /** Opaque 8 bytes, echoed verbatim. */
  cookie: Buffer;
  /** -1 when the wire value is beyond 2^53. */
  offset: number;
  length: number;
  /** WRITE payload, when within the limit. */
  payload?: Buffer;
  /** A WRITE over the payload limit: its payload is discarded, not delivered. */
  payloadTooLarge?: boolean;
}

export type ParseResult = { kind: 'request'; request: NbdRequest } | { kind: 'fatal'; reason: string };

type ParserState =
  | { kind: 'header' }
  | { kind: 'payload'; request: NbdRequest; buffer: Buffer; filled: number }
  | { kind: 'discard'; remaining: number };

export class RequestParser {
  readonly #maxPayload: number;
  readonly #allocate: (length: number) => Buffer;
  #state: ParserState = { kind: 'header' };

  /** Payloads go into buffers from `allocate`. */
  constructor(maxPayload: number, allocate: (length: number) => Buffer = Buffer.allocUnsafe) {
    this.#maxPayload = maxPayload;
    this.#allocate = allocate;
  }

  /** Bytes of the request being received that are still owed by the client. */
  get pendingPayload(): number {
    const state = this.#state;
    if (state.kind === 'payload') return state.buffer.length - state.filled;
    if (state.kind === 'discard') return state.remaining;
    return 0;
  }

  /** The unfilled rest of the payload being received, when it is at least `minimum` bytes. */
  payloadSpace(minimum: number): Buffer | undefined {
    const state = this.#state;
    if (state.kind !== 'payload' || state.buffer.length - state.filled < minimum) return undefined;
    return state.buffer.subarray(state.filled);
  }

  /** `count` bytes were written into the space payloadSpace() offered. */
  payloadReceived(count: number): void {
    const state = this.#state;
    if (state.kind !== 'payload' || count > state.buffer.length - state.filled) {
      throw new RangeError(`${count} payload bytes received outside the payload's space`);
    }
    state.filled += count;
  }

  /** The next complete request, or undefined when the queue holds too little. */
  next(queue: ByteQueue): ParseResult | undefined {
    for (;;) {
      const state = this.#state;
      if (state.kind === 'discard') {
        state.remaining -= queue.skip(state.remaining);
        if (state.remaining > 0) return undefined;
        this.#state = { kind: 'header' };
        continue;
      }
      if (state.kind === 'payload') {
        state.filled += queue.takeInto(state.buffer, state.filled, state.buffer.length - state.filled);
        if (state.filled < state.buffer.length) return undefined;
        this.#state = { kind: 'header' };
        state.request.payload = state.buffer;
        return { kind: 'request', request: state.request };
      }
      if (queue.length < C.REQUEST_HEADER_SIZE) return undefined;
      const header = queue.peek(C.REQUEST_HEADER_SIZE);
      if (header.readUInt32BE(0) !== C.NBD_REQUEST_MAGIC) {
        return { kind: 'fatal', reason: `bad request magic 0x${header.readUInt32BE(0).toString(16)}` };
      }
      const request: NbdRequest = {
        flags: header.readUInt16BE(4),
        type: header.readUInt16BE(6),
        cookie: Buffer.from(header.subarray(8, 16)),
        offset: readSafeU64(header, 16),
        length: header.readUInt32BE(24),
      };
      queue.skip(C.REQUEST_HEADER_SIZE);
      if (request.type !== C.NBD_CMD_WRITE || request.length === 0) {
        return { kind: 'request', request };
      }
      if (request.length > this.#maxPayload) {
        request.payloadTooLarge = true;
        this.#state = { kind: 'discard', remaining: request.length };
        return { kind: 'request', request };
      }
      this.#state = { kind: 'payload', request, buffer: this.#allocate(request.length), filled: 0 };
    }
  }
}

export function simpleReply(cookie: Buffer, error: number): Buffer {
  const out = Buffer.allocUnsafe(C.SIMPLE_REPLY_HEADER_SIZE);
  out.writeUInt32BE(C.NBD_SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(error, 4);
  cookie.copy(out, 8);
  return out;
}

function chunkHeader(size: number, cookie: Buffer, flags: number, type: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  out.writeUInt32BE(C.NBD_STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  cookie.copy(out, 8);
  out.writeUInt32BE(length, 16);
  return out;
}

export function noneChunk(cookie: Buffer): Buffer {
  return chunkHeader(C.STRUCTURED_REPLY_HEADER_SIZE, cookie, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_NONE, 0);
}

/** Header of an OFFSET_DATA chunk; the data follows it on the wire. */
export function offsetDataHeader(cookie: Buffer, done: boolean, offset: number, dataLength: number): Buffer {
  const out = chunkHeader(
    C.STRUCTURED_REPLY_HEADER_SIZE + 8,
    cookie,
    done ? C.NBD_REPLY_FLAG_DONE : 0,
    C.NBD_REPLY_TYPE_OFFSET_DATA,
    8 + dataLength,
  );
  writeU64(out, offset, C.STRUCTURED_REPLY_HEADER_SIZE);
  return out;
}

export function offsetHoleChunk(cookie: Buffer, done: boolean, offset: number, length: number): Buffer {
  const out = chunkHeader(
    C.STRUCTURED_REPLY_HEADER_SIZE + 12,
    cookie,
    done ? C.NBD_REPLY_FLAG_DONE : 0,
    C.NBD_REPLY_TYPE_OFFSET_HOLE,
    12,
  );
  writeU64(out, offset, C.STRUCTURED_REPLY_HEADER_SIZE);
  out.writeUInt32BE(length, C.STRUCTURED_REPLY_HEADER_SIZE + 8);
  return out;
}

export function errorChunk(cookie: Buffer, error: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8').subarray(0, C.NBD_MAX_STRING);
  const out = chunkHeader(
    C.STRUCTURED_REPLY_HEADER_SIZE + 6 + text.length,
    cookie,
    C.NBD_REPLY_FLAG_DONE,
    C.NBD_REPLY_TYPE_ERROR,
    6 + text.length,
  );
  out.writeUInt32BE(error, C.STRUCTURED_REPLY_HEADER_SIZE);
  out.writeUInt16BE(text.length, C.STRUCTURED_REPLY_HEADER_SIZE + 4);
  text.copy(out, C.STRUCTURED_REPLY_HEADER_SIZE + 6);
  return out;
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function blockStatusChunk(
  cookie: Buffer,
  done: boolean,
  contextId: number,
  descriptors: readonly StatusDescriptor[],
): Buffer {
  const payloadLength = 4 + 8 * descriptors.length;
  const out = chunkHeader(
    C.STRUCTURED_REPLY_HEADER_SIZE + payloadLength,
    cookie,
    done ? C.NBD_REPLY_FLAG_DONE : 0,
    C.NBD_REPLY_TYPE_BLOCK_STATUS,
    payloadLength,
  );
  let at = C.STRUCTURED_REPLY_HEADER_SIZE;
  out.writeUInt32BE(contextId, at);
  at += 4;
  for (const descriptor of descriptors) {
    out.writeUInt32BE(descriptor.length, at);
    out.writeUInt32BE(descriptor.flags, at + 4);
    at += 8;
  }
  return out;
}
