/**
 * NbdClient: one connection to one export, pipelined.
 *
 * Every request gets a fresh cookie (an incrementing counter) and a pending entry; replies are
 * matched by cookie in whatever order the server sends them. A structured reply's chunks are
 * collected until the chunk flagged DONE, then the request settles: rejected with the first
 * error chunk if there was one, else resolved with the content chunks.
 *
 * States: open -> (disconnect() sent DISC | the socket failed) -> closed. Once closed, every
 * pending request is rejected with the reason and new requests fail at once. A server error
 * reply fails only its request; a framing violation by the server closes the connection.
 *
 * Backpressure: when socket.write() returns false, later requests wait in `#outbox` until
 * 'drain', so the socket's buffer never grows past its high-water mark by more than one request.
 */
import type { Socket } from 'node:net';
import * as C from '../src/nbd/constants.js';
import {
  NbdProtocolError,
  ReplyFramer,
  encodeRequest,
  errorCodeForNbdError,
  type BlockSizeInfo,
  type Reply,
  type StructuredChunk,
} from '../src/nbd/client-codec.js';
import { NbdError } from './errors.js';
import { HandshakeSession, closeSocket, openSocket, type ExportInfoResult, type Negotiated } from './handshake.js';
import type { NbdTarget } from './uri.js';

export interface ConnectOptions {
  exportName: string;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Meta contexts to select when structured replies are on (default ['base:allocation']). */
  metaContexts?: string[];
  /** Ask to drop the 124 zero bytes after EXPORT_NAME when the server allows it (default true). */
  noZeroes?: boolean;
}

export type ReadChunk = { type: 'data'; offset: number; data: Buffer } | { type: 'hole'; offset: number; length: number };

export interface Extent {
  length: number;
  /** `base:allocation` flags: NBD_STATE_HOLE (1), NBD_STATE_ZERO (2). */
  flags: number;
}

export interface ExportListEntry {
  name: string;
  description: string;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  chunks: StructuredChunk[];
  error: { errno: number; message: string } | undefined;
  resolve: (chunks: StructuredChunk[]) => void;
  reject: (error: Error) => void;
}

function asNbdError(error: unknown): Error {
  if (error instanceof NbdProtocolError) return new NbdError('EPROTO', error.message, { cause: error });
  return error as Error;
}

export class NbdClient {
  readonly exportName: string;
  readonly size: number;
  /** Transmission flags as the server sent them. */
  readonly flags: number;
  readonly structuredReplies: boolean;
  /** Selected meta contexts, name -> id. */
  readonly metaContexts: ReadonlyMap<string, number>;
  readonly blockSizes: BlockSizeInfo | undefined;
  readonly description: string | undefined;

  readonly #socket: Socket;
  readonly #framer: ReplyFramer;
  readonly #pending = new Map<bigint, Pending>();
  #nextCookie = 1n;
  #outbox: Buffer[][] = [];
  #writeBlocked = false;
  #outboxWaiters: (() => void)[] = [];
  #closedReason: NbdError | undefined;
  #disconnecting = false;
  readonly #closed: Promise<void>;

  private constructor(socket: Socket, negotiated: Negotiated, leftover: Buffer) {
    this.exportName = negotiated.exportName;
    this.size = negotiated.size;
    this.flags = negotiated.flags;
    this.structuredReplies = negotiated.structuredReplies;
    this.metaContexts = negotiated.metaContexts;
    this.blockSizes = negotiated.blockSizes;
    this.description = negotiated.description;
    this.#socket = socket;
    this.#framer = new ReplyFramer((cookie) => {
      const pending = this.#pending.get(cookie);
      if (pending === undefined) return undefined;
      return pending.type === C.NBD_CMD_READ ? pending.length : 0;
    });
    this.#closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('drain', () => this.#onDrain());
    socket.on('error', (error) => this.#fail(new NbdError('ECONNRESET', `connection failed: ${error.message}`, { cause: error })));
    socket.on('close', () => this.#fail(new NbdError('ECONNRESET', 'connection closed')));
    if (leftover.length > 0) this.#onData(leftover);
  }

  static async connect(target: NbdTarget, options: ConnectOptions): Promise<NbdClient> {
    const socket = await openSocket(target);
    try {
      const session = new HandshakeSession(socket);
      await session.greet(options.noZeroes ?? true);
      const structuredReplies = (options.structuredReplies ?? true) && (await session.structuredReply());
      const queries = options.metaContexts ?? [C.BASE_ALLOCATION];
      const metaContexts =
        structuredReplies && queries.length > 0
          ? await session.setMetaContext(options.exportName, queries)
          : new Map<string, number>();
      let negotiated: Negotiated;
      try {
        const info = await session.exportInfo(C.NBD_OPT_GO, options.exportName);
        negotiated = { ...info, exportName: info.name, structuredReplies, metaContexts };
      } catch (error) {
        if (!(error instanceof NbdError && error.replyType === C.NBD_REP_ERR_UNSUP)) throw error;
        const reply = await session.exportName(options.exportName);
        negotiated = {
          exportName: options.exportName,
          ...reply,
          structuredReplies,
          metaContexts,
          blockSizes: undefined,
          description: undefined,
        };
      }
      return new NbdClient(socket, negotiated, session.reader.detach());
    } catch (error) {
      socket.destroy();
      throw asNbdError(error);
    }
  }

  /** The server's exports (NBD_OPT_LIST), then NBD_OPT_ABORT. */
  static async list(target: NbdTarget): Promise<ExportListEntry[]> {
    return NbdClient.#optionsOnly(target, (session) => session.list());
  }

  /** One export's details (NBD_OPT_INFO), then NBD_OPT_ABORT. */
  static async info(target: NbdTarget, exportName: string): Promise<ExportInfoResult> {
    return NbdClient.#optionsOnly(target, (session) => session.exportInfo(C.NBD_OPT_INFO, exportName));
  }

  static async #optionsOnly<T>(target: NbdTarget, run: (session: HandshakeSession) => Promise<T>): Promise<T> {
    const socket = await openSocket(target);
    try {
      const session = new HandshakeSession(socket);
      await session.greet(true);
      const result = await run(session);
      await session.abort();
      return result;
    } catch (error) {
      socket.destroy();
      throw asNbdError(error);
    }
  }

  #has(flag: number): boolean {
    return (this.flags & flag) !== 0;
  }

  get canWrite(): boolean {
    return !this.#has(C.NBD_FLAG_READ_ONLY);
  }
  get canFlush(): boolean {
    return this.#has(C.NBD_FLAG_SEND_FLUSH);
  }
  get canFua(): boolean {
    return this.#has(C.NBD_FLAG_SEND_FUA);
  }
  get canTrim(): boolean {
    return this.#has(C.NBD_FLAG_SEND_TRIM);
  }
  get canZero(): boolean {
    return this.#has(C.NBD_FLAG_SEND_WRITE_ZEROES);
  }
  get canFastZero(): boolean {
    return this.#has(C.NBD_FLAG_SEND_FAST_ZERO);
  }
  get canDf(): boolean {
    return this.structuredReplies && this.#has(C.NBD_FLAG_SEND_DF);
  }
  get canMultiConn(): boolean {
    return this.#has(C.NBD_FLAG_CAN_MULTI_CONN);
  }
  get canCache(): boolean {
    return this.#has(C.NBD_FLAG_SEND_CACHE);
  }
  /** The connection is gone (disconnected or failed). */
  get closed(): boolean {
    return this.#closedReason !== undefined;
  }
  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** The content chunks of a READ as the server sent them (a simple reply is one data chunk). */
  async readChunks(offset: number, length: number, options: { df?: boolean } = {}): Promise<ReadChunk[]> {
    const chunks = await this.#request(C.NBD_CMD_READ, options.df === true ? C.NBD_CMD_FLAG_DF : 0, offset, length);
    const content: ReadChunk[] = [];
    for (const chunk of chunks) {
      if (chunk.type !== 'data' && chunk.type !== 'hole') {
        throw new NbdError('EPROTO', `unexpected ${chunk.type} chunk in a READ reply`);
      }
      const chunkLength = chunk.type === 'data' ? chunk.data.length : chunk.length;
      if (chunk.offset < offset || chunk.offset + chunkLength > offset + length) {
        throw new NbdError('EPROTO', `READ chunk [${chunk.offset}, +${chunkLength}) outside the request`);
      }
      content.push(chunk);
    }
    return content;
  }

  async read(offset: number, length: number, options: { df?: boolean } = {}): Promise<Buffer> {
    const chunks = await this.readChunks(offset, length, options);
    const only = chunks[0];
    if (chunks.length === 1 && only?.type === 'data' && only.offset === offset && only.data.length === length) {
      return only.data;
    }
    const result = Buffer.alloc(length);
    const sorted = [...chunks].sort((a, b) => a.offset - b.offset);
    let covered = offset;
    for (const chunk of sorted) {
      if (chunk.offset !== covered) throw new NbdError('EPROTO', `READ reply leaves a gap or overlap at ${covered}`);
      if (chunk.type === 'data') {
        chunk.data.copy(result, chunk.offset - offset);
        covered += chunk.data.length;
      } else {
        covered += chunk.length;
      }
    }
    if (covered !== offset + length) throw new NbdError('EPROTO', `READ reply covers only up to ${covered}`);
    return result;
  }

  async write(offset: number, data: Uint8Array, options: { fua?: boolean } = {}): Promise<void> {
    const payload = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    await this.#request(C.NBD_CMD_WRITE, fuaFlag(options), offset, payload.length, payload);
  }

  async trim(offset: number, length: number, options: { fua?: boolean } = {}): Promise<void> {
    await this.#request(C.NBD_CMD_TRIM, fuaFlag(options), offset, length);
  }

  async zero(offset: number, length: number, options: { noHole?: boolean; fastZero?: boolean; fua?: boolean } = {}): Promise<void> {
    const flags =
      fuaFlag(options) |
      (options.noHole === true ? C.NBD_CMD_FLAG_NO_HOLE : 0) |
      (options.fastZero === true ? C.NBD_CMD_FLAG_FAST_ZERO : 0);
    await this.#request(C.NBD_CMD_WRITE_ZEROES, flags, offset, length);
  }

  async flush(): Promise<void> {
    await this.#request(C.NBD_CMD_FLUSH, 0, 0, 0);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.#request(C.NBD_CMD_CACHE, 0, offset, length);
  }

  /** `base:allocation` extents from `offset`; the last may reach past the requested length. */
  async blockStatus(offset: number, length: number, options: { reqOne?: boolean } = {}): Promise<Extent[]> {
    const contextId = this.metaContexts.get(C.BASE_ALLOCATION);
    if (contextId === undefined) {
      throw new NbdError('ENOTSUP', 'base:allocation was not negotiated on this connection');
    }
    const flags = options.reqOne === true ? C.NBD_CMD_FLAG_REQ_ONE : 0;
    const chunks = await this.#request(C.NBD_CMD_BLOCK_STATUS, flags, offset, length);
    for (const chunk of chunks) {
      if (chunk.type === 'block-status' && chunk.contextId === contextId) return chunk.extents;
    }
    throw new NbdError('EPROTO', 'BLOCK_STATUS reply has no chunk for base:allocation');
  }

  /** Sends NBD_CMD_DISC and resolves once the server has closed the connection. */
  async disconnect(): Promise<void> {
    if (this.#closedReason === undefined && !this.#disconnecting) {
      this.#disconnecting = true;
      this.#send([encodeRequest({ flags: 0, type: C.NBD_CMD_DISC, cookie: this.#takeCookie(), offset: 0, length: 0 })]);
      await this.#whenOutboxEmpty();
      await closeSocket(this.#socket);
    }
    await this.#closed;
  }

  /** Drops the connection without DISC; pending requests fail with ECONNRESET. */
  destroy(): void {
    this.#socket.destroy();
  }

  #takeCookie(): bigint {
    const cookie = this.#nextCookie;
    this.#nextCookie += 1n;
    return cookie;
  }

  #request(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<StructuredChunk[]> {
    if (this.#closedReason !== undefined) return Promise.reject(this.#closedReason);
    if (this.#disconnecting) return Promise.reject(new NbdError('ESHUTDOWN', 'client is disconnecting'));
    return new Promise((resolve, reject) => {
      const cookie = this.#takeCookie();
      this.#pending.set(cookie, { type, offset, length, chunks: [], error: undefined, resolve, reject });
      const header = encodeRequest({ flags, type, cookie, offset, length });
      this.#send(payload === undefined || payload.length === 0 ? [header] : [header, payload]);
    });
  }

  #send(parts: Buffer[]): void {
    if (this.#writeBlocked) {
      this.#outbox.push(parts);
      return;
    }
    this.#writeNow(parts);
  }

  #writeNow(parts: Buffer[]): void {
    const socket = this.#socket;
    let accepted = true;
    if (parts.length === 1) {
      accepted = socket.write(parts[0]!);
    } else {
      socket.cork();
      for (const part of parts) accepted = socket.write(part);
      socket.uncork();
    }
    if (!accepted) this.#writeBlocked = true;
  }

  #onDrain(): void {
    this.#writeBlocked = false;
    while (!this.#writeBlocked && this.#outbox.length > 0) this.#writeNow(this.#outbox.shift()!);
    if (this.#outbox.length === 0) this.#wakeOutboxWaiters();
  }

  #whenOutboxEmpty(): Promise<void> {
    if (this.#outbox.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.#outboxWaiters.push(resolve));
  }

  #wakeOutboxWaiters(): void {
    const waiters = this.#outboxWaiters;
    this.#outboxWaiters = [];
    for (const wake of waiters) wake();
  }

  #onData(chunk: Buffer): void {
    if (this.#closedReason !== undefined) return;
    let replies: Reply[];
    try {
      replies = this.#framer.feed(chunk);
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      this.#fail(new NbdError('EPROTO', `server broke reply framing: ${reason}`, { cause: error }));
      this.#socket.destroy();
      return;
    }
    for (const reply of replies) this.#onReply(reply);
  }

  #onReply(reply: Reply): void {
    const pending = this.#pending.get(reply.cookie);
    if (pending === undefined) {
      this.#protocolFailure(`reply to unknown cookie ${reply.cookie}`);
      return;
    }
    if (reply.kind === 'simple') {
      this.#pending.delete(reply.cookie);
      if (reply.error !== 0) {
        pending.reject(serverError(reply.error, ''));
      } else if (pending.type === C.NBD_CMD_READ) {
        pending.resolve([{ type: 'data', offset: pending.offset, data: reply.data }]);
      } else {
        pending.resolve([]);
      }
      return;
    }
    const { chunk } = reply;
    if (chunk.type === 'unknown') {
      // The spec asks for a hard disconnect on an unknown chunk type that is not an error.
      this.#protocolFailure(`unknown structured reply type ${chunk.replyType}`);
      return;
    }
    if (chunk.type === 'error') pending.error ??= { errno: chunk.error, message: chunk.message };
    else if (chunk.type !== 'none') pending.chunks.push(chunk);
    if (!reply.done) return;
    this.#pending.delete(reply.cookie);
    if (pending.error !== undefined) pending.reject(serverError(pending.error.errno, pending.error.message));
    else pending.resolve(pending.chunks);
  }

  #protocolFailure(message: string): void {
    this.#fail(new NbdError('EPROTO', message));
    this.#socket.destroy();
  }

  #fail(reason: NbdError): void {
    if (this.#closedReason !== undefined) return;
    this.#closedReason = reason;
    this.#outbox = [];
    this.#wakeOutboxWaiters();
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const request of pending) request.reject(reason);
  }
}

function fuaFlag(options: { fua?: boolean }): number {
  return options.fua === true ? C.NBD_CMD_FLAG_FUA : 0;
}

function serverError(errno: number, message: string): NbdError {
  const code = errorCodeForNbdError(errno);
  return new NbdError(code, message === '' ? `server replied ${code} (${errno})` : `${code}: ${message}`, { errno });
}
