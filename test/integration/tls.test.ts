/**
 * NBD_OPT_STARTTLS: the spec's FORCEDTLS (`--tls require`) and SELECTIVETLS (`--tls optional`)
 * obligations byte by byte over a raw socket against an in-process server, then real clients
 * (nbdinfo, qemu-img) over TLS with X.509 certificates made for the test, client-certificate
 * verification, and TLS-PSK.
 */
import { randomBytes } from 'node:crypto';
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { ConnectionOptions } from 'node:tls';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer, loadTlsCredentials, type TlsMode } from '../../src/server/index.js';
import { MemoryCatalog, MiB, protocolTestExports } from '../helpers/memory-catalog.js';
import { PeerTimeoutError, RawPeer, decodeRead, type OptionReply, type PeerTarget } from '../helpers/raw-peer.js';
import { CLI_PATH, startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { makeTlsFixture, type TlsFixture } from '../helpers/tls-certs.js';
import { describeResult, makeTempDir, removeTempDirs, requireTool, requireTools, run, runOk } from '../helpers/tools.js';
import * as W from '../helpers/wire.js';

const { Opt, Rep, Cmd } = W;

let fixture: TlsFixture;
let work: string;
/** `alice:KEY`, and the same name with another key. */
let pskFile: string;
let wrongPskFile: string;
let pskKey: Buffer;

beforeAll(async () => {
  work = await makeTempDir('clonebd-tls-');
  fixture = await makeTlsFixture(join(work, 'pki'), [
    { name: 'alice', altNames: ['DNS:alice.example'] },
    { name: 'mallory', untrusted: true },
  ]);
  pskKey = randomBytes(32);
  pskFile = join(work, 'keys.psk');
  wrongPskFile = join(work, 'wrong.psk');
  await writeFile(pskFile, `alice:${pskKey.toString('hex')}\n`);
  await writeFile(wrongPskFile, `alice:${randomBytes(32).toString('hex')}\n`);
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

// ---- raw protocol against an in-process server ------------------------------------------

let catalog: MemoryCatalog | undefined;
let server: NbdServer | undefined;
const peers: RawPeer[] = [];

afterEach(async () => {
  for (const peer of peers.splice(0)) peer.destroy();
  catalog?.releaseAll();
  await server?.close();
  server = undefined;
  catalog = undefined;
});

async function startInProcess(mode: TlsMode, withCa = false): Promise<PeerTarget> {
  catalog = new MemoryCatalog(protocolTestExports());
  const credentials = await loadTlsCredentials({
    cert: fixture.server.cert,
    key: fixture.server.key,
    ...(withCa ? { ca: fixture.ca.cert } : {}),
    psk: pskFile,
  });
  server = new NbdServer({
    catalog,
    logger: pino({ level: 'silent' }),
    tls: { mode, credentials },
    limits: { maxOptionLength: 8 * 1024 },
  });
  const address = await server.listen({ host: '127.0.0.1', port: 0 });
  if (typeof address === 'string') throw new Error('expected a TCP address');
  return { host: '127.0.0.1', port: address.port };
}

async function negotiating(target: PeerTarget, flags?: number): Promise<RawPeer> {
  const peer = await RawPeer.connect(target);
  peers.push(peer);
  await peer.startHandshake(flags);
  return peer;
}

async function trustingServer(extra: ConnectionOptions = {}): Promise<ConnectionOptions> {
  return { ca: await readFile(fixture.ca.cert), ...extra };
}

async function clientCert(name: string): Promise<ConnectionOptions> {
  const pair = fixture.clients.get(name)!;
  return trustingServer({ cert: await readFile(pair.cert), key: await readFile(pair.key) });
}

/** STARTTLS, its ACK, and the TLS handshake. */
async function upgrade(peer: RawPeer, options: ConnectionOptions): Promise<void> {
  const replies = await peer.option(Opt.NBD_OPT_STARTTLS);
  expect(replies.map((r) => r.type)).toEqual([Rep.NBD_REP_ACK]);
  await peer.startTls(options);
}

function only(replies: readonly OptionReply[]): OptionReply {
  expect(replies).toHaveLength(1);
  return replies[0]!;
}

/**
 * Whether the server answers an option after a TLS handshake with these client credentials. A
 * refusal is the handshake failing or the connection closing (with TLS 1.3 the client may finish
 * its side before the server has checked the client certificate); a server that hangs fails.
 */
async function servedOverTls(peer: RawPeer, options: ConnectionOptions): Promise<boolean> {
  expect(only(await peer.option(Opt.NBD_OPT_STARTTLS)).type).toBe(Rep.NBD_REP_ACK);
  try {
    await peer.startTls(options);
    return (await peer.option(Opt.NBD_OPT_LIST)).at(-1)?.type === Rep.NBD_REP_ACK;
  } catch (error) {
    if (error instanceof PeerTimeoutError) throw error;
    return false;
  }
}

describe('--tls require (FORCEDTLS), raw protocol', () => {
  it('every option but STARTTLS and ABORT gets ERR_TLS_REQD before TLS, oversized and unknown ones too, with no information', async () => {
    const target = await startInProcess('require');
    const peer = await negotiating(target);
    const attempts: Array<[number, Buffer]> = [
      [Opt.NBD_OPT_LIST, Buffer.alloc(0)],
      [Opt.NBD_OPT_INFO, W.goData('data', [W.Info.NBD_INFO_NAME, W.Info.NBD_INFO_BLOCK_SIZE])],
      [Opt.NBD_OPT_GO, W.goData('data')],
      [Opt.NBD_OPT_GO, W.goData('no-such-export')],
      [Opt.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
      [Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('data', ['base:allocation'])],
      [Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', ['base:allocation'])],
      [Opt.NBD_OPT_EXTENDED_HEADERS, Buffer.alloc(0)],
      [Opt.NBD_OPT_PEEK_EXPORT, Buffer.alloc(0)],
      [0x4242, Buffer.from('unknown option')],
      [Opt.NBD_OPT_LIST, Buffer.alloc(9 * 1024)],
    ];
    for (const [option, data] of attempts) {
      const reply = only(await peer.option(option, data));
      expect(reply.option, `option ${option}`).toBe(option);
      expect(reply.type, `option ${option}`).toBe(Rep.NBD_REP_ERR_TLS_REQD);
    }
    // Still negotiating: STARTTLS works after all of that.
    await upgrade(peer, await trustingServer());
    const list = await peer.option(Opt.NBD_OPT_LIST);
    expect(list.at(-1)?.type).toBe(Rep.NBD_REP_ACK);
    expect(list.filter((r) => r.type === Rep.NBD_REP_SERVER).length).toBe(catalog!.list().length);
  });

  it('ABORT before TLS gets its ACK', async () => {
    const peer = await negotiating(await startInProcess('require'));
    expect(only(await peer.option(Opt.NBD_OPT_ABORT)).type).toBe(Rep.NBD_REP_ACK);
    await peer.waitForClose();
  });

  it('EXPORT_NAME before TLS closes the connection without a byte of export information', async () => {
    const peer = await negotiating(await startInProcess('require'));
    peer.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('data'));
    expect((await peer.waitForClose()).length).toBe(0);
  });

  it('a client without fixed newstyle cannot start TLS, so it is closed before any option', async () => {
    const peer = await negotiating(await startInProcess('require'), 0);
    peer.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('data'));
    expect((await peer.waitForClose()).length).toBe(0);
  });

  it('after STARTTLS: data over TLS, a second STARTTLS gets ERR_INVALID, and nothing gets ERR_TLS_REQD', async () => {
    const peer = await negotiating(await startInProcess('require'));
    await upgrade(peer, await trustingServer());
    const again = only(await peer.option(Opt.NBD_OPT_STARTTLS));
    expect(again.type).toBe(Rep.NBD_REP_ERR_INVALID);
    const unknown = only(await peer.option(0x4242));
    expect(unknown.type).toBe(Rep.NBD_REP_ERR_UNSUP);
    const missing = await peer.go('no-such-export', [], Opt.NBD_OPT_INFO);
    expect(missing.replies.at(-1)?.type).toBe(Rep.NBD_REP_ERR_UNKNOWN);
    const go = await peer.go('data');
    expect(go.export?.size).toBe(MiB);
    const data = randomBytes(4096);
    const write = await peer.roundTrip({ type: Cmd.NBD_CMD_WRITE, cookie: W.cookie(1), offset: 8192, length: 4096, payload: data });
    expect(write[0]).toMatchObject({ kind: 'simple', error: 0 });
    const read = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: W.cookie(2), offset: 8192, length: 4096 });
    expect(decodeRead(read, 8192, 4096).data).toEqual(data);
  });

  it('STARTTLS with data gets ERR_INVALID, and TLS is still required', async () => {
    const peer = await negotiating(await startInProcess('require'));
    expect(only(await peer.option(Opt.NBD_OPT_STARTTLS, Buffer.from('x'))).type).toBe(Rep.NBD_REP_ERR_INVALID);
    expect(only(await peer.option(Opt.NBD_OPT_LIST)).type).toBe(Rep.NBD_REP_ERR_TLS_REQD);
  });

  it('plain bytes sent behind STARTTLS are never read as NBD: the connection is dropped after the ACK', async () => {
    const peer = await negotiating(await startInProcess('require'));
    peer.send(Buffer.concat([W.option(Opt.NBD_OPT_STARTTLS), W.option(Opt.NBD_OPT_LIST), W.option(Opt.NBD_OPT_GO, W.goData('data'))]));
    const ack = await peer.readOptionReply();
    expect(ack).toMatchObject({ option: Opt.NBD_OPT_STARTTLS, type: Rep.NBD_REP_ACK });
    const rest = await peer.waitForClose();
    const magic = Buffer.alloc(8);
    magic.writeBigUInt64BE(W.NBD_OPTION_REPLY_MAGIC);
    expect(rest.includes(magic)).toBe(false);
  });

  it('a client certificate from an untrusted CA, or none, is refused when the server has a client CA; a trusted one is served', async () => {
    const target = await startInProcess('require', true);
    expect(await servedOverTls(await negotiating(target), await clientCert('mallory'))).toBe(false);
    expect(await servedOverTls(await negotiating(target), await trustingServer())).toBe(false);
    expect(await servedOverTls(await negotiating(target), await clientCert('alice'))).toBe(true);
  });

  it('TLS 1.2 with a PSK cipher suite works too', async () => {
    const peer = await negotiating(await startInProcess('require'));
    await upgrade(peer, {
      maxVersion: 'TLSv1.2',
      ciphers: 'ECDHE-PSK-AES128-CBC-SHA256',
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ identity: 'alice', psk: pskKey }),
    });
    expect((await peer.go('data')).export?.size).toBe(MiB);
  });
});

describe('--tls optional (SELECTIVETLS), raw protocol', () => {
  it('a plain client is served; INFO/GO for an unknown export get ERR_TLS_REQD before TLS and ERR_UNKNOWN after', async () => {
    const target = await startInProcess('optional');
    const plain = await negotiating(target);
    expect((await plain.go('no-such-export', [], Opt.NBD_OPT_INFO)).replies.at(-1)?.type).toBe(Rep.NBD_REP_ERR_TLS_REQD);
    // Only INFO, GO and EXPORT_NAME may answer that TLS is needed.
    expect(only(await plain.option(Opt.NBD_OPT_STRUCTURED_REPLY)).type).toBe(Rep.NBD_REP_ACK);
    const meta = await plain.option(Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('no-such-export', []));
    expect(only(meta).type).toBe(Rep.NBD_REP_ERR_UNKNOWN);
    expect((await plain.go('data')).export?.size).toBe(MiB);

    const secure = await negotiating(target);
    await upgrade(secure, await trustingServer());
    expect((await secure.go('no-such-export', [], Opt.NBD_OPT_INFO)).replies.at(-1)?.type).toBe(Rep.NBD_REP_ERR_UNKNOWN);
    expect((await secure.go('data')).export?.size).toBe(MiB);
  });

  it('STARTTLS forgets what was negotiated before it: structured replies agreed in plain no longer apply', async () => {
    const peer = await negotiating(await startInProcess('optional'));
    expect(only(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY)).type).toBe(Rep.NBD_REP_ACK);
    await upgrade(peer, await trustingServer());
    const go = await peer.go('data');
    expect(go.export!.flags & W.TxFlag.NBD_FLAG_SEND_DF).toBe(0);
    const read = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: W.cookie(3), offset: 0, length: 512 });
    expect(read).toHaveLength(1);
    expect(read[0]).toMatchObject({ kind: 'simple', error: 0 });
  });
});

// ---- real clients against `clonebd serve` ------------------------------------------------

interface NbdinfoJson {
  TLS: boolean;
  exports: Array<{ 'export-name': string; 'export-size': number }>;
}

const VOLUME = 'vol';
const VOLUME_SIZE = MiB;

async function serveWithTls(args: string[]): Promise<ServerProcess> {
  return startServerProcess({
    args: ['--tls-cert', fixture.server.cert, '--tls-key', fixture.server.key, ...args],
    prepare: (pool) => pool.createVolume(VOLUME, VOLUME_SIZE),
  });
}

function nbdsUri(server: ServerProcess, query: string, user = ''): string {
  return `nbds://${user}127.0.0.1:${server.port}/${VOLUME}?${query}`;
}

async function nbdinfo(tool: string, uri: string): Promise<{ ok: boolean; info?: NbdinfoJson; report: string }> {
  const result = await run(tool, ['--json', '--no-content', uri]);
  return { ok: result.code === 0, info: result.code === 0 ? (JSON.parse(result.stdout) as NbdinfoJson) : undefined, report: describeResult(result) };
}

function qemuTarget(server: ServerProcess): string {
  return `driver=nbd,host=127.0.0.1,port=${server.port},export=${VOLUME},tls-creds=tls0`;
}

/** Writes random bytes through qemu-img over TLS, reads them back the same way, compares. */
async function qemuRoundTrip(qemuImg: string, server: ServerProcess, tlsObject: string): Promise<void> {
  const source = join(work, `qemu-src-${server.port}.raw`);
  const copy = join(work, `qemu-copy-${server.port}.raw`);
  const bytes = randomBytes(VOLUME_SIZE);
  await writeFile(source, bytes);
  await runOk(qemuImg, ['convert', '-n', '--object', tlsObject, '-f', 'raw', source, '--target-image-opts', qemuTarget(server)]);
  await runOk(qemuImg, ['convert', '--object', tlsObject, '--image-opts', qemuTarget(server), '-O', 'raw', copy]);
  expect((await readFile(copy)).equals(bytes)).toBe(true);
}

describe('real clients over TLS', () => {
  it('--tls require: nbdinfo and qemu-img over X.509; a plain client is refused', async (ctx) => {
    const [nbdinfoPath, qemuImg] = requireTools(ctx, 'nbdinfo', 'qemu-img');
    const server = await serveWithTls(['--tls', 'require']);
    const secure = await nbdinfo(nbdinfoPath, nbdsUri(server, `tls-certificates=${await fixture.clientDir()}`));
    expect(secure.ok, secure.report).toBe(true);
    expect(secure.info?.TLS).toBe(true);
    expect(secure.info?.exports[0]?.['export-size']).toBe(VOLUME_SIZE);
    const plain = await nbdinfo(nbdinfoPath, server.uri(VOLUME));
    expect(plain.ok, plain.report).toBe(false);
    const dir = await fixture.clientDir();
    await qemuRoundTrip(qemuImg, server, `tls-creds-x509,id=tls0,dir=${dir},endpoint=client`);
  });

  describe('--tls optional with a client CA and PSK keys', () => {
    let server: ServerProcess;
    beforeAll(async () => {
      server = await serveWithTls(['--tls', 'optional', '--tls-ca', fixture.ca.cert, '--tls-psk', pskFile]);
    });

    it('nbdinfo connects in plain and over TLS', async (ctx) => {
      const tool = requireTool(ctx, 'nbdinfo');
      const plain = await nbdinfo(tool, server.uri(VOLUME));
      expect(plain.ok, plain.report).toBe(true);
      expect(plain.info?.TLS).toBe(false);
      const secure = await nbdinfo(tool, nbdsUri(server, `tls-certificates=${await fixture.clientDir('alice')}`));
      expect(secure.ok, secure.report).toBe(true);
      expect(secure.info?.TLS).toBe(true);
    });

    it('client certificates: a trusted one is accepted (nbdinfo, qemu-img); none, or one from another CA, is refused', async (ctx) => {
      const [tool, qemuImg] = requireTools(ctx, 'nbdinfo', 'qemu-img');
      const mallory = await fixture.clientDir();
      const malloryPair = fixture.clients.get('mallory')!;
      await writeFile(join(mallory, 'client-cert.pem'), await readFile(malloryPair.cert));
      await writeFile(join(mallory, 'client-key.pem'), await readFile(malloryPair.key));
      for (const [dir, expected] of [
        [await fixture.clientDir('alice'), true],
        [await fixture.clientDir(), false],
        [mallory, false],
      ] as const) {
        const result = await nbdinfo(tool, nbdsUri(server, `tls-certificates=${dir}`));
        expect(result.ok, result.report).toBe(expected);
      }
      await qemuRoundTrip(qemuImg, server, `tls-creds-x509,id=tls0,dir=${await fixture.clientDir('alice')},endpoint=client`);
    });

    it('TLS-PSK: nbdinfo and qemu-img connect with the key; a wrong key is refused', async (ctx) => {
      const [tool, qemuImg] = requireTools(ctx, 'nbdinfo', 'qemu-img');
      const good = await nbdinfo(tool, nbdsUri(server, `tls-psk-file=${pskFile}`, 'alice@'));
      expect(good.ok, good.report).toBe(true);
      expect(good.info?.TLS).toBe(true);
      const wrong = await nbdinfo(tool, nbdsUri(server, `tls-psk-file=${wrongPskFile}`, 'alice@'));
      expect(wrong.ok, wrong.report).toBe(false);
      const pskDir = join(work, 'qemu-psk');
      await mkdir(pskDir, { recursive: true });
      await writeFile(join(pskDir, 'keys.psk'), await readFile(pskFile));
      await qemuRoundTrip(qemuImg, server, `tls-creds-psk,id=tls0,dir=${pskDir},endpoint=client,username=alice`);
    });
  });
});

describe('TLS configuration errors', () => {
  it('serve refuses to start with --tls require but no credentials, or with TLS files while TLS is off', async () => {
    const pool = join(work, 'refused-pool');
    const noCredentials = await run(process.execPath, [CLI_PATH, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--tls', 'require']);
    expect(noCredentials.code, describeResult(noCredentials)).not.toBe(0);
    expect(noCredentials.stderr).toMatch(/--tls-cert/);
    const filesWhileOff = await run(process.execPath, [
      CLI_PATH, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--tls-cert', fixture.server.cert, '--tls-key', fixture.server.key,
    ]);
    expect(filesWhileOff.code, describeResult(filesWhileOff)).not.toBe(0);
    expect(filesWhileOff.stderr).toMatch(/TLS is off/);
  });

  it('a key that does not belong to the certificate is refused at start', async () => {
    await expect(
      (async () => {
        const credentials = await loadTlsCredentials({ cert: fixture.server.cert, key: fixture.ca.key });
        return new NbdServer({ catalog: new MemoryCatalog([]), logger: pino({ level: 'silent' }), tls: { mode: 'require', credentials } });
      })(),
    ).rejects.toThrow(/TLS credentials rejected/);
  });
});
