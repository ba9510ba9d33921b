/**
 * A scripted raw-socket NBD client for protocol tests: it sends exactly the bytes a test builds
 * (with `wire.ts`) and reads exactly what the server sends, nothing more. Every read has a
 * deadline that fails the test instead of hanging it, and a server that closes the connection
 * turns a pending read into a `PeerClosedError`, so "the server hung up" is something a test can
 * assert.
 *
 * Framing of replies needs one piece of context the wire does not carry: a simple reply to a
 * successful READ is followed by `length` bytes. The peer remembers the length of every READ it
 * sent (by cookie) until that request's reply is complete.
 *
 * `startTls` turns the connection into a TLS client after the server acknowledged STARTTLS;
 * reads and writes then go through TLS, and the same scripted API carries on.
 */
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import * as W from './wire.js';

export const DEFAULT_TIMEOUT_MS = 5_000;

export class PeerClosedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PeerClosedError';
  }
}

export class PeerTimeoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PeerTimeoutError';
  }
}

export type PeerTarget = { host: string; port: number } | { path: string };

export interface OptionReply {
  magic: bigint;
  option: number;
  type: number;
  data: Buffer;
}

export type ReplyMessage =
  | { kind: 'simple'; magic: number; error: number; cookie: Buffer; data: Buffer | undefined }
  | { kind: 'chunk'; magic: number; flags: number; type: number; cookie: Buffer; payload: Buffer };

export interface ExportInfo {
  size: number;
  flags: number;
}

export class RawPeer {
  #socket: Socket;
  readonly #chunks: Buffer[] = [];
  #buffered = 0;
  #closed = false;
  #wake: (() => void) | undefined;
  #reading = false;
  readonly #pendingReads = new Map<string, number>();
  /** Errors the socket reported (EPIPE, ECONNRESET when the server hung up on us). */
  readonly socketErrors: Error[] = [];
  readonly timeoutMs: number;
  /** Set once structured replies were agreed: simple replies then never carry a payload. */
  structured = false;

  private constructor(socket: Socket, timeoutMs: number) {
    this.#socket = socket;
    this.timeoutMs = timeoutMs;
    this.#listen(socket);
  }

  #listen(socket: Socket): void {
    socket.on('data', (chunk: Buffer) => {
      this.#chunks.push(chunk);
      this.#buffered += chunk.length;
      this.#notify();
    });
    const onClosed = (): void => {
      this.#closed = true;
      this.#notify();
    };
    socket.on('end', onClosed);
    socket.on('close', onClosed);
    socket.on('error', (error) => {
      this.socketErrors.push(error);
      onClosed();
    });
  }

  /**
   * Runs a TLS client handshake over the connection (call it after reading the ACK to STARTTLS)
   * and carries on over TLS. Rejects when the handshake fails or the server hangs up first.
   */
  async startTls(options: ConnectionOptions = {}, timeoutMs = this.timeoutMs): Promise<TLSSocket> {
    if (this.#buffered > 0) throw new Error(`RawPeer: ${this.#buffered} unread plain bytes before the TLS handshake`);
    const plain = this.#socket;
    plain.removeAllListeners('data');
    const secure = tlsConnect({ ...options, socket: plain });
    this.#socket = secure;
    this.#listen(secure);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => finish(new PeerTimeoutError(`TLS handshake not done after ${timeoutMs} ms`)), timeoutMs);
      const finish = (error?: Error): void => {
        clearTimeout(timer);
        secure.off('secureConnect', onSecure);
        secure.off('error', onError);
        secure.off('close', onClose);
        if (error === undefined) resolve();
        else reject(error);
      };
      const onSecure = (): void => finish();
      const onError = (error: Error): void => finish(error);
      const onClose = (): void => finish(new PeerClosedError('connection closed during the TLS handshake'));
      secure.once('secureConnect', onSecure);
      secure.once('error', onError);
      secure.once('close', onClose);
    });
    return secure;
  }

  /** `localAddress` picks the source address, e.g. 127.0.0.2 to look like another host. */
  static connect(target: PeerTarget, timeoutMs = DEFAULT_TIMEOUT_MS, options: { localAddress?: string } = {}): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const socket =
        'path' in target
          ? connect(target.path)
          : connect({ port: target.port, host: target.host, ...(options.localAddress === undefined ? {} : { localAddress: options.localAddress }) });
      socket.setNoDelay(true);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new PeerTimeoutError('connect timed out'));
      }, timeoutMs);
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(error);
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve(new RawPeer(socket, timeoutMs));
      });
    });
  }

  get socket(): Socket {
    return this.#socket;
  }

  /** The server ended or reset the connection (or we destroyed it). */
  get closed(): boolean {
    return this.#closed;
  }

  get bufferedBytes(): number {
    return this.#buffered;
  }

  /** Queues bytes; a write to a connection the server already dropped is recorded, not thrown. */
  send(bytes: Uint8Array): boolean {
    if (this.#socket.destroyed) return false;
    return this.#socket.write(bytes);
  }

  /** Sends and waits until the bytes left our socket buffer (or the connection died). */
  sendAndFlush(bytes: Uint8Array): Promise<void> {
    if (this.#socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => this.#socket.write(bytes, () => resolve()));
  }

  pauseReading(): void {
    this.#socket.pause();
  }

  resumeReading(): void {
    this.#socket.resume();
  }

  /** Half-closes our side: the server sees EOF. */
  end(): void {
    this.#socket.end();
  }

  destroy(): void {
    this.#socket.destroy();
  }

  /** Reads exactly `n` bytes; rejects on timeout or when the connection closes first. */
  async readExactly(n: number, timeoutMs = this.timeoutMs): Promise<Buffer> {
    if (this.#reading) throw new Error('RawPeer: one read at a time');
    this.#reading = true;
    try {
      const deadline = Date.now() + timeoutMs;
      while (this.#buffered < n) {
        if (this.#closed) {
          throw new PeerClosedError(`connection closed after ${this.#buffered} of ${n} expected bytes`);
        }
        await this.#waitForEvent(deadline, () => `timed out after ${timeoutMs} ms with ${this.#buffered} of ${n} bytes`);
      }
      return this.#take(n);
    } finally {
      this.#reading = false;
    }
  }

  /**
   * Waits for the server to close the connection; resolves with every byte that arrived and was
   * not read before the close. Rejects if the connection is still open after the timeout.
   */
  async waitForClose(timeoutMs = this.timeoutMs): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#closed) {
      await this.#waitForEvent(
        deadline,
        () => `server kept the connection open for ${timeoutMs} ms (${this.#buffered} unread bytes)`,
      );
    }
    return this.#take(this.#buffered);
  }

  // ---- handshake --------------------------------------------------------------------------

  async readGreeting(): Promise<W.Greeting> {
    return W.parseGreeting(await this.readExactly(W.GREETING_LENGTH));
  }

  /** Reads the greeting and answers with client flags (fixed newstyle and no zeroes by default). */
  async startHandshake(
    flags: number = W.ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | W.ClientFlag.NBD_FLAG_C_NO_ZEROES,
  ): Promise<W.Greeting> {
    const greeting = await this.readGreeting();
    this.send(W.clientFlags(flags));
    return greeting;
  }

  sendOption(opt: number, data?: Uint8Array, declaredLength?: number): void {
    this.send(W.option(opt, data, declaredLength));
  }

  async readOptionReply(timeoutMs = this.timeoutMs): Promise<OptionReply> {
    const header = W.parseOptionReplyHeader(await this.readExactly(W.OPTION_REPLY_HEADER_LENGTH, timeoutMs));
    if (header.magic !== W.NBD_OPTION_REPLY_MAGIC) {
      throw new Error(`option reply magic 0x${header.magic.toString(16)}`);
    }
    const data = header.length === 0 ? Buffer.alloc(0) : await this.readExactly(header.length, timeoutMs);
    return { magic: header.magic, option: header.option, type: header.type, data };
  }

  /** Reads replies up to and including the final one (ACK or an error). */
  async readOptionReplies(timeoutMs = this.timeoutMs): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply(timeoutMs);
      replies.push(reply);
      if (isFinalOptionReply(reply.type)) return replies;
    }
  }

  async option(opt: number, data?: Uint8Array): Promise<OptionReply[]> {
    this.sendOption(opt, data);
    return this.readOptionReplies();
  }

  /**
   * NBD_OPT_GO (or INFO). On an ACK to GO the peer is in transmission; `export` carries the
   * NBD_INFO_EXPORT values.
   */
  async go(
    name: string | Uint8Array,
    infos: readonly number[] = [],
    opt: number = W.Opt.NBD_OPT_GO,
  ): Promise<{ replies: OptionReply[]; infos: W.ParsedInfo[]; export: ExportInfo | undefined }> {
    const replies = await this.option(opt, W.goData(name, infos));
    const parsed = replies.filter((r) => r.type === W.Rep.NBD_REP_INFO).map((r) => W.parseInfo(r.data));
    const exportInfo = parsed.find((i): i is Extract<W.ParsedInfo, { type: 0 }> => i.type === 0 && 'size' in i);
    const last = replies[replies.length - 1];
    return {
      replies,
      infos: parsed,
      export:
        last?.type === W.Rep.NBD_REP_ACK && exportInfo !== undefined
          ? { size: Number(exportInfo.size), flags: exportInfo.transmissionFlags }
          : undefined,
    };
  }

  // ---- transmission -----------------------------------------------------------------------

  sendRequest(fields: W.RequestFields): boolean {
    if (fields.type === W.Cmd.NBD_CMD_READ) {
      this.#pendingReads.set(fields.cookie.toString('hex'), fields.length ?? 0);
    }
    return this.send(W.request(fields));
  }

  /** Reads one reply message: a simple reply (with its READ payload) or one structured chunk. */
  async readReplyMessage(timeoutMs = this.timeoutMs): Promise<ReplyMessage> {
    const magicBytes = await this.readExactly(4, timeoutMs);
    const magic = magicBytes.readUInt32BE(0);
    if (magic === W.NBD_SIMPLE_REPLY_MAGIC) {
      const rest = await this.readExactly(W.SIMPLE_REPLY_HEADER_LENGTH - 4, timeoutMs);
      const header = W.parseSimpleReplyHeader(Buffer.concat([magicBytes, rest]));
      const key = header.cookie.toString('hex');
      const readLength = this.#pendingReads.get(key);
      this.#pendingReads.delete(key);
      let data: Buffer | undefined;
      if (header.error === 0 && readLength !== undefined && !this.structured) {
        data = await this.readExactly(readLength, timeoutMs);
      }
      return { kind: 'simple', magic, error: header.error, cookie: header.cookie, data };
    }
    if (magic === W.NBD_STRUCTURED_REPLY_MAGIC) {
      const rest = await this.readExactly(W.CHUNK_HEADER_LENGTH - 4, timeoutMs);
      const header = W.parseChunkHeader(Buffer.concat([magicBytes, rest]));
      const payload = header.length === 0 ? Buffer.alloc(0) : await this.readExactly(header.length, timeoutMs);
      if ((header.flags & W.NBD_REPLY_FLAG_DONE) !== 0) this.#pendingReads.delete(header.cookie.toString('hex'));
      return { kind: 'chunk', magic, flags: header.flags, type: header.type, cookie: header.cookie, payload };
    }
    throw new Error(`reply magic 0x${magic.toString(16)} is neither simple nor structured`);
  }

  /**
   * Reads messages until every cookie in `cookies` has its final message (a simple reply or a
   * chunk with DONE). Returns messages grouped by cookie (hex) and the cookies in completion order.
   * With `keepPayload: false`, payloads are read and dropped (for bulk traffic).
   */
  async collect(
    cookies: readonly Buffer[],
    options: { timeoutMs?: number; keepPayload?: boolean } = {},
  ): Promise<{ byCookie: Map<string, ReplyMessage[]>; completionOrder: string[] }> {
    const wanted = new Set(cookies.map((c) => c.toString('hex')));
    const byCookie = new Map<string, ReplyMessage[]>();
    const completionOrder: string[] = [];
    while (wanted.size > 0) {
      let message = await this.readReplyMessage(options.timeoutMs);
      const key = message.cookie.toString('hex');
      if (!wanted.has(key)) throw new Error(`reply for unexpected cookie ${key}`);
      if (options.keepPayload === false) {
        message =
          message.kind === 'simple' ? { ...message, data: undefined } : { ...message, payload: Buffer.alloc(0) };
      }
      const list = byCookie.get(key) ?? [];
      list.push(message);
      byCookie.set(key, list);
      if (message.kind === 'simple' || (message.flags & W.NBD_REPLY_FLAG_DONE) !== 0) {
        wanted.delete(key);
        completionOrder.push(key);
      }
    }
    return { byCookie, completionOrder };
  }

  /** Sends one request and returns every message of its reply. */
  async roundTrip(fields: W.RequestFields, timeoutMs = this.timeoutMs): Promise<ReplyMessage[]> {
    this.sendRequest(fields);
    const { byCookie } = await this.collect([fields.cookie], { timeoutMs });
    return byCookie.get(fields.cookie.toString('hex')) ?? [];
  }

  #take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const head = this.#chunks[0];
      if (head === undefined) throw new Error('RawPeer: buffer accounting broke');
      const used = Math.min(head.length, n - filled);
      head.copy(out, filled, 0, used);
      filled += used;
      if (used === head.length) this.#chunks.shift();
      else this.#chunks[0] = head.subarray(used);
    }
    this.#buffered -= n;
    return out;
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #waitForEvent(deadline: number, describe: () => string): Promise<void> {
    return new Promise((resolve, reject) => {
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        reject(new PeerTimeoutError(describe()));
        return;
      }
      const timer = setTimeout(() => {
        this.#wake = undefined;
        reject(new PeerTimeoutError(describe()));
      }, remaining);
      this.#wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}

export function isFinalOptionReply(type: number): boolean {
  return (
    type !== W.Rep.NBD_REP_INFO && type !== W.Rep.NBD_REP_SERVER && type !== W.Rep.NBD_REP_META_CONTEXT
  );
}

export interface TransmissionOptions {
  exportName: string;
  structured?: boolean;
  /** Queries for NBD_OPT_SET_META_CONTEXT (needs `structured`). */
  metaContexts?: readonly string[];
  infos?: readonly number[];
  clientFlags?: number;
  timeoutMs?: number;
}

export interface Transmission {
  peer: RawPeer;
  export: ExportInfo;
  /** Context name → ID from NBD_OPT_SET_META_CONTEXT. */
  contextIds: Map<string, number>;
  infos: W.ParsedInfo[];
}

/** Connects and negotiates (fixed newstyle, optional structured replies and contexts, then GO). */
export async function openTransmission(target: PeerTarget, options: TransmissionOptions): Promise<Transmission> {
  const peer = await RawPeer.connect(target, options.timeoutMs);
  try {
    await peer.startHandshake(options.clientFlags);
    if (options.structured === true) {
      const replies = await peer.option(W.Opt.NBD_OPT_STRUCTURED_REPLY);
      if (replies[0]?.type !== W.Rep.NBD_REP_ACK) throw new Error('structured replies refused');
      peer.structured = true;
    }
    const contextIds = new Map<string, number>();
    if (options.metaContexts !== undefined) {
      const replies = await peer.option(
        W.Opt.NBD_OPT_SET_META_CONTEXT,
        W.metaContextData(options.exportName, options.metaContexts),
      );
      for (const reply of replies) {
        if (reply.type === W.Rep.NBD_REP_META_CONTEXT) {
          const context = W.parseMetaContext(reply.data);
          contextIds.set(context.name.toString('utf8'), context.id);
        }
      }
      if (replies[replies.length - 1]?.type !== W.Rep.NBD_REP_ACK) throw new Error('SET_META_CONTEXT failed');
    }
    const result = await peer.go(options.exportName, options.infos);
    if (result.export === undefined) {
      throw new Error(`GO ${options.exportName} failed with reply type ${result.replies.at(-1)?.type}`);
    }
    return { peer, export: result.export, contextIds, infos: result.infos };
  } catch (error) {
    peer.destroy();
    throw error;
  }
}

/** A READ's reply decoded and checked against the structured-reply rules (fact 16). */
export interface DecodedRead {
  /** Nonzero NBD error from a simple reply or the first error chunk; 0 on success. */
  error: number;
  /** The bytes read (holes as zeros), only when successful. */
  data: Buffer | undefined;
  dataChunks: number;
  holeChunks: number;
  errorChunks: W.ErrorChunk[];
  /** Rule violations found (empty when the reply is well-formed). */
  problems: string[];
}

export function decodeRead(messages: readonly ReplyMessage[], offset: number, length: number): DecodedRead {
  const problems: string[] = [];
  const result: DecodedRead = { error: 0, data: undefined, dataChunks: 0, holeChunks: 0, errorChunks: [], problems };
  const first = messages[0];
  if (first === undefined) {
    problems.push('no reply');
    return result;
  }
  if (first.kind === 'simple') {
    if (messages.length !== 1) problems.push('more than one simple reply');
    result.error = first.error;
    if (first.error === 0) {
      if (first.data?.length !== length) problems.push(`simple READ carried ${first.data?.length} bytes`);
      result.data = first.data;
    }
    return result;
  }
  const image = Buffer.alloc(length);
  const covered: Array<[number, number]> = [];
  const claim = (start: number, size: number, what: string): boolean => {
    if (start < offset || start + size > offset + length) {
      problems.push(`${what} [${start}, ${start + size}) outside the request [${offset}, ${offset + length})`);
      return false;
    }
    for (const [s, e] of covered) {
      if (start < e && s < start + size) problems.push(`${what} [${start}, ${start + size}) overlaps [${s}, ${e})`);
    }
    covered.push([start, start + size]);
    return true;
  };
  messages.forEach((message, index) => {
    if (message.kind !== 'chunk') {
      problems.push('simple reply mixed into a structured reply');
      return;
    }
    const last = index === messages.length - 1;
    const done = (message.flags & W.NBD_REPLY_FLAG_DONE) !== 0;
    if (done !== last) problems.push(`DONE flag ${done ? 'set on a non-final' : 'missing on the final'} chunk`);
    switch (message.type) {
      case W.ReplyType.NBD_REPLY_TYPE_NONE:
        if (message.payload.length !== 0) problems.push('NONE chunk with a payload');
        if (!done) problems.push('NONE chunk without DONE');
        break;
      case W.ReplyType.NBD_REPLY_TYPE_OFFSET_DATA: {
        const chunk = W.parseOffsetData(message.payload);
        result.dataChunks++;
        const start = Number(chunk.offset);
        if (claim(start, chunk.data.length, 'OFFSET_DATA')) chunk.data.copy(image, start - offset);
        break;
      }
      case W.ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const chunk = W.parseOffsetHole(message.payload);
        result.holeChunks++;
        if (chunk.size === 0) problems.push('OFFSET_HOLE of size 0');
        claim(Number(chunk.offset), chunk.size, 'OFFSET_HOLE');
        break;
      }
      default:
        if (W.isErrorChunkType(message.type)) {
          const chunk = W.parseErrorChunk(message.type, message.payload);
          if (chunk.error === 0) problems.push('error chunk with error value 0');
          if (!W.isValidNbdString(chunk.message)) problems.push('error message is not a valid NBD string');
          result.errorChunks.push(chunk);
          if (result.error === 0) result.error = chunk.error === 0 ? W.Errno.NBD_EINVAL : chunk.error;
        } else {
          problems.push(`unexpected chunk type ${message.type} in a READ reply`);
        }
    }
  });
  if (result.error === 0) {
    covered.sort((a, b) => a[0] - b[0]);
    let at = offset;
    for (const [s, e] of covered) {
      if (s > at) break;
      at = Math.max(at, e);
    }
    if (at < offset + length) problems.push(`successful READ covered only up to ${at} of ${offset + length}`);
    result.data = image;
  }
  return result;
}

/** The error of a non-READ reply: a simple reply's error or the first error chunk's (0 = success). */
export function replyError(messages: readonly ReplyMessage[]): number {
  for (const message of messages) {
    if (message.kind === 'simple') return message.error;
    if (W.isErrorChunkType(message.type)) return W.parseErrorChunk(message.type, message.payload).error;
  }
  return 0;
}

/** Resolves as `promise` does, or rejects with a PeerTimeoutError naming `what` after `ms`. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new PeerTimeoutError(`${what} did not happen within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
