/**
 * One NBD connection: drives the sans-IO handshake and request parser from `src/nbd/` over a
 * socket, runs requests against the export's BlockDevice concurrently, and answers each as it
 * completes (out of order).
 *
 * Memory per connection is bounded: requests in flight are capped by count and by bytes (a
 * request's bytes stay counted until its reply has left the socket), and reading pauses while
 * the cap is reached or the socket's write side is backed up. Besides that, at most one WRITE
 * payload (≤ maxPayload) is being received.
 *
 *   handshake ──► opening ──► transmission ──► draining (DISC, shutdown) ──► closed
 *     │    ▲
 *     ▼    │ secured (options start afresh)
 *      tls
 *
 * STARTTLS: once its ACK is written, not one more plain byte is read as NBD. Bytes that arrived
 * behind the STARTTLS option were sent before the client could see the ACK, so the connection is
 * dropped for them; anything arriving later belongs to the TLS handshake. From then on every byte
 * both ways goes through the TLS socket. The handshake deadline runs from accept to transmission,
 * the TLS handshake included.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import {
  BASE_ALLOCATION_ID,
  ByteQueue,
  RequestParser,
  ServerHandshake,
  blockStatusChunk,
  errorChunk,
  nbdErrorFor,
  noneChunk,
  offsetDataHeader,
  offsetHoleChunk,
  simpleReply,
  type HandshakeCatalog,
  type HandshakeOptions,
  type NbdRequest,
  type NegotiatedExport,
  type StatusDescriptor,
} from '../nbd/index.js';
import * as C from '../nbd/constants.js';
import type { BlockDevice, ExportCatalog, ReadPiece } from '../store/types.js';
import { adoptAccepted } from './adopt-socket.js';
import type { BusyPoll } from './busy-poll.js';
import type { BufferPool } from '../util/buffer-pool.js';
import type { ExportMetrics, ServerMetrics } from './metrics.js';
import { OperationError } from '../util/errors.js';
import type { Peer } from './access.js';
import type { SessionLimits } from './limits.js';
import type { SecuredSocket, TlsUpgrader } from './tls.js';

export interface SessionContext {
  catalog: ExportCatalog;
  logger: Logger;
  limits: SessionLimits;
  /** Its catalog is what the peer sees before TLS, or without it. */
  handshake: HandshakeOptions;
  /** Present when the handshake may acknowledge STARTTLS. */
  tls?: TlsUpgrader;
  /** What a peer that proved itself over TLS sees. */
  catalogFor: (peer: Peer) => HandshakeCatalog;
  metrics?: ServerMetrics;
  busyPoll?: BusyPoll;
  /** Where WRITE payloads and READ replies get their buffers, shared by all connections. */
  buffers: BufferPool;
  /**
   * Where plain reads land, shared by all connections: each read is parsed, and what is left of
   * it copied out, before the next read anywhere can happen.
   */
  readScratch: Buffer;
}

/** A payload with at least this much still to come is read from the socket straight into place. */
const DIRECT_READ_MIN = 64 * 1024;

const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [C.NBD_CMD_READ]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_DF,
  [C.NBD_CMD_WRITE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_DISC]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_FLUSH]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_TRIM]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_CACHE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_WRITE_ZEROES]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO,
  [C.NBD_CMD_BLOCK_STATUS]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_REQ_ONE,
};

type Phase = 'handshake' | 'tls' | 'opening' | 'transmission' | 'draining' | 'closed';

/** A request refused before it reached storage. */
class RequestRejected {
  constructor(
    readonly error: number,
    readonly message: string,
  ) {}
}

export class Session {
  /** The accepted connection; its 'close' is the end of the session. */
  readonly #raw: Socket;
  /** Where NBD bytes go: `#raw`, or the TLS socket over it after STARTTLS. */
  #socket: Socket;
  readonly #context: SessionContext;
  readonly #log: Logger;
  readonly #queue = new ByteQueue();
  readonly #handshake: ServerHandshake;
  readonly #parser: RequestParser;
  readonly #closed: Promise<void>;
  #phase: Phase = 'handshake';
  #negotiated: NegotiatedExport | undefined;
  #device: BlockDevice | undefined;
  #metrics: ExportMetrics | undefined;
  #inFlightRequests = 0;
  #inFlightBytes = 0;
  #writeBlocked = false;
  #shuttingDown = false;
  #drainWaiters: (() => void)[] = [];
  /** Replies of one event-loop turn go out in one writev: the socket stays corked until then. */
  #corked = false;
  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };
  #handshakeTimer: NodeJS.Timeout | undefined;
  readonly #onData = (chunk: Buffer): void => {
    this.#context.busyPoll?.touch();
    this.#queue.push(chunk);
    this.#pump();
  };
  /** Reads land in the shared scratch buffer, or straight in a large payload's remaining space. */
  #readTarget(): Uint8Array {
    if (this.#phase === 'transmission' && this.#queue.length === 0) {
      const space = this.#parser.payloadSpace(DIRECT_READ_MIN);
      if (space !== undefined) return space;
    }
    return this.#context.readScratch;
  }

  #onRead(count: number, buffer: Uint8Array): void {
    this.#context.busyPoll?.touch();
    if (buffer !== this.#context.readScratch) {
      this.#parser.payloadReceived(count);
      this.#pump();
      return;
    }
    this.#queue.push(Buffer.from(buffer.buffer, buffer.byteOffset, count));
    this.#pump();
    this.#queue.detach();
  }

  readonly #onDrain = (): void => {
    this.#writeBlocked = false;
    this.#pump();
  };

  /** `accepted` must be paused (the server's pauseOnConnect). */
  constructor(accepted: Socket, context: SessionContext, id: number) {
    this.#context = context;
    this.#log = context.logger.child({ conn: id });
    this.#handshake = new ServerHandshake(context.handshake);
    this.#parser = new RequestParser(context.limits.maxPayload, (length) => context.buffers.acquire(length));
    const adopted = adoptAccepted(accepted, {
      buffer: () => this.#readTarget(),
      callback: (count, buffer) => this.#onRead(count, buffer),
    });
    const socket = adopted ?? accepted;
    this.#raw = socket;
    this.#socket = socket;
    this.#closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.setNoDelay(true);
    if (adopted === undefined) {
      socket.on('data', this.#onData);
      socket.resume();
    }
    socket.on('drain', this.#onDrain);
    socket.on('error', (error) => this.#log.debug({ err: error }, 'socket error'));
    socket.on('close', () => void this.#finish());
    if (context.limits.handshakeTimeoutMs > 0) {
      this.#handshakeTimer = setTimeout(() => {
        this.#log.info({ seconds: context.limits.handshakeTimeoutMs / 1000 }, 'handshake not finished in time; dropping the connection');
        this.#abort();
      }, context.limits.handshakeTimeoutMs);
    }
    this.#log.info({ remote: socket.remoteAddress ?? 'unix' }, 'connection opened');
    socket.write(this.#handshake.greeting());
  }

  get closed(): Promise<void> {
    return this.#closed;
  }

  get inFlightRequests(): number {
    return this.#inFlightRequests;
  }

  /** The export this connection has selected, once the handshake has chosen one. */
  get exportName(): string | undefined {
    return this.#phase === 'closed' ? undefined : this.#negotiated?.export.name;
  }

  /** Graceful end: refuse new work, finish what is in flight, flush, close. */
  async shutdown(): Promise<void> {
    this.#shuttingDown = true;
    if (this.#phase === 'tls') {
      this.#abort();
    } else if (this.#phase === 'handshake' || this.#phase === 'opening') {
      this.#endSocket();
    } else if (this.#phase === 'transmission') {
      await this.#drainAndClose();
    }
    await this.#closed;
  }

  #pump(): void {
    if (this.#phase === 'handshake') {
      const step = this.#handshake.advance(this.#queue);
      for (const bytes of step.output) this.#socket.write(bytes);
      if (step.outcome?.kind === 'close') {
        this.#log.info({ reason: step.outcome.reason }, 'handshake ended');
        this.#phase = 'closed';
        this.#socket.end();
      } else if (step.outcome?.kind === 'starttls') {
        void this.#startTls();
      } else if (step.outcome?.kind === 'transmission') {
        this.#negotiated = step.outcome.negotiated;
        this.#phase = 'opening';
        this.#socket.pause();
        void this.#open(step.outcome.negotiated);
      }
      return;
    }
    if (this.#phase !== 'transmission') return;
    while (!this.#atCapacity()) {
      const result = this.#parser.next(this.#queue);
      if (result === undefined) break;
      if (result.kind === 'fatal') {
        this.#log.warn({ reason: result.reason }, 'protocol violation; closing connection');
        this.#phase = 'closed';
        this.#socket.destroy();
        return;
      }
      if (result.request.type === C.NBD_CMD_DISC) {
        this.#log.debug('client disconnect request');
        void this.#drainAndClose();
        return;
      }
      this.#dispatch(result.request);
    }
    if (this.#atCapacity()) this.#socket.pause();
    else this.#socket.resume();
  }

  #atCapacity(): boolean {
    const limits = this.#context.limits;
    return (
      this.#writeBlocked ||
      this.#inFlightRequests >= limits.maxInFlightRequests ||
      this.#inFlightBytes >= limits.maxInFlightBytes
    );
  }

  /** Drops the connection at once, TLS or not. */
  #abort(): void {
    this.#phase = 'closed';
    this.#socket.destroy();
    this.#raw.destroy();
  }

  async #startTls(): Promise<void> {
    const upgrader = this.#context.tls;
    if (upgrader === undefined) {
      this.#log.error('STARTTLS was acknowledged on a connection without TLS credentials');
      this.#abort();
      return;
    }
    if (this.#queue.length > 0) {
      this.#log.warn({ bytes: this.#queue.length }, 'plain bytes sent behind STARTTLS; dropping the connection');
      this.#abort();
      return;
    }
    this.#phase = 'tls';
    const raw = this.#raw;
    raw.off('data', this.#onData);
    raw.off('drain', this.#onDrain);
    raw.pause();
    let secured: SecuredSocket;
    try {
      secured = await upgrader.upgrade(raw);
    } catch (error) {
      this.#log.info({ err: error }, 'TLS handshake failed');
      this.#abort();
      return;
    }
    const socket = secured.socket;
    if (this.#phase !== 'tls') {
      socket.destroy();
      return;
    }
    this.#socket = socket;
    this.#writeBlocked = false;
    socket.on('data', this.#onData);
    socket.on('drain', this.#onDrain);
    socket.on('error', (error) => this.#log.debug({ err: error }, 'TLS socket error'));
    socket.on('close', () => raw.destroy());
    this.#handshake.secured(this.#context.catalogFor(secured.peer));
    this.#phase = 'handshake';
    this.#log.info({ protocol: secured.protocol, cipher: secured.cipher, peer: secured.peer.names }, 'TLS established');
    this.#pump();
  }

  async #open(negotiated: NegotiatedExport): Promise<void> {
    try {
      this.#device = await this.#context.catalog.open(negotiated.export.name);
    } catch (error) {
      this.#log.warn({ err: error, export: negotiated.export.name }, 'export could not be opened');
      this.#phase = 'closed';
      this.#socket.destroy();
      return;
    }
    if (this.#phase !== 'opening') {
      await this.#device.close();
      return;
    }
    this.#log.info(
      { export: negotiated.export.name, structured: negotiated.structuredReplies },
      'transmission started',
    );
    this.#metrics = this.#context.metrics?.forExport(negotiated.export.name);
    this.#phase = 'transmission';
    clearTimeout(this.#handshakeTimer);
    const idleMs = this.#context.limits.idleTimeoutMs;
    if (idleMs > 0) this.#socket.setTimeout(idleMs, () => this.#onIdle(idleMs));
    this.#socket.resume();
    this.#pump();
  }

  /** No bytes either way for the idle timeout: close, unless requests are still being served. */
  #onIdle(idleMs: number): void {
    if (this.#phase !== 'transmission' || this.#inFlightRequests > 0) return;
    this.#log.info({ seconds: idleMs / 1000 }, 'connection idle; closing it');
    void this.#drainAndClose();
  }

  async #drainAndClose(): Promise<void> {
    if (this.#phase !== 'transmission') return;
    this.#phase = 'draining';
    this.#socket.pause();
    await this.#whenDrained();
    try {
      await this.#device?.flush();
    } catch (error) {
      this.#log.error({ err: error }, 'flush at disconnect failed');
    }
    this.#endSocket();
  }

  /** Closes our side once every reply has left, without waiting for the client to close its side. */
  #endSocket(): void {
    this.#socket.end(() => this.#socket.destroy());
  }

  async #finish(): Promise<void> {
    const wasOpen = this.#device !== undefined;
    this.#phase = 'closed';
    clearTimeout(this.#handshakeTimer);
    this.#socket.destroy();
    await this.#whenDrained();
    const device = this.#device;
    this.#device = undefined;
    await device?.close().catch((error: unknown) => this.#log.error({ err: error }, 'closing export failed'));
    this.#log.info({ export: wasOpen ? this.#negotiated?.export.name : undefined }, 'connection closed');
  }

  #whenDrained(): Promise<void> {
    if (this.#inFlightRequests === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  #dispatch(request: NbdRequest): void {
    const bytes = request.type === C.NBD_CMD_READ ? request.length : (request.payload?.length ?? 0);
    const started = this.#metrics === undefined ? 0 : performance.now();
    this.#inFlightRequests++;
    this.#inFlightBytes += bytes;
    this.#context.busyPoll?.begin();
    let rejection: RequestRejected | undefined;
    try {
      rejection = this.#validate(request);
    } catch (error) {
      rejection = new RequestRejected(C.NBD_EINVAL, String(error));
    }
    if (rejection !== undefined) {
      this.#log.debug({ type: request.type, error: rejection.error, reason: rejection.message }, 'request rejected');
      this.#record(request, started, true);
      this.#releasePayload(request);
      this.#replyError(request, rejection.error, rejection.message, bytes);
      return;
    }
    const target = request.type === C.NBD_CMD_READ && request.length > 0 ? this.#context.buffers.acquire(request.length) : undefined;
    this.#run(request, target).then(
      (reply) => {
        this.#record(request, started, false);
        this.#releasePayload(request);
        this.#send(reply, bytes, target);
      },
      (error: unknown) => {
        this.#record(request, started, true);
        this.#releasePayload(request);
        if (target !== undefined) this.#context.buffers.release(target);
        const fastZero = (request.flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0;
        const value = nbdErrorFor(error, { fastZero });
        const level = value === C.NBD_EIO ? 'error' : 'debug';
        this.#log[level]({ err: error, type: request.type, offset: request.offset }, 'request failed');
        this.#replyError(request, value, error instanceof Error ? error.message : String(error), bytes);
      },
    );
  }

  /** A WRITE's payload is not needed once the store has it. */
  #releasePayload(request: NbdRequest): void {
    if (request.payload !== undefined) this.#context.buffers.release(request.payload);
  }

  /** Counts a finished request; nothing to do (and no clock read) when metrics are off. */
  #record(request: NbdRequest, started: number, failed: boolean): void {
    this.#metrics?.record(request.type, request.length, (performance.now() - started) / 1000, failed);
  }

  #validate(request: NbdRequest): RequestRejected | undefined {
    const negotiated = this.#negotiated!;
    const device = this.#device!;
    const { type, flags, offset, length } = request;
    if (this.#shuttingDown) return new RequestRejected(C.NBD_ESHUTDOWN, 'server is shutting down');
    const allowed = ALLOWED_FLAGS[type];
    if (allowed === undefined) return new RequestRejected(C.NBD_EINVAL, `unknown command ${type}`);
    if ((flags & ~allowed) !== 0) return new RequestRejected(C.NBD_EINVAL, `flags 0x${flags.toString(16)} not valid`);
    if ((flags & C.NBD_CMD_FLAG_DF) !== 0 && !negotiated.structuredReplies) {
      return new RequestRejected(C.NBD_EINVAL, 'DF needs structured replies');
    }
    const isWrite = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_TRIM || type === C.NBD_CMD_WRITE_ZEROES;
    if (isWrite && (device.readOnly || negotiated.export.readOnly)) {
      return new RequestRejected(C.NBD_EPERM, 'export is read-only');
    }
    if (request.payloadTooLarge) {
      return new RequestRejected(C.NBD_EINVAL, `write of ${length} bytes exceeds the ${this.#context.limits.maxPayload}-byte limit`);
    }
    if (type === C.NBD_CMD_FLUSH) return undefined;
    const size = negotiated.export.size;
    if (offset < 0 || offset + length > size) {
      const pastEnd = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_WRITE_ZEROES;
      return new RequestRejected(pastEnd ? C.NBD_ENOSPC : C.NBD_EINVAL, 'request beyond the end of the export');
    }
    if (type === C.NBD_CMD_READ) {
      if (length > this.#context.limits.maxPayload) {
        const error = negotiated.structuredReplies ? C.NBD_EOVERFLOW : C.NBD_EINVAL;
        return new RequestRejected(error, `read of ${length} bytes exceeds the payload limit`);
      }
    }
    if (type === C.NBD_CMD_BLOCK_STATUS) {
      if (!negotiated.metaContexts.has(BASE_ALLOCATION_ID)) {
        return new RequestRejected(C.NBD_EINVAL, 'no meta context was selected');
      }
      if (length === 0) return new RequestRejected(C.NBD_EINVAL, 'block status of an empty range');
    }
    return undefined;
  }

  /** Runs a validated request; resolves to the reply's buffers. A READ reads into `target`. */
  async #run(request: NbdRequest, target: Buffer | undefined): Promise<Buffer[]> {
    const device = this.#device!;
    const { cookie, offset, length, flags } = request;
    const fua = (flags & C.NBD_CMD_FLAG_FUA) !== 0;
    switch (request.type) {
      case C.NBD_CMD_READ:
        return this.#readReply(request, target === undefined ? [] : await device.read(offset, length, target), target);
      case C.NBD_CMD_WRITE:
        if (length > 0) await device.write(offset, request.payload!, fua);
        else if (fua) await device.flush();
        break;
      case C.NBD_CMD_FLUSH:
        await device.flush();
        break;
      case C.NBD_CMD_TRIM:
        if (length > 0) await device.trim(offset, length, fua);
        break;
      case C.NBD_CMD_WRITE_ZEROES:
        if (length > 0) {
          await device.zero(offset, length, { mayTrim: (flags & C.NBD_CMD_FLAG_NO_HOLE) === 0, fua });
        }
        break;
      case C.NBD_CMD_CACHE:
        if (length > 0) await device.cache(offset, length);
        break;
      case C.NBD_CMD_BLOCK_STATUS:
        return [await this.#blockStatusReply(request)];
      default:
        throw new OperationError('EINVAL', `unknown command ${request.type}`);
    }
    return [simpleReply(cookie, 0)];
  }

  #readReply(request: NbdRequest, pieces: ReadPiece[], target: Buffer | undefined): Buffer[] {
    const { cookie, offset, length } = request;
    if (target === undefined) {
      return [this.#negotiated!.structuredReplies ? noneChunk(cookie) : simpleReply(cookie, 0)];
    }
    if (!this.#negotiated!.structuredReplies) {
      return [simpleReply(cookie, 0), ...dataOf(pieces, offset, target)];
    }
    if ((request.flags & C.NBD_CMD_FLAG_DF) !== 0 && pieces.length > 1) {
      return [offsetDataHeader(cookie, true, offset, length), ...dataOf(pieces, offset, target)];
    }
    const out: Buffer[] = [];
    pieces.forEach((piece, index) => {
      const done = index === pieces.length - 1;
      if (piece.kind === 'zero') {
        out.push(offsetHoleChunk(cookie, done, piece.offset, piece.length));
      } else {
        out.push(offsetDataHeader(cookie, done, piece.offset, piece.data.length), piece.data);
      }
    });
    return out;
  }

  async #blockStatusReply(request: NbdRequest): Promise<Buffer> {
    const { cookie, offset, length, flags } = request;
    const extents = await this.#device!.blockStatus(offset, length);
    const reqOne = (flags & C.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const limit = reqOne ? 1 : this.#context.limits.maxStatusDescriptors;
    const descriptors: StatusDescriptor[] = [];
    let covered = 0;
    for (const extent of extents) {
      if (covered >= length || descriptors.length > limit) break;
      const extentFlags = (extent.hole ? C.NBD_STATE_HOLE : 0) | (extent.zero ? C.NBD_STATE_ZERO : 0);
      const extentLength = Math.min(extent.length, length - covered);
      if (extentLength <= 0) continue;
      const last = descriptors[descriptors.length - 1];
      if (last !== undefined && last.flags === extentFlags) last.length += extentLength;
      else descriptors.push({ length: extentLength, flags: extentFlags });
      covered += extentLength;
    }
    if (descriptors.length > limit) descriptors.length = limit;
    if (descriptors.length === 0) throw new OperationError('EIO', 'store reported no extents');
    return blockStatusChunk(cookie, true, BASE_ALLOCATION_ID, descriptors);
  }

  #replyError(request: NbdRequest, error: number, message: string, bytes: number): void {
    const structured =
      this.#negotiated!.structuredReplies &&
      (request.type === C.NBD_CMD_READ || request.type === C.NBD_CMD_BLOCK_STATUS);
    this.#send([structured ? errorChunk(request.cookie, error, message) : simpleReply(request.cookie, error)], bytes);
  }

  /** Writes a reply; `lent` goes back to the pool once the socket is done with it. */
  #send(buffers: Buffer[], bytes: number, lent?: Buffer): void {
    const release = (): void => {
      if (lent !== undefined) this.#context.buffers.release(lent);
      this.#context.busyPoll?.end();
      this.#inFlightRequests--;
      this.#inFlightBytes -= bytes;
      if (this.#inFlightRequests === 0) {
        for (const resolve of this.#drainWaiters.splice(0)) resolve();
      }
      this.#pump();
    };
    if (this.#socket.destroyed || !this.#socket.writable) {
      release();
      return;
    }
    if (!this.#corked) {
      this.#corked = true;
      this.#socket.cork();
      setImmediate(this.#uncork);
    }
    let accepted = true;
    buffers.forEach((buffer, index) => {
      const last = index === buffers.length - 1;
      accepted = this.#socket.write(buffer, last ? () => release() : undefined) && accepted;
    });
    if (!accepted) this.#writeBlocked = true;
  }
}

/** The bytes of a read in order, holes as zeros written into their place in `target`. */
function dataOf(pieces: ReadPiece[], offset: number, target: Buffer): Buffer[] {
  return pieces.map((piece) => {
    if (piece.kind === 'data') return piece.data;
    const at = piece.offset - offset;
    return target.fill(0, at, at + piece.length).subarray(at, at + piece.length);
  });
}
