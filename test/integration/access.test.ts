/**
 * Per-export access: read-only exports (flags and EPERM), allow-lists of client names proved by a
 * verified client certificate (CN or SAN) or a PSK identity, how a client off the list sees the
 * export (not at all), the `--access` file and its form inside `--config`, and the owner-only
 * sockets in the pool.
 */
import { randomBytes } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ConnectionOptions } from 'node:tls';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer, loadTlsCredentials, parseAccessConfig, type TlsMode } from '../../src/server/index.js';
import { MemoryCatalog, MiB } from '../helpers/memory-catalog.js';
import { RawPeer, openTransmission, replyError, type OptionReply, type PeerTarget } from '../helpers/raw-peer.js';
import { CLI_PATH, startServerProcess, stopAllServerProcesses } from '../helpers/server-process.js';
import { makeTlsFixture, type TlsFixture } from '../helpers/tls-certs.js';
import { describeResult, makeTempDir, removeTempDirs, requireTool, run } from '../helpers/tools.js';
import * as W from '../helpers/wire.js';

const { Opt, Rep, Cmd, TxFlag, Errno } = W;

let fixture: TlsFixture;
let work: string;
let pskFile: string;
let pskKey: Buffer;

beforeAll(async () => {
  work = await makeTempDir('clonebd-access-');
  fixture = await makeTlsFixture(join(work, 'pki'), [{ name: 'alice', altNames: ['DNS:alice.example'] }, { name: 'bob' }]);
  pskKey = randomBytes(32);
  pskFile = join(work, 'keys.psk');
  await writeFile(pskFile, `carol:${pskKey.toString('hex')}\n`);
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

const RULES = {
  exports: {
    frozen: { readOnly: true },
    'alice-only': { allow: ['alice'] },
    'by-san': { allow: ['alice.example'], readOnly: true },
    'carol-only': { allow: ['carol'] },
  },
};

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

async function startInProcess(mode: TlsMode): Promise<PeerTarget> {
  catalog = new MemoryCatalog(
    ['open', 'frozen', 'alice-only', 'by-san', 'carol-only'].map((name) => ({ name, size: MiB })),
  );
  server = new NbdServer({
    catalog,
    logger: pino({ level: 'silent' }),
    tls: {
      mode,
      credentials: await loadTlsCredentials({ cert: fixture.server.cert, key: fixture.server.key, ca: fixture.ca.cert, psk: pskFile }),
    },
    access: parseAccessConfig(RULES, 'test rules'),
  });
  const address = await server.listen({ host: '127.0.0.1', port: 0 });
  if (typeof address === 'string') throw new Error('expected a TCP address');
  return { host: '127.0.0.1', port: address.port };
}

async function asClient(target: PeerTarget, tls: ConnectionOptions | undefined): Promise<RawPeer> {
  const peer = await RawPeer.connect(target);
  peers.push(peer);
  await peer.startHandshake();
  if (tls !== undefined) {
    expect((await peer.option(Opt.NBD_OPT_STARTTLS)).map((r) => r.type)).toEqual([Rep.NBD_REP_ACK]);
    await peer.startTls({ ca: await readFile(fixture.ca.cert), ...tls });
  }
  return peer;
}

async function certOf(name: string): Promise<ConnectionOptions> {
  const pair = fixture.clients.get(name)!;
  return { cert: await readFile(pair.cert), key: await readFile(pair.key) };
}

const psk = (identity: string): ConnectionOptions => ({
  checkServerIdentity: () => undefined,
  pskCallback: () => ({ identity, psk: pskKey }),
});

async function listed(peer: RawPeer): Promise<string[]> {
  const replies = await peer.option(Opt.NBD_OPT_LIST);
  expect(replies.at(-1)?.type).toBe(Rep.NBD_REP_ACK);
  return replies
    .filter((r) => r.type === Rep.NBD_REP_SERVER)
    .map((r) => W.parseRepServer(r.data).name.toString('utf8'))
    .sort();
}

function finalType(replies: readonly OptionReply[]): number | undefined {
  return replies.at(-1)?.type;
}

describe('allow-lists', () => {
  it('a client on the list (by CN) sees and uses the export; one off it finds no such export anywhere', async () => {
    const target = await startInProcess('require');
    const alice = await asClient(target, await certOf('alice'));
    expect(await listed(alice)).toEqual(['alice-only', 'by-san', 'frozen', 'open']);
    expect((await alice.go('alice-only')).export?.size).toBe(MiB);

    const bob = await asClient(target, await certOf('bob'));
    expect(await listed(bob)).toEqual(['frozen', 'open']);
    for (const option of [Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO]) {
      const replies = (await bob.go('alice-only', [], option)).replies;
      expect(replies.map((r) => r.type)).toEqual([Rep.NBD_REP_ERR_UNKNOWN]);
      // Word for word what a name that does not exist gets.
      const missing = (await bob.go('alice-only-not', [], option)).replies;
      expect(replies[0]!.data.toString().replace('alice-only', 'X')).toBe(missing[0]!.data.toString().replace('alice-only-not', 'X'));
    }
    await bob.option(Opt.NBD_OPT_STRUCTURED_REPLY);
    const meta = await bob.option(Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('alice-only', ['base:allocation']));
    expect(finalType(meta)).toBe(Rep.NBD_REP_ERR_UNKNOWN);
    bob.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('alice-only'));
    expect((await bob.waitForClose()).length).toBe(0);
  });

  it('a subject alternative name matches too, and the rule can make the export read-only for those it admits', async () => {
    const target = await startInProcess('require');
    const alice = await asClient(target, await certOf('alice'));
    const go = await alice.go('by-san');
    expect(go.export!.flags & TxFlag.NBD_FLAG_READ_ONLY).not.toBe(0);
  });

  it('a PSK identity is a client name', async () => {
    const target = await startInProcess('require');
    const carol = await asClient(target, psk('carol'));
    expect(await listed(carol)).toEqual(['carol-only', 'frozen', 'open']);
    expect((await carol.go('carol-only')).export?.size).toBe(MiB);
  });

  it('with --tls optional, a plain client does not see allow-listed exports, and INFO/GO for them say TLS is required', async () => {
    const target = await startInProcess('optional');
    const plain = await asClient(target, undefined);
    expect(await listed(plain)).toEqual(['frozen', 'open']);
    expect(finalType((await plain.go('alice-only', [], Opt.NBD_OPT_INFO)).replies)).toBe(Rep.NBD_REP_ERR_TLS_REQD);
    expect(finalType((await plain.go('alice-only')).replies)).toBe(Rep.NBD_REP_ERR_TLS_REQD);
    expect((await plain.go('open')).export?.size).toBe(MiB);
  });
});

describe('read-only exports', () => {
  it('have NBD_FLAG_READ_ONLY and no write capabilities; WRITE, TRIM and WRITE_ZEROES get EPERM; reads work; nothing changes', async () => {
    const target = await startInProcess('optional');
    const peer = await asClient(target, await certOf('bob'));
    const go = await peer.go('frozen');
    const flags = go.export!.flags;
    expect(flags & TxFlag.NBD_FLAG_READ_ONLY).not.toBe(0);
    expect(flags & (TxFlag.NBD_FLAG_SEND_TRIM | TxFlag.NBD_FLAG_SEND_WRITE_ZEROES | TxFlag.NBD_FLAG_SEND_FAST_ZERO)).toBe(0);
    const writes = [
      { type: Cmd.NBD_CMD_WRITE, cookie: W.cookie(1), offset: 0, payload: Buffer.alloc(4096, 7) },
      { type: Cmd.NBD_CMD_TRIM, cookie: W.cookie(2), offset: 0, length: 4096 },
      { type: Cmd.NBD_CMD_WRITE_ZEROES, cookie: W.cookie(3), offset: 0, length: 4096 },
    ];
    for (const request of writes) expect(replyError(await peer.roundTrip(request)), `command ${request.type}`).toBe(Errno.NBD_EPERM);
    expect(replyError(await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: W.cookie(4), offset: 0, length: 4096 }))).toBe(0);
    const changes = catalog!.volume('frozen').calls.filter((call) => call.op !== 'read');
    expect(changes).toEqual([]);
  });
});

// ---- `clonebd serve` with an access file --------------------------------------------------

describe('clonebd serve --access', () => {
  it('nbdinfo: a read-only export says so; an allow-listed export is listed and opened for alice only', async (ctx) => {
    const nbdinfo = requireTool(ctx, 'nbdinfo');
    const accessFile = join(work, 'access.json');
    await writeFile(accessFile, JSON.stringify(RULES));
    const served = await startServerProcess({
      args: ['--tls', 'require', '--tls-cert', fixture.server.cert, '--tls-key', fixture.server.key, '--tls-ca', fixture.ca.cert, '--access', accessFile],
      prepare: async (pool) => {
        for (const name of ['open', 'frozen', 'alice-only']) await pool.createVolume(name, MiB);
      },
    });
    const uri = (name: string, dir: string): string => `nbds://127.0.0.1:${served.port}/${name}?tls-certificates=${dir}`;
    const aliceDir = await fixture.clientDir('alice');
    const bobDir = await fixture.clientDir('bob');

    const frozen = await run(nbdinfo, ['--json', '--no-content', uri('frozen', bobDir)]);
    expect(frozen.code, describeResult(frozen)).toBe(0);
    expect((JSON.parse(frozen.stdout) as { exports: Array<{ is_read_only: boolean }> }).exports[0]?.is_read_only).toBe(true);

    const names = async (dir: string): Promise<string[]> => {
      const result = await run(nbdinfo, ['--list', '--json', '--no-content', uri('', dir)]);
      expect(result.code, describeResult(result)).toBe(0);
      return (JSON.parse(result.stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']).sort();
    };
    expect(await names(aliceDir)).toContain('alice-only');
    expect(await names(bobDir)).not.toContain('alice-only');
    expect((await run(nbdinfo, ['--no-content', uri('alice-only', aliceDir)])).code).toBe(0);
    const refused = await run(nbdinfo, ['--no-content', uri('alice-only', bobDir)]);
    expect(refused.code, describeResult(refused)).not.toBe(0);

    // The pool's own socket is owner-only and trusted: no TLS, no policy.
    const pool = served.pool;
    for (const socket of ['admin.sock', 'nbd.sock']) {
      expect(((await stat(join(pool, socket))).mode & 0o777).toString(8), socket).toBe('600');
    }
    const owner = await openTransmission({ path: join(pool, 'nbd.sock') }, { exportName: 'frozen' });
    expect(owner.export.flags & TxFlag.NBD_FLAG_READ_ONLY).toBe(0);
    owner.peer.destroy();
  });

  it('takes the rules as an object inside --config too', async () => {
    const config = join(work, 'config.json');
    await writeFile(config, JSON.stringify({ access: { exports: { frozen: { readOnly: true } } } }));
    const served = await startServerProcess({
      args: ['--config', config],
      prepare: (pool) => pool.createVolume('frozen', MiB),
    });
    const opened = await openTransmission({ host: '127.0.0.1', port: served.port }, { exportName: 'frozen' });
    try {
      expect(opened.export.flags & TxFlag.NBD_FLAG_READ_ONLY).not.toBe(0);
      const write = await opened.peer.roundTrip({ type: Cmd.NBD_CMD_WRITE, cookie: W.cookie(9), offset: 0, payload: Buffer.alloc(512) });
      expect(replyError(write)).toBe(Errno.NBD_EPERM);
    } finally {
      opened.peer.destroy();
    }
  });

  it('refuses to start on a malformed file, or on allow-lists no client could satisfy', async () => {
    const pool = join(work, 'never-served');
    const cases: Array<[object, RegExp]> = [
      [{ exports: { frozen: { readonly: true } } }, /unknown key "readonly"/],
      [{ exports: { frozen: { allow: 'alice' } } }, /allow must be a list/],
      [{ exports: { secret: { allow: ['alice'] } } }, /allow-lists need clients that prove a name/],
    ];
    for (const [rules, message] of cases) {
      const file = join(work, `bad-${randomBytes(4).toString('hex')}.json`);
      await writeFile(file, JSON.stringify(rules));
      const result = await run(process.execPath, [CLI_PATH, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--access', file]);
      expect(result.code, describeResult(result)).not.toBe(0);
      expect(result.stderr, describeResult(result)).toMatch(message);
    }
  });
});
