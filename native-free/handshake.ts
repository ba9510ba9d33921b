/**
 * The client's side of the fixed newstyle handshake, as a conversation over a connected socket.
 *
 * The handshake is strictly request/reply and its messages are small, so it reads with a
 * promise per message (`HandshakeReader.read(n)`). When it ends, the reader hands whatever bytes
 * arrived beyond the handshake to the transmission phase, which frames replies incrementally.
 */
import { connect as netConnect, type Socket } from 'node:net';
import * as C from '../src/nbd/constants.js';
import {
  EXPORT_NAME_REPLY_SIZE,
  SERVER_GREETING_SIZE,
  decodeExportNameReply,
  decodeOptionReply,
  decodeOptionReplyHeader,
  decodeServerGreeting,
  encodeClientFlags,
  encodeExportNameOption,
  encodeInfoOption,
  encodeMetaContextOption,
  encodeOption,
  errorCodeForOptionError,
  type BlockSizeInfo,
  type OptionReply,
} from '../src/nbd/client-codec.js';
import { NbdError } from './errors.js';
import type { NbdTarget } from './uri.js';

/** Option replies beyond this are refused: none the client asks for comes near it. */
const MAX_OPTION_REPLY = 1 << 20;

export async function openSocket(target: NbdTarget): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = 'path' in target ? netConnect({ path: target.path }) : netConnect({ host: target.host, port: target.port });
    const onError = (error: Error): void => {
      reject(new NbdError(codeOf(error) ?? 'ECONNREFUSED', `cannot connect: ${error.message}`, { cause: error }));
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      if (!('path' in target)) socket.setNoDelay(true);
      resolve(socket);
    });
  });
}

function codeOf(error: Error): string | undefined {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' ? code : undefined;
}

/** Reads exact byte counts from a socket until detached. */
export class HandshakeReader {
  readonly #socket: Socket;
  #buffered: Buffer = Buffer.alloc(0);
  #failure: NbdError | undefined;
  #waiter: { n: number; resolve: (bytes: Buffer) => void; reject: (error: Error) => void } | undefined;

  constructor(socket: Socket) {
    this.#socket = socket;
    socket.on('data', this.#onData);
    socket.on('error', this.#onError);
    socket.on('close', this.#onClose);
  }

  read(n: number): Promise<Buffer> {
    if (this.#waiter !== undefined) throw new Error('HandshakeReader: one read at a time');
    return new Promise((resolve, reject) => {
      this.#waiter = { n, resolve, reject };
      this.#settle();
    });
  }

  /** Stops listening and returns the bytes received but not read. */
  detach(): Buffer {
    this.#socket.off('data', this.#onData);
    this.#socket.off('error', this.#onError);
    this.#socket.off('close', this.#onClose);
    const rest = this.#buffered;
    this.#buffered = Buffer.alloc(0);
    return rest;
  }

  readonly #onData = (chunk: Buffer): void => {
    this.#buffered = this.#buffered.length === 0 ? chunk : Buffer.concat([this.#buffered, chunk]);
    this.#settle();
  };

  readonly #onError = (error: Error): void => {
    this.#failure ??= new NbdError('ECONNRESET', `connection failed during handshake: ${error.message}`, { cause: error });
    this.#settle();
  };

  readonly #onClose = (): void => {
    this.#failure ??= new NbdError('ECONNRESET', 'server closed the connection during the handshake');
    this.#settle();
  };

  #settle(): void {
    const waiter = this.#waiter;
    if (waiter === undefined) return;
    if (this.#buffered.length >= waiter.n) {
      this.#waiter = undefined;
      const bytes = this.#buffered.subarray(0, waiter.n);
      this.#buffered = this.#buffered.subarray(waiter.n);
      waiter.resolve(bytes);
    } else if (this.#failure !== undefined) {
      this.#waiter = undefined;
      waiter.reject(this.#failure);
    }
  }
}

export interface Negotiated {
  exportName: string;
  size: number;
  flags: number;
  structuredReplies: boolean;
  metaContexts: Map<string, number>;
  blockSizes: BlockSizeInfo | undefined;
  description: string | undefined;
}

export interface ExportInfoResult {
  name: string;
  size: number;
  flags: number;
  description: string | undefined;
  blockSizes: BlockSizeInfo | undefined;
}

/** A handshake in progress on one socket. */
export class HandshakeSession {
  readonly socket: Socket;
  readonly reader: HandshakeReader;
  /** Both sides agreed to leave out the 124 zero bytes after EXPORT_NAME. */
  noZeroes = false;

  constructor(socket: Socket) {
    this.socket = socket;
    this.reader = new HandshakeReader(socket);
  }

  async greet(wantNoZeroes: boolean): Promise<void> {
    const handshakeFlags = decodeServerGreetingOrThrow(await this.reader.read(SERVER_GREETING_SIZE));
    if ((handshakeFlags & C.NBD_FLAG_FIXED_NEWSTYLE) === 0) {
      throw new NbdError('EPROTO', 'server does not speak fixed newstyle');
    }
    this.noZeroes = wantNoZeroes && (handshakeFlags & C.NBD_FLAG_NO_ZEROES) !== 0;
    this.socket.write(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | (this.noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0)));
  }

  async readOptionReply(option: number): Promise<OptionReply> {
    const header = decodeOptionReplyHeader(await this.reader.read(C.OPTION_REPLY_HEADER_SIZE));
    if (header.option !== option) {
      throw new NbdError('EPROTO', `option reply for option ${header.option} while waiting for ${option}`);
    }
    if (header.length > MAX_OPTION_REPLY) {
      throw new NbdError('EPROTO', `option reply of ${header.length} bytes exceeds the cap`);
    }
    return decodeOptionReply(header, await this.reader.read(header.length));
  }

  /** Sends an option and collects its replies up to and including the final ACK or error. */
  async exchange(option: number, request: Buffer): Promise<OptionReply[]> {
    this.socket.write(request);
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply(option);
      replies.push(reply);
      if (reply.type === 'ack' || reply.type === 'error') return replies;
      if (reply.type === 'unknown') {
        throw new NbdError('EPROTO', `unexpected option reply type ${reply.replyType} to option ${option}`);
      }
    }
  }

  async structuredReply(): Promise<boolean> {
    const replies = await this.exchange(C.NBD_OPT_STRUCTURED_REPLY, encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
    return replies.at(-1)?.type === 'ack';
  }

  /** Returns the selected contexts; a refusal selects none (block status is then unavailable). */
  async setMetaContext(exportName: string, queries: readonly string[]): Promise<Map<string, number>> {
    const request = encodeMetaContextOption(C.NBD_OPT_SET_META_CONTEXT, exportName, queries);
    const replies = await this.exchange(C.NBD_OPT_SET_META_CONTEXT, request);
    const contexts = new Map<string, number>();
    if (replies.at(-1)?.type !== 'ack') return contexts;
    for (const reply of replies) {
      if (reply.type === 'meta-context') contexts.set(reply.name, reply.id);
    }
    return contexts;
  }

  /** NBD_OPT_INFO or NBD_OPT_GO asking for block sizes, name and description. */
  async exportInfo(option: typeof C.NBD_OPT_INFO | typeof C.NBD_OPT_GO, exportName: string): Promise<ExportInfoResult> {
    const request = encodeInfoOption(option, exportName, [C.NBD_INFO_BLOCK_SIZE, C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION]);
    const replies = await this.exchange(option, request);
    const last = replies.at(-1);
    if (last?.type === 'error') throw optionError(option, last.replyType, last.message, exportName);
    const result: ExportInfoResult = { name: exportName, size: -1, flags: 0, description: undefined, blockSizes: undefined };
    for (const reply of replies) {
      if (reply.type !== 'info') continue;
      const { info } = reply;
      if (info.info === 'export') {
        result.size = info.size;
        result.flags = info.flags;
      } else if (info.info === 'name') result.name = info.name;
      else if (info.info === 'description') result.description = info.description;
      else if (info.info === 'block-size') result.blockSizes = info.blockSizes;
    }
    if (result.size < 0) throw new NbdError('EPROTO', 'server acknowledged without NBD_INFO_EXPORT');
    return result;
  }

  /** The old way in, for servers that do not know NBD_OPT_GO. No reply on failure: a close. */
  async exportName(exportName: string): Promise<{ size: number; flags: number }> {
    this.socket.write(encodeExportNameOption(exportName));
    const reply = decodeExportNameReply(await this.reader.read(EXPORT_NAME_REPLY_SIZE));
    if (!this.noZeroes) await this.reader.read(C.HANDSHAKE_ZEROES);
    return reply;
  }

  async list(): Promise<{ name: string; description: string }[]> {
    const replies = await this.exchange(C.NBD_OPT_LIST, encodeOption(C.NBD_OPT_LIST));
    const last = replies.at(-1);
    if (last?.type === 'error') throw optionError(C.NBD_OPT_LIST, last.replyType, last.message);
    return replies.flatMap((reply) => (reply.type === 'server' ? [{ name: reply.name, description: reply.description }] : []));
  }

  /** Sends NBD_OPT_ABORT and closes, accepting a server that hangs up instead of replying. */
  async abort(): Promise<void> {
    try {
      await this.exchange(C.NBD_OPT_ABORT, encodeOption(C.NBD_OPT_ABORT));
    } catch (error) {
      if (!(error instanceof NbdError && error.code === 'ECONNRESET')) throw error;
    } finally {
      this.reader.detach();
      await closeSocket(this.socket);
    }
  }
}

function decodeServerGreetingOrThrow(bytes: Buffer): number {
  try {
    return decodeServerGreeting(bytes);
  } catch (error) {
    throw new NbdError('EPROTO', (error as Error).message, { cause: error });
  }
}

const OPTION_NAMES: Readonly<Record<number, string>> = {
  [C.NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [C.NBD_OPT_GO]: 'NBD_OPT_GO',
  [C.NBD_OPT_LIST]: 'NBD_OPT_LIST',
};

function optionError(option: number, replyType: number, message: string, exportName?: string): NbdError {
  const name = OPTION_NAMES[option] ?? `option ${option}`;
  const about = exportName === undefined ? '' : ` for export "${exportName}"`;
  const detail = message === '' ? '' : `: ${message}`;
  const code = errorCodeForOptionError(replyType);
  return new NbdError(code, `${name}${about} refused (${code}, reply 0x${replyType.toString(16)})${detail}`, { replyType });
}

/** Ends our side and resolves when the socket is fully closed. */
export function closeSocket(socket: Socket): Promise<void> {
  if (socket.closed) return Promise.resolve();
  return new Promise((resolve) => {
    socket.once('close', () => resolve());
    socket.on('error', () => undefined);
    socket.end();
    // Data the server still sends would hold the readable side open; nobody reads it any more.
    socket.resume();
  });
}
