/**
 * Hostile clients against a real server process: random bytes, and valid handshakes and request
 * streams with bytes flipped, cut, inserted and repeated, sent in random pieces over TCP. After
 * every attack the server is alive, a well-behaved connection opened before the attacks still reads
 * back what it wrote, and a new connection still works. Connections that claim huge payloads and
 * options and then stall cost the server memory only for the bytes they actually sent.
 */
import fc from 'fast-check';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../native-free/index.js';
import type { Pool } from '../../src/store/index.js';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { removeTempDirs } from '../helpers/tools.js';
import {
  Cmd,
  CmdFlag,
  ClientFlag,
  GREETING_LENGTH,
  Opt,
  cookie,
  clientFlags,
  goData,
  metaContextData,
  option,
  request,
} from '../helpers/wire.js';

const MiB = 2 ** 20;
const VOLUME_SIZE = 8 * MiB;
const ATTACK_TIMEOUT_MS = 15_000;

let server: ServerProcess;
let healthy: NbdClient;

beforeAll(async () => {
  server = await startServerProcess({
    args: ['--no-default-volume', '--log-level', 'warn'],
    prepare: (pool: Pool) => pool.createVolume('fuzz', VOLUME_SIZE),
  });
  healthy = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: 'fuzz' });
});

afterAll(async () => {
  healthy?.destroy();
  await stopAllServerProcesses();
  await removeTempDirs();
});

/** Sends `bytes` in the given pieces, then half-closes; resolves when the server has closed too. */
function attack(bytes: Buffer, pieces: readonly number[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: server.host, port: server.port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the server kept an attacking connection open ${ATTACK_TIMEOUT_MS} ms after its client finished`));
    }, ATTACK_TIMEOUT_MS);
    socket.on('data', () => undefined);
    // The server may hang up first (a fatal protocol error); our writes then fail, which is fine.
    socket.on('error', () => undefined);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.on('connect', () => {
      let at = 0;
      for (const piece of pieces) {
        if (at >= bytes.length) break;
        socket.write(bytes.subarray(at, at + piece));
        at += piece;
      }
      if (at < bytes.length) socket.write(bytes.subarray(at));
      socket.end();
    });
  });
}

async function stillServing(): Promise<void> {
  const offset = Math.floor(Math.random() * (VOLUME_SIZE / 4096)) * 4096;
  const data = randomBytes(4096);
  await healthy.write(offset, data);
  expect((await healthy.read(offset, 4096)).equals(data), 'the well-behaved connection reads back what it wrote').toBe(true);
  const fresh = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: 'fuzz' });
  try {
    expect((await fresh.read(offset, 4096)).equals(data), 'a new connection reads it too').toBe(true);
  } finally {
    await fresh.disconnect();
  }
}

const exportName = fc.oneof(fc.constant('fuzz'), fc.constant(''), fc.string({ maxLength: 40 }), fc.constant('x'.repeat(5000)));

const handshakeOption: fc.Arbitrary<Buffer> = fc.oneof(
  exportName.map((name) => option(Opt.NBD_OPT_GO, goData(name, [0, 1, 2, 3]))),
  exportName.map((name) => option(Opt.NBD_OPT_INFO, goData(name, [3]))),
  fc.constant(option(Opt.NBD_OPT_LIST)),
  fc.constant(option(Opt.NBD_OPT_STRUCTURED_REPLY)),
  fc.constant(option(Opt.NBD_OPT_STARTTLS)),
  exportName.map((name) => option(Opt.NBD_OPT_SET_META_CONTEXT, metaContextData(name, ['base:allocation', 'qemu:dirty-bitmap:x']))),
  exportName.map((name) => option(Opt.NBD_OPT_LIST_META_CONTEXT, metaContextData(name, []))),
  fc.record({ opt: fc.integer({ min: 0, max: 2 ** 32 - 1 }), data: fc.uint8Array({ maxLength: 64 }) }).map(({ opt, data }) => option(opt, data)),
  fc.integer({ min: 0, max: 2 ** 32 - 1 }).map((declared) => option(Opt.NBD_OPT_GO, Buffer.alloc(8), declared)),
);

const transmissionRequest: fc.Arbitrary<Buffer> = fc
  .record({
    type: fc.oneof(fc.constantFrom(...Object.values(Cmd)), fc.integer({ min: 0, max: 0xffff })),
    flags: fc.oneof(fc.constant(0), fc.constantFrom(...Object.values(CmdFlag)), fc.integer({ min: 0, max: 0xffff })),
    offset: fc.oneof(fc.integer({ min: 0, max: VOLUME_SIZE }), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })),
    length: fc.oneof(fc.integer({ min: 0, max: 65536 }), fc.integer({ min: 0, max: 2 ** 32 - 1 })),
    payload: fc.option(fc.uint8Array({ maxLength: 8192 }), { nil: undefined }),
    cookie: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  })
  .map((fields) => request({ ...fields, cookie: cookie(fields.cookie) }));

/** A client's side of a valid-looking session: flags, options, then requests. */
const session: fc.Arbitrary<Buffer> = fc
  .record({
    flags: fc.constantFrom(ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES, ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE, 0),
    options: fc.array(handshakeOption, { maxLength: 6 }),
    go: fc.boolean(),
    requests: fc.array(transmissionRequest, { maxLength: 12 }),
  })
  .map(({ flags, options, go, requests }) =>
    Buffer.concat([
      clientFlags(flags),
      ...options,
      ...(go ? [option(Opt.NBD_OPT_GO, goData('fuzz'))] : []),
      ...requests,
    ]),
  );

type Mutation =
  | { kind: 'flip'; at: number; value: number }
  | { kind: 'cut'; at: number }
  | { kind: 'insert'; at: number; bytes: Uint8Array }
  | { kind: 'repeat'; at: number; length: number };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), value: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant('cut' as const), at: fc.nat() }),
  fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 32 }) }),
  fc.record({ kind: fc.constant('repeat' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 64 }) }),
);

function mutate(bytes: Buffer, mutations: readonly Mutation[]): Buffer {
  let out = Buffer.from(bytes);
  for (const change of mutations) {
    if (out.length === 0) break;
    const at = change.at % out.length;
    if (change.kind === 'flip') out[at] = out[at]! ^ change.value;
    else if (change.kind === 'cut') out = out.subarray(0, at);
    else if (change.kind === 'insert') out = Buffer.concat([out.subarray(0, at), change.bytes, out.subarray(at)]);
    else out = Buffer.concat([out.subarray(0, at + change.length), out.subarray(at, at + change.length), out.subarray(at + change.length)]);
  }
  return out;
}

const pieces = fc.array(fc.integer({ min: 1, max: 600 }), { maxLength: 20 });

async function residentBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const kib = /^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1];
  if (kib === undefined) throw new Error(`no VmRSS for ${pid}`);
  return Number(kib) * 1024;
}

describe('hostile clients against a real server', () => {
  it('random bytes: the server survives and keeps serving everyone else', { timeout: 120_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 4096 }), pieces, async (bytes, split) => {
        await attack(Buffer.from(bytes), split);
        await stillServing();
      }),
      { numRuns: 200 },
    );
  });

  it('mutated handshakes and request streams: the server survives and keeps serving everyone else', { timeout: 180_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(session, fc.array(mutation, { maxLength: 4 }), pieces, async (valid, mutations, split) => {
        await attack(mutate(valid, mutations), split);
        await stillServing();
      }),
      { numRuns: 400 },
    );
  });

  it('stalled connections claiming huge options and payloads cost memory only for what they sent', { timeout: 60_000 }, async () => {
    const stalled = 40;
    const before = await residentBytes(server.pid);
    const sockets = await Promise.all(
      Array.from({ length: stalled }, (_, i) =>
        new Promise<net.Socket>((resolve, reject) => {
          const socket = net.connect({ host: server.host, port: server.port });
          socket.once('error', reject);
          let received = 0;
          let sent = false;
          socket.on('data', (chunk: Buffer) => {
            received += chunk.length;
            // Greeting in: half the connections claim a 4 GiB option, half go to transmission
            // and claim a 32 MiB write, then send a few bytes of either and stall.
            if (received >= GREETING_LENGTH && !sent) {
              sent = true;
              const flags = clientFlags(ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES);
              if (i % 2 === 0) {
                socket.write(Buffer.concat([flags, option(Opt.NBD_OPT_GO, Buffer.alloc(100), 2 ** 32 - 1)]), () => resolve(socket));
              } else {
                socket.write(
                  Buffer.concat([
                    flags,
                    option(Opt.NBD_OPT_GO, goData('fuzz')),
                    request({ type: Cmd.NBD_CMD_WRITE, cookie: cookie(i), offset: 0, length: 32 * MiB, payload: Buffer.alloc(1000) }),
                  ]),
                  () => resolve(socket),
                );
              }
            }
          });
        }),
      ),
    );
    try {
      await stillServing();
      const grown = (await residentBytes(server.pid)) - before;
      // 40 claims of 32 MiB or 4 GiB would be over a gigabyte if the server trusted them.
      expect(grown, `resident memory grew by ${(grown / MiB).toFixed(1)} MiB`).toBeLessThan(64 * MiB);
    } finally {
      for (const socket of sockets) socket.destroy();
    }
    await stillServing();
  });
});
