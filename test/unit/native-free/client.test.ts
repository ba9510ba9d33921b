/**
 * NbdClient against a scripted fake server: a net.Server whose per-connection script reads what
 * the client sends and answers with bytes built here by hand (nothing from src/nbd/).
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient, NbdError } from '../../../native-free/index.js';

// --- hand-written wire bytes ------------------------------------------------------------------
const u16 = (n: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};
const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
const u64 = (n: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};
const text = (s: string): Buffer => Buffer.from(s, 'utf8');
const cat = (...parts: Buffer[]): Buffer => Buffer.concat(parts);

const GREETING = cat(text('NBDMAGIC'), text('IHAVEOPT'), u16(0b11));
const OPTION_REPLY_MAGIC = Buffer.from([0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
const optionReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer =>
  cat(OPTION_REPLY_MAGIC, u32(option), u32(type), u32(data.length), data);
const simpleReply = (cookie: Buffer, error: number, data: Buffer = Buffer.alloc(0)): Buffer =>
  cat(Buffer.from([0x67, 0x44, 0x66, 0x98]), u32(error), cookie, data);
const chunk = (cookie: Buffer, flags: number, type: number, payload: Buffer): Buffer =>
  cat(Buffer.from([0x66, 0x8e, 0x33, 0xef]), u16(flags), u16(type), cookie, u32(payload.length), payload);
const dataChunk = (cookie: Buffer, done: boolean, offset: number, data: Buffer): Buffer => chunk(cookie, done ? 1 : 0, 1, cat(u64(offset), data));
const holeChunk = (cookie: Buffer, done: boolean, offset: number, length: number): Buffer =>
  chunk(cookie, done ? 1 : 0, 2, cat(u64(offset), u32(length)));
const errorChunk = (cookie: Buffer, done: boolean, error: number, message: string): Buffer =>
  chunk(cookie, done ? 1 : 0, 0x8001, cat(u32(error), u16(Buffer.byteLength(message)), text(message)));
const noneChunk = (cookie: Buffer): Buffer => chunk(cookie, 1, 0, Buffer.alloc(0));

const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, SET_META_CONTEXT: 10 };
const REP = { ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4, ERR_UNSUP: 0x80000001, ERR_UNKNOWN: 0x80000006 };
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
/** HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|SEND_DF|CAN_MULTI_CONN|SEND_CACHE|SEND_FAST_ZERO */
const ALL_FLAGS = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800;
const EXPORT_SIZE = 1 << 20;

interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
  payload: Buffer;
}

/** The fake server's view of one connection: exact reads, raw writes. */
class Peer {
  readonly socket: Socket;
  #buffered: Buffer = Buffer.alloc(0);
  #closed = false;
  #wake: (() => void) | undefined;
  readonly closed: Promise<void>;

  constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (data: Buffer) => {
      this.#buffered = cat(this.#buffered, data);
      this.#wake?.();
    });
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.#closed = true;
        this.#wake?.();
        resolve();
      }),
    );
    socket.on('error', () => undefined);
  }

  async read(n: number): Promise<Buffer> {
    while (this.#buffered.length < n) {
      if (this.#closed) throw new Error(`peer closed while the script wanted ${n} bytes`);
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    const out = this.#buffered.subarray(0, n);
    this.#buffered = this.#buffered.subarray(n);
    return out;
  }

  write(...parts: Buffer[]): void {
    this.socket.write(cat(...parts));
  }

  async readOption(): Promise<{ option: number; data: Buffer }> {
    const header = await this.read(16);
    expect(header.subarray(0, 8).toString()).toBe('IHAVEOPT');
    return { option: header.readUInt32BE(8), data: await this.read(header.readUInt32BE(12)) };
  }

  async readRequest(): Promise<Request> {
    const header = await this.read(28);
    expect(header.readUInt32BE(0)).toBe(0x25609513);
    const type = header.readUInt16BE(6);
    const length = header.readUInt32BE(24);
    return {
      flags: header.readUInt16BE(4),
      type,
      cookie: Buffer.from(header.subarray(8, 16)),
      offset: Number(header.readBigUInt64BE(16)),
      length,
      payload: type === CMD.WRITE ? await this.read(length) : Buffer.alloc(0),
    };
  }

  /** The happy-path handshake the client performs by default; returns what the client sent. */
  async handshake(flags = ALL_FLAGS): Promise<{ clientFlags: number; options: { option: number; data: Buffer }[] }> {
    this.write(GREETING);
    const clientFlags = (await this.read(4)).readUInt32BE(0);
    const options: { option: number; data: Buffer }[] = [];
    const structured = await this.readOption();
    options.push(structured);
    this.write(optionReply(OPT.STRUCTURED_REPLY, REP.ACK));
    const meta = await this.readOption();
    options.push(meta);
    this.write(optionReply(OPT.SET_META_CONTEXT, REP.META_CONTEXT, cat(u32(7), text('base:allocation'))));
    this.write(optionReply(OPT.SET_META_CONTEXT, REP.ACK));
    const go = await this.readOption();
    options.push(go);
    this.write(
      optionReply(OPT.GO, REP.INFO, cat(u16(0), u64(EXPORT_SIZE), u16(flags))),
      optionReply(OPT.GO, REP.INFO, cat(u16(3), u32(512), u32(4096), u32(1 << 25))),
      optionReply(OPT.GO, REP.INFO, cat(u16(2), text('a test disk'))),
      optionReply(OPT.GO, REP.ACK),
    );
    return { clientFlags, options };
  }
}

// --- the scripted server ------------------------------------------------------------------------
const servers: Server[] = [];
const clients: NbdClient[] = [];

afterEach(async () => {
  for (const client of clients.splice(0)) client.destroy();
  await Promise.all(
    servers.splice(0).map(
      (server) =>
        new Promise<void>((resolve) => {
          server.close(() => resolve());
        }),
    ),
  );
});

/** Starts a server that runs `script` on its first connection; `done` settles with the script. */
async function scripted(script: (peer: Peer) => Promise<void>): Promise<{ port: number; done: Promise<void> }> {
  let finish!: (error?: unknown) => void;
  const done = new Promise<void>((resolve, reject) => {
    finish = (error) => (error === undefined ? resolve() : reject(error));
  });
  const server = createServer((socket) => {
    const peer = new Peer(socket);
    script(peer).then(
      () => finish(),
      (error: unknown) => {
        socket.destroy();
        finish(error);
      },
    );
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as AddressInfo).port, done };
}

async function connect(port: number, options: Partial<Parameters<typeof NbdClient.connect>[1]> = {}): Promise<NbdClient> {
  const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk', ...options });
  clients.push(client);
  return client;
}

async function rejection(promise: Promise<unknown>): Promise<NbdError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(NbdError);
  return error as NbdError;
}

describe('NbdClient handshake', () => {
  it('negotiates fixed newstyle, structured replies, base:allocation and GO with info requests', async () => {
    let sent: Awaited<ReturnType<Peer['handshake']>> | undefined;
    const { port, done } = await scripted(async (peer) => {
      sent = await peer.handshake();
      await peer.closed;
    });
    const client = await connect(port);
    expect(sent?.clientFlags).toBe(0b11);
    expect(sent?.options.map((o) => o.option)).toEqual([OPT.STRUCTURED_REPLY, OPT.SET_META_CONTEXT, OPT.GO]);
    expect(sent?.options[0]?.data.length).toBe(0);
    expect(sent?.options[1]?.data).toEqual(cat(u32(4), text('disk'), u32(1), u32(15), text('base:allocation')));
    expect(sent?.options[2]?.data).toEqual(cat(u32(4), text('disk'), u16(3), u16(3), u16(1), u16(2)));

    expect(client.size).toBe(EXPORT_SIZE);
    expect(client.flags).toBe(ALL_FLAGS);
    expect(client.structuredReplies).toBe(true);
    expect([...client.metaContexts]).toEqual([['base:allocation', 7]]);
    expect(client.blockSizes).toEqual({ minimum: 512, preferred: 4096, maximum: 1 << 25 });
    expect(client.description).toBe('a test disk');
    expect([client.canWrite, client.canFlush, client.canFua, client.canTrim, client.canZero]).toEqual([true, true, true, true, true]);
    expect([client.canDf, client.canMultiConn, client.canCache, client.canFastZero]).toEqual([true, true, true, true]);
    client.destroy();
    await done;
  });

  it('reports a read-only export with no optional features', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake(0x1 | 0x2);
      await peer.closed;
    });
    const client = await connect(port);
    expect([client.canWrite, client.canFlush, client.canTrim, client.canDf, client.canCache]).toEqual([false, false, false, false, false]);
    client.destroy();
    await done;
  });

  it('goes on without structured replies when the server refuses them, and skips meta contexts', async () => {
    const { port, done } = await scripted(async (peer) => {
      peer.write(GREETING);
      await peer.read(4);
      expect((await peer.readOption()).option).toBe(OPT.STRUCTURED_REPLY);
      peer.write(optionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP));
      expect((await peer.readOption()).option).toBe(OPT.GO);
      peer.write(optionReply(OPT.GO, REP.INFO, cat(u16(0), u64(4096), u16(0x1 | 0x80))), optionReply(OPT.GO, REP.ACK));
      const read = await peer.readRequest();
      peer.write(simpleReply(read.cookie, 0, Buffer.alloc(read.length, 0x5a)));
      await peer.closed;
    });
    const client = await connect(port);
    expect(client.structuredReplies).toBe(false);
    expect(client.metaContexts.size).toBe(0);
    expect(client.canDf).toBe(false);
    expect((await rejection(client.blockStatus(0, 4096))).code).toBe('ENOTSUP');
    expect(await client.read(0, 8)).toEqual(Buffer.alloc(8, 0x5a));
    client.destroy();
    await done;
  });

  it('rejects connect with ENOENT when GO names an unknown export, and closes the socket', async () => {
    const { port, done } = await scripted(async (peer) => {
      peer.write(GREETING);
      await peer.read(4);
      await peer.readOption();
      peer.write(optionReply(OPT.STRUCTURED_REPLY, REP.ACK));
      await peer.readOption();
      peer.write(optionReply(OPT.SET_META_CONTEXT, REP.ACK));
      await peer.readOption();
      peer.write(optionReply(OPT.GO, REP.ERR_UNKNOWN, text('no export "disk"')));
      await peer.closed;
    });
    const error = await rejection(NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk' }));
    expect(error.code).toBe('ENOENT');
    expect(error.replyType).toBe(REP.ERR_UNKNOWN);
    expect(error.message).toContain('no export');
    await done;
  });

  it('falls back to NBD_OPT_EXPORT_NAME when GO is unsupported, reading the 124 zeroes unless NO_ZEROES', async () => {
    const { port, done } = await scripted(async (peer) => {
      peer.write(GREETING);
      expect((await peer.read(4)).readUInt32BE(0)).toBe(0b01);
      await peer.readOption();
      peer.write(optionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP));
      await peer.readOption();
      peer.write(optionReply(OPT.GO, REP.ERR_UNSUP));
      const exportName = await peer.readOption();
      expect(exportName).toEqual({ option: OPT.EXPORT_NAME, data: text('disk') });
      peer.write(u64(8192), u16(0x1 | 0x4), Buffer.alloc(124));
      const flush = await peer.readRequest();
      expect(flush.type).toBe(CMD.FLUSH);
      peer.write(simpleReply(flush.cookie, 0));
      await peer.closed;
    });
    const client = await connect(port, { noZeroes: false });
    expect(client.size).toBe(8192);
    expect(client.canFlush).toBe(true);
    await client.flush();
    client.destroy();
    await done;
  });

  it('refuses a server that is not fixed newstyle', async () => {
    const { port, done } = await scripted(async (peer) => {
      peer.write(cat(text('NBDMAGIC'), text('IHAVEOPT'), u16(0)));
      await peer.closed;
    });
    expect((await rejection(NbdClient.connect({ host: '127.0.0.1', port }, { exportName: '' }))).code).toBe('EPROTO');
    await done;
  });
});

describe('NbdClient list and info', () => {
  it('lists exports with NBD_OPT_LIST, then aborts', async () => {
    const { port, done } = await scripted(async (peer) => {
      peer.write(GREETING);
      await peer.read(4);
      expect(await peer.readOption()).toEqual({ option: OPT.LIST, data: Buffer.alloc(0) });
      peer.write(
        optionReply(OPT.LIST, REP.SERVER, cat(u32(1), text('a'), text('first'))),
        optionReply(OPT.LIST, REP.SERVER, cat(u32(2), text('bb'))),
        optionReply(OPT.LIST, REP.ACK),
      );
      expect((await peer.readOption()).option).toBe(OPT.ABORT);
      peer.write(optionReply(OPT.ABORT, REP.ACK));
      await peer.closed;
    });
    expect(await NbdClient.list({ host: '127.0.0.1', port })).toEqual([
      { name: 'a', description: 'first' },
      { name: 'bb', description: '' },
    ]);
    await done;
  });

  it('describes one export with NBD_OPT_INFO, then aborts even if the server hangs up', async () => {
    const { port, done } = await scripted(async (peer) => {
      peer.write(GREETING);
      await peer.read(4);
      const info = await peer.readOption();
      expect(info).toEqual({ option: OPT.INFO, data: cat(u32(1), text('v'), u16(3), u16(3), u16(1), u16(2)) });
      peer.write(
        optionReply(OPT.INFO, REP.INFO, cat(u16(0), u64(1 << 30), u16(0x3))),
        optionReply(OPT.INFO, REP.INFO, cat(u16(1), text('v'))),
        optionReply(OPT.INFO, REP.INFO, cat(u16(2), text('volume v'))),
        optionReply(OPT.INFO, REP.INFO, cat(u16(3), u32(1), u32(4096), u32(1 << 25))),
        optionReply(OPT.INFO, REP.ACK),
      );
      expect((await peer.readOption()).option).toBe(OPT.ABORT);
      peer.socket.end();
      await peer.closed;
    });
    expect(await NbdClient.info({ host: '127.0.0.1', port }, 'v')).toEqual({
      name: 'v',
      size: 1 << 30,
      flags: 0x3,
      description: 'volume v',
      blockSizes: { minimum: 1, preferred: 4096, maximum: 1 << 25 },
    });
    await done;
  });
});

describe('NbdClient transmission', () => {
  it('pipelines requests and matches out-of-order replies by cookie', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      const requests = [await peer.readRequest(), await peer.readRequest(), await peer.readRequest()];
      const cookies = new Set(requests.map((r) => r.cookie.toString('hex')));
      expect(cookies.size).toBe(3);
      for (const request of [...requests].reverse()) {
        peer.write(dataChunk(request.cookie, true, request.offset, Buffer.alloc(request.length, request.offset / 4096)));
      }
      await peer.closed;
    });
    const client = await connect(port);
    const reads = [client.read(0, 16), client.read(4096, 16), client.read(8192, 16)];
    expect(client.inFlight).toBe(3);
    expect(await Promise.all(reads)).toEqual([Buffer.alloc(16, 0), Buffer.alloc(16, 1), Buffer.alloc(16, 2)]);
    expect(client.inFlight).toBe(0);
    client.destroy();
    await done;
  });

  it('sends command types, flags, offsets, lengths and write payloads as asked', async () => {
    const seen: Omit<Request, 'cookie'>[] = [];
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      for (let k = 0; k < 8; k++) {
        const { cookie, ...request } = await peer.readRequest();
        seen.push(request);
        if (request.type === CMD.READ) peer.write(dataChunk(cookie, true, request.offset, Buffer.alloc(request.length)));
        else if (request.type === CMD.BLOCK_STATUS) peer.write(chunk(cookie, 1, 5, cat(u32(7), u32(request.length), u32(0))));
        else peer.write(simpleReply(cookie, 0));
      }
      await peer.closed;
    });
    const client = await connect(port);
    await client.write(512, Buffer.from('hello'), { fua: true });
    await client.read(1024, 10, { df: true });
    await client.trim(4096, 4096, { fua: true });
    await client.zero(8192, 4096, { noHole: true, fastZero: true });
    await client.zero(8192, 4096);
    await client.flush();
    await client.cache(0, 65536);
    await client.blockStatus(0, EXPORT_SIZE, { reqOne: true });
    expect(seen).toEqual([
      { type: CMD.WRITE, flags: 0x1, offset: 512, length: 5, payload: text('hello') },
      { type: CMD.READ, flags: 0x4, offset: 1024, length: 10, payload: Buffer.alloc(0) },
      { type: CMD.TRIM, flags: 0x1, offset: 4096, length: 4096, payload: Buffer.alloc(0) },
      { type: CMD.WRITE_ZEROES, flags: 0x2 | 0x10, offset: 8192, length: 4096, payload: Buffer.alloc(0) },
      { type: CMD.WRITE_ZEROES, flags: 0, offset: 8192, length: 4096, payload: Buffer.alloc(0) },
      { type: CMD.FLUSH, flags: 0, offset: 0, length: 0, payload: Buffer.alloc(0) },
      { type: CMD.CACHE, flags: 0, offset: 0, length: 65536, payload: Buffer.alloc(0) },
      { type: CMD.BLOCK_STATUS, flags: 0x8, offset: 0, length: EXPORT_SIZE, payload: Buffer.alloc(0) },
    ]);
    client.destroy();
    await done;
  });

  it('assembles a read from data and hole chunks sent in any order, and exposes them raw', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      for (let k = 0; k < 2; k++) {
        const { cookie, offset } = await peer.readRequest();
        peer.write(
          holeChunk(cookie, false, offset + 4, 8),
          dataChunk(cookie, false, offset + 12, Buffer.from([5, 6, 7, 8])),
          dataChunk(cookie, true, offset, Buffer.from([1, 2, 3, 4])),
        );
      }
      await peer.closed;
    });
    const client = await connect(port);
    expect(await client.read(100, 16)).toEqual(Buffer.from([1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 5, 6, 7, 8]));
    expect(await client.readChunks(200, 16)).toEqual([
      { type: 'hole', offset: 204, length: 8 },
      { type: 'data', offset: 212, data: Buffer.from([5, 6, 7, 8]) },
      { type: 'data', offset: 200, data: Buffer.from([1, 2, 3, 4]) },
    ]);
    client.destroy();
    await done;
  });

  it('rejects a read whose chunks do not cover the request, and keeps the connection', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      const first = await peer.readRequest();
      peer.write(holeChunk(first.cookie, false, 0, 4), noneChunk(first.cookie));
      const second = await peer.readRequest();
      peer.write(simpleReply(second.cookie, 0));
      await peer.closed;
    });
    const client = await connect(port);
    expect((await rejection(client.read(0, 8))).code).toBe('EPROTO');
    await client.flush();
    client.destroy();
    await done;
  });

  it('returns base:allocation extents from a BLOCK_STATUS chunk for its context id', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      const { cookie } = await peer.readRequest();
      peer.write(chunk(cookie, 1, 5, cat(u32(7), u32(4096), u32(0), u32(61440), u32(3))));
      await peer.closed;
    });
    const client = await connect(port);
    expect(await client.blockStatus(0, 65536)).toEqual([
      { length: 4096, flags: 0 },
      { length: 61440, flags: 3 },
    ]);
    client.destroy();
    await done;
  });

  it('rejects only the failed request on error replies; the connection stays usable', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      const write = await peer.readRequest();
      peer.write(simpleReply(write.cookie, 1));
      const read = await peer.readRequest();
      peer.write(errorChunk(read.cookie, false, 5, 'disk on fire'), noneChunk(read.cookie));
      const zero = await peer.readRequest();
      peer.write(errorChunk(zero.cookie, true, 95, ''));
      const odd = await peer.readRequest();
      peer.write(simpleReply(odd.cookie, 4242));
      const last = await peer.readRequest();
      peer.write(dataChunk(last.cookie, true, 0, text('ok')));
      await peer.closed;
    });
    const client = await connect(port);
    expect(await rejection(client.write(0, Buffer.alloc(4)))).toMatchObject({ code: 'EPERM', errno: 1 });
    const readError = await rejection(client.read(0, 4));
    expect(readError).toMatchObject({ code: 'EIO', errno: 5 });
    expect(readError.message).toContain('disk on fire');
    expect(await rejection(client.zero(0, 4096, { fastZero: true }))).toMatchObject({ code: 'ENOTSUP', errno: 95 });
    expect(await rejection(client.flush())).toMatchObject({ code: 'EINVAL', errno: 4242 });
    expect(await client.read(0, 2)).toEqual(text('ok'));
    expect(client.closed).toBe(false);
    client.destroy();
    await done;
  });

  it('rejects every pending request when the connection breaks, and later requests at once', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      await peer.readRequest();
      await peer.readRequest();
      peer.socket.destroy();
    });
    const client = await connect(port);
    const results = await Promise.allSettled([client.read(0, 512), client.write(0, Buffer.alloc(512))]);
    for (const result of results) {
      expect(result.status).toBe('rejected');
      expect(result.status === 'rejected' && result.reason).toMatchObject({ code: 'ECONNRESET' });
    }
    expect(client.closed).toBe(true);
    expect((await rejection(client.flush())).code).toBe('ECONNRESET');
    await done;
  });

  it('drops the connection when the server breaks framing, rejecting what is pending with EPROTO', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      await peer.readRequest();
      peer.write(simpleReply(Buffer.from('notmine!'), 0));
      await peer.closed;
    });
    const client = await connect(port);
    expect((await rejection(client.flush())).code).toBe('EPROTO');
    expect(client.closed).toBe(true);
    await done;
  });

  it('drops the connection on an unknown non-error chunk type', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      const { cookie } = await peer.readRequest();
      peer.write(chunk(cookie, 1, 77, Buffer.from([1])));
      await peer.closed;
    });
    const client = await connect(port);
    expect((await rejection(client.read(0, 1))).code).toBe('EPROTO');
    await done;
  });

  it('sends NBD_CMD_DISC on disconnect and resolves when the server closes', async () => {
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      const flush = await peer.readRequest();
      const disc = await peer.readRequest();
      expect(disc).toMatchObject({ type: CMD.DISC, offset: 0, length: 0 });
      // The in-flight FLUSH is still answered after DISC, as the spec asks of servers.
      peer.write(simpleReply(flush.cookie, 0));
      peer.socket.end();
      await peer.closed;
    });
    const client = await connect(port);
    const flush = client.flush();
    await client.disconnect();
    await flush;
    expect(client.closed).toBe(true);
    expect((await rejection(client.read(0, 1))).code).toBe('ECONNRESET');
    await done;
  });

  it('keeps many large writes in flight without losing or reordering payload bytes', async () => {
    const count = 24;
    const size = 1 << 20;
    const { port, done } = await scripted(async (peer) => {
      await peer.handshake();
      for (let k = 0; k < count; k++) {
        const request = await peer.readRequest();
        expect(request.payload.equals(Buffer.alloc(size, request.offset / size))).toBe(true);
        peer.write(simpleReply(request.cookie, 0));
      }
      await peer.closed;
    });
    const client = await connect(port);
    await Promise.all(Array.from({ length: count }, (_, k) => client.write(k * size, Buffer.alloc(size, k))));
    client.destroy();
    await done;
  });
});
