/**
 * The server's side of the fixed newstyle handshake, sans I/O.
 *
 *   greeting() ──► [clientFlags] ──► [optionHeader] ◄──► [optionData] / [skipping]
 *                                          │
 *                         EXPORT_NAME / GO ├──► transmission (outcome)
 *                    ABORT / bad flags / … └──► close (outcome)
 *
 * `advance(queue)` consumes whatever complete input the queue holds and returns the bytes to
 * send and, once decided, the outcome. It never blocks and never buffers more than one option's
 * data, which is capped: larger option data is discarded as it arrives and refused.
 *
 * TLS modes (the spec's names in brackets), fixed for the life of a connection:
 *   off      [NOTLS]         STARTTLS gets NBD_REP_ERR_POLICY; nothing gets NBD_REP_ERR_TLS_REQD.
 *   require  [FORCEDTLS]     before TLS every option but STARTTLS and ABORT gets ERR_TLS_REQD,
 *                            EXPORT_NAME closes, and a client without fixed newstyle is closed.
 *   optional [SELECTIVETLS]  before TLS, INFO/GO naming an export the catalog does not show get
 *                            ERR_TLS_REQD (TLS may reveal it; unknown names look the same, so
 *                            names cannot be probed); after TLS they get ERR_UNKNOWN.
 * An ACKed STARTTLS ends in the `starttls` outcome: the caller stops feeding plain bytes, runs the
 * TLS handshake and calls `secured()` with the catalog the authenticated peer may see. Until then
 * `advance` consumes nothing. `secured` forgets every negotiated option, as the spec demands.
 */
import { ByteQueue, writeU64 } from './byte-queue.js';
import * as C from './constants.js';

export interface HandshakeExport {
  name: string;
  size: number;
  readOnly: boolean;
  description: string;
}

export interface HandshakeCatalog {
  describe(name: string): HandshakeExport | undefined;
  list(): HandshakeExport[];
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export type TlsMode = 'off' | 'optional' | 'require';

export interface HandshakeOptions {
  /** The exports a peer sees before TLS (or without it). */
  catalog: HandshakeCatalog;
  /** The export an empty name selects. */
  defaultExportName: string;
  blockSizes: BlockSizes;
  /** Option data beyond this is discarded and refused. */
  maxOptionLength: number;
  /** True while the server is shutting down: options get NBD_REP_ERR_SHUTDOWN. */
  shuttingDown?: () => boolean;
  /** Default 'off'. */
  tls?: TlsMode;
}

/** The meta context id of `base:allocation`, the only context served. */
export const BASE_ALLOCATION_ID = 1;

export interface NegotiatedExport {
  export: HandshakeExport;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** Context ids selected for this export; BLOCK_STATUS is valid only when non-empty. */
  metaContexts: ReadonlyMap<number, string>;
}

export type HandshakeOutcome =
  | { kind: 'transmission'; negotiated: NegotiatedExport }
  | { kind: 'close'; reason: string }
  /** STARTTLS was acknowledged: every further byte, both ways, is TLS. */
  | { kind: 'starttls' };

export interface HandshakeStep {
  output: Buffer[];
  outcome?: HandshakeOutcome;
}

const SERVER_HANDSHAKE_FLAGS = C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES;
const KNOWN_CLIENT_FLAGS = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES;

type State =
  | { kind: 'clientFlags' }
  | { kind: 'optionHeader' }
  | { kind: 'optionData'; option: number; length: number }
  | { kind: 'skipping'; option: number; remaining: number }
  | { kind: 'awaitingTls' }
  | { kind: 'done' };

export function transmissionFlagsFor(exp: HandshakeExport, structuredReplies: boolean): number {
  let flags =
    C.NBD_FLAG_HAS_FLAGS |
    C.NBD_FLAG_SEND_FLUSH |
    C.NBD_FLAG_SEND_FUA |
    C.NBD_FLAG_CAN_MULTI_CONN |
    C.NBD_FLAG_SEND_CACHE;
  if (exp.readOnly) {
    flags |= C.NBD_FLAG_READ_ONLY;
  } else {
    flags |= C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES | C.NBD_FLAG_SEND_FAST_ZERO;
  }
  if (structuredReplies) flags |= C.NBD_FLAG_SEND_DF;
  return flags;
}

export class ServerHandshake {
  readonly #options: HandshakeOptions;
  #tlsMode: TlsMode;
  #catalog: HandshakeCatalog;
  #state: State = { kind: 'clientFlags' };
  #tlsActive = false;
  #noZeroes = false;
  #structuredReplies = false;
  /** Export name the last SET_META_CONTEXT referred to, and what it selected. */
  #metaExportName: string | undefined;
  #metaContexts = new Map<number, string>();

  constructor(options: HandshakeOptions) {
    this.#options = options;
    this.#tlsMode = options.tls ?? 'off';
    this.#catalog = options.catalog;
  }

  /** TLS is up (after a `starttls` outcome): options resume over it, with no state kept. */
  secured(catalog: HandshakeCatalog): void {
    if (this.#state.kind !== 'awaitingTls') throw new Error('secured() without an acknowledged STARTTLS');
    this.#tlsActive = true;
    this.#catalog = catalog;
    this.#structuredReplies = false;
    this.#metaExportName = undefined;
    this.#metaContexts = new Map();
    this.#state = { kind: 'optionHeader' };
  }

  /** Before TLS in require mode, nothing but STARTTLS and ABORT is served. */
  get #tlsRequired(): boolean {
    return this.#tlsMode === 'require' && !this.#tlsActive;
  }

  greeting(): Buffer {
    const out = Buffer.alloc(18);
    out.writeBigUInt64BE(C.NBDMAGIC, 0);
    out.writeBigUInt64BE(C.IHAVEOPT, 8);
    out.writeUInt16BE(SERVER_HANDSHAKE_FLAGS, 16);
    return out;
  }

  advance(queue: ByteQueue): HandshakeStep {
    const output: Buffer[] = [];
    for (;;) {
      const state = this.#state;
      switch (state.kind) {
        case 'done':
        case 'awaitingTls':
          return { output };
        case 'clientFlags': {
          if (queue.length < 4) return { output };
          const flags = queue.take(4).readUInt32BE(0);
          if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
            return this.#close(output, `unknown client flags 0x${flags.toString(16)}`);
          }
          if (this.#tlsMode === 'require' && (flags & C.NBD_FLAG_C_FIXED_NEWSTYLE) === 0) {
            // Without fixed newstyle there is no STARTTLS, and nothing may be served in plain.
            return this.#close(output, 'TLS is required and the client cannot negotiate it');
          }
          // The spec allows TLS only after fixed newstyle was agreed.
          if ((flags & C.NBD_FLAG_C_FIXED_NEWSTYLE) === 0) this.#tlsMode = 'off';
          this.#noZeroes = (flags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
          this.#state = { kind: 'optionHeader' };
          break;
        }
        case 'optionHeader': {
          if (queue.length < C.OPTION_HEADER_SIZE) return { output };
          const header = queue.take(C.OPTION_HEADER_SIZE);
          if (header.readBigUInt64BE(0) !== C.IHAVEOPT) {
            return this.#close(output, 'option without IHAVEOPT magic');
          }
          const option = header.readUInt32BE(8);
          const length = header.readUInt32BE(12);
          this.#state =
            length > this.#options.maxOptionLength
              ? { kind: 'skipping', option, remaining: length }
              : { kind: 'optionData', option, length };
          break;
        }
        case 'skipping': {
          state.remaining -= queue.skip(state.remaining);
          if (state.remaining > 0) return { output };
          if (state.option === C.NBD_OPT_EXPORT_NAME) {
            return this.#close(output, 'export name too long');
          }
          output.push(
            this.#tlsRequired && state.option !== C.NBD_OPT_STARTTLS && state.option !== C.NBD_OPT_ABORT
              ? tlsRequired(state.option)
              : optionReply(state.option, C.NBD_REP_ERR_TOO_BIG, errorText('option data too large')),
          );
          this.#state = { kind: 'optionHeader' };
          break;
        }
        case 'optionData': {
          if (queue.length < state.length) return { output };
          const data = queue.take(state.length);
          this.#state = { kind: 'optionHeader' };
          const outcome = this.#handleOption(state.option, data, output);
          if (outcome !== undefined) {
            this.#state = outcome.kind === 'starttls' ? { kind: 'awaitingTls' } : { kind: 'done' };
            return { output, outcome };
          }
          break;
        }
      }
    }
  }

  #close(output: Buffer[], reason: string): HandshakeStep {
    this.#state = { kind: 'done' };
    return { output, outcome: { kind: 'close', reason } };
  }

  #handleOption(option: number, data: Buffer, output: Buffer[]): HandshakeOutcome | undefined {
    if (this.#tlsRequired && option !== C.NBD_OPT_STARTTLS && option !== C.NBD_OPT_ABORT) {
      // EXPORT_NAME cannot be refused politely, and must not be served in plain.
      if (option === C.NBD_OPT_EXPORT_NAME) return { kind: 'close', reason: 'EXPORT_NAME before the required TLS' };
      output.push(tlsRequired(option));
      return undefined;
    }
    if (this.#options.shuttingDown?.() && option !== C.NBD_OPT_ABORT) {
      if (option === C.NBD_OPT_EXPORT_NAME) return { kind: 'close', reason: 'server shutting down' };
      output.push(optionReply(option, C.NBD_REP_ERR_SHUTDOWN, errorText('server is shutting down')));
      return undefined;
    }
    switch (option) {
      case C.NBD_OPT_EXPORT_NAME:
        return this.#exportName(data, output);
      case C.NBD_OPT_ABORT:
        output.push(optionReply(option, C.NBD_REP_ACK));
        return { kind: 'close', reason: 'client aborted the handshake' };
      case C.NBD_OPT_LIST:
        this.#list(data, output);
        return undefined;
      case C.NBD_OPT_STARTTLS:
        return this.#startTls(data, output);
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO:
        return this.#infoOrGo(option, data, output);
      case C.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) {
          output.push(optionReply(option, C.NBD_REP_ERR_INVALID, errorText('option takes no data')));
        } else {
          this.#structuredReplies = true;
          output.push(optionReply(option, C.NBD_REP_ACK));
        }
        return undefined;
      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT:
        this.#metaContext(option, data, output);
        return undefined;
      default:
        output.push(optionReply(option, C.NBD_REP_ERR_UNSUP, errorText(`option ${option} is not supported`)));
        return undefined;
    }
  }

  #startTls(data: Buffer, output: Buffer[]): HandshakeOutcome | undefined {
    const refuse = (type: number, message: string): undefined => {
      output.push(optionReply(C.NBD_OPT_STARTTLS, type, errorText(message)));
      return undefined;
    };
    if (this.#tlsActive) return refuse(C.NBD_REP_ERR_INVALID, 'TLS is already active');
    if (data.length !== 0) return refuse(C.NBD_REP_ERR_INVALID, 'option takes no data');
    if (this.#tlsMode === 'off') return refuse(C.NBD_REP_ERR_POLICY, 'TLS is not enabled on this server');
    output.push(optionReply(C.NBD_OPT_STARTTLS, C.NBD_REP_ACK));
    return { kind: 'starttls' };
  }

  #resolve(name: string): HandshakeExport | undefined {
    return this.#catalog.describe(name === '' ? this.#options.defaultExportName : name);
  }

  #exportName(data: Buffer, output: Buffer[]): HandshakeOutcome {
    const name = decodeString(data);
    const exp = name === undefined ? undefined : this.#resolve(name);
    if (exp === undefined) return { kind: 'close', reason: 'unknown export' };
    const negotiated = this.#negotiated(exp, name === '' ? exp.name : name!);
    const out = Buffer.alloc(this.#noZeroes ? 10 : 10 + C.HANDSHAKE_ZEROES);
    writeU64(out, exp.size, 0);
    out.writeUInt16BE(negotiated.transmissionFlags, 8);
    output.push(out);
    return { kind: 'transmission', negotiated };
  }

  #negotiated(exp: HandshakeExport, requestedName: string): NegotiatedExport {
    const contextsApply = this.#metaExportName === requestedName;
    return {
      export: exp,
      transmissionFlags: transmissionFlagsFor(exp, this.#structuredReplies),
      structuredReplies: this.#structuredReplies,
      metaContexts: contextsApply ? new Map(this.#metaContexts) : new Map(),
    };
  }

  #list(data: Buffer, output: Buffer[]): void {
    if (data.length !== 0) {
      output.push(optionReply(C.NBD_OPT_LIST, C.NBD_REP_ERR_INVALID, errorText('option takes no data')));
      return;
    }
    for (const exp of this.#catalog.list()) {
      // The bytes after the name are free-form; libnbd clients show them as the description.
      const name = Buffer.from(exp.name, 'utf8');
      const description = Buffer.from(exp.description, 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length + description.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      description.copy(payload, 4 + name.length);
      output.push(optionReply(C.NBD_OPT_LIST, C.NBD_REP_SERVER, payload));
    }
    output.push(optionReply(C.NBD_OPT_LIST, C.NBD_REP_ACK));
  }

  #infoOrGo(option: number, data: Buffer, output: Buffer[]): HandshakeOutcome | undefined {
    const request = parseInfoRequest(data);
    if (request === undefined) {
      output.push(optionReply(option, C.NBD_REP_ERR_INVALID, errorText('malformed INFO/GO request')));
      return undefined;
    }
    const exp = this.#resolve(request.name);
    if (exp === undefined) {
      output.push(
        this.#tlsMode === 'optional' && !this.#tlsActive
          ? tlsRequired(option, `no export named "${request.name}" without TLS`)
          : optionReply(option, C.NBD_REP_ERR_UNKNOWN, errorText(`no export named "${request.name}"`)),
      );
      return undefined;
    }
    const negotiated = this.#negotiated(exp, request.name);
    const info = Buffer.alloc(12);
    info.writeUInt16BE(C.NBD_INFO_EXPORT, 0);
    writeU64(info, exp.size, 2);
    info.writeUInt16BE(negotiated.transmissionFlags, 10);
    output.push(optionReply(option, C.NBD_REP_INFO, info));
    // Each requested item is sent once, however often it was asked for.
    for (const type of new Set(request.infos)) {
      const payload = this.#infoPayload(type, exp);
      if (payload !== undefined) output.push(optionReply(option, C.NBD_REP_INFO, payload));
    }
    output.push(optionReply(option, C.NBD_REP_ACK));
    return option === C.NBD_OPT_GO ? { kind: 'transmission', negotiated } : undefined;
  }

  #infoPayload(type: number, exp: HandshakeExport): Buffer | undefined {
    switch (type) {
      case C.NBD_INFO_NAME:
        return withInfoType(C.NBD_INFO_NAME, Buffer.from(exp.name, 'utf8'));
      case C.NBD_INFO_DESCRIPTION:
        return exp.description === ''
          ? undefined
          : withInfoType(C.NBD_INFO_DESCRIPTION, Buffer.from(exp.description, 'utf8'));
      case C.NBD_INFO_BLOCK_SIZE: {
        const sizes = Buffer.alloc(12);
        sizes.writeUInt32BE(this.#options.blockSizes.minimum, 0);
        sizes.writeUInt32BE(this.#options.blockSizes.preferred, 4);
        sizes.writeUInt32BE(this.#options.blockSizes.maximum, 8);
        return withInfoType(C.NBD_INFO_BLOCK_SIZE, sizes);
      }
      default:
        return undefined;
    }
  }

  #metaContext(option: number, data: Buffer, output: Buffer[]): void {
    const isSet = option === C.NBD_OPT_SET_META_CONTEXT;
    if (isSet) {
      // SET replaces the selection even when it fails.
      this.#metaExportName = undefined;
      this.#metaContexts = new Map();
    }
    if (!this.#structuredReplies) {
      output.push(optionReply(option, C.NBD_REP_ERR_INVALID, errorText('negotiate structured replies first')));
      return;
    }
    const request = parseMetaContextRequest(data);
    if (request === undefined) {
      output.push(optionReply(option, C.NBD_REP_ERR_INVALID, errorText('malformed meta context request')));
      return;
    }
    if (this.#resolve(request.name) === undefined) {
      output.push(optionReply(option, C.NBD_REP_ERR_UNKNOWN, errorText(`no export named "${request.name}"`)));
      return;
    }
    const selectsAllocation = isSet
      ? request.queries.includes(C.BASE_ALLOCATION)
      : request.queries.length === 0 ||
        request.queries.some((query) => query === C.BASE_ALLOCATION || query === 'base:');
    if (selectsAllocation) {
      const id = isSet ? BASE_ALLOCATION_ID : 0;
      output.push(optionReply(option, C.NBD_REP_META_CONTEXT, metaContextPayload(id, C.BASE_ALLOCATION)));
    }
    if (isSet) {
      this.#metaExportName = request.name;
      if (selectsAllocation) this.#metaContexts.set(BASE_ALLOCATION_ID, C.BASE_ALLOCATION);
    }
    output.push(optionReply(option, C.NBD_REP_ACK));
  }
}

export function optionReply(option: number, type: number, payload?: Buffer): Buffer {
  const length = payload?.length ?? 0;
  const out = Buffer.allocUnsafe(C.OPTION_REPLY_HEADER_SIZE + length);
  out.writeBigUInt64BE(C.NBD_OPTION_REPLY_MAGIC, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(type >>> 0, 12);
  out.writeUInt32BE(length, 16);
  payload?.copy(out, C.OPTION_REPLY_HEADER_SIZE);
  return out;
}

function errorText(message: string): Buffer {
  return Buffer.from(message, 'utf8');
}

function tlsRequired(option: number, message = 'TLS is required: send NBD_OPT_STARTTLS first'): Buffer {
  return optionReply(option, C.NBD_REP_ERR_TLS_REQD, errorText(message));
}

function withInfoType(type: number, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(2 + body.length);
  out.writeUInt16BE(type, 0);
  body.copy(out, 2);
  return out;
}

function metaContextPayload(id: number, name: string): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const out = Buffer.allocUnsafe(4 + nameBytes.length);
  out.writeUInt32BE(id, 0);
  nameBytes.copy(out, 4);
  return out;
}

/** A protocol string: valid UTF-8, no NUL, at most NBD_MAX_STRING bytes. */
function decodeString(bytes: Buffer): string | undefined {
  if (bytes.length > C.NBD_MAX_STRING || bytes.includes(0)) return undefined;
  const text = bytes.toString('utf8');
  return Buffer.byteLength(text, 'utf8') === bytes.length && !text.includes('\ufffd') ? text : undefined;
}

interface InfoRequest {
  name: string;
  infos: number[];
}

function parseInfoRequest(data: Buffer): InfoRequest | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) return undefined;
  const name = decodeString(data.subarray(4, 4 + nameLength));
  const count = data.readUInt16BE(4 + nameLength);
  if (name === undefined || data.length !== 6 + nameLength + 2 * count) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { name, infos };
}

interface MetaContextRequest {
  name: string;
  queries: string[];
}

function parseMetaContextRequest(data: Buffer): MetaContextRequest | undefined {
  if (data.length < 8) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return undefined;
  const name = decodeString(data.subarray(4, 4 + nameLength));
  if (name === undefined) return undefined;
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const length = data.readUInt32BE(at);
    at += 4;
    if (length > data.length - at) return undefined;
    const query = decodeString(data.subarray(at, at + length));
    if (query === undefined || !query.includes(':')) return undefined;
    queries.push(query);
    at += length;
  }
  return at === data.length ? { name, queries } : undefined;
}
