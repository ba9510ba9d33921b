/**
 * The volume, snapshot and pool commands as a person at a shell runs them: the built CLI against a
 * real `clonebd serve`, with data written and read back through real NBD clients (qemu-io,
 * nbdinfo, nbdcopy, fio). Checks the `--json` output of every command, the space accounting, each
 * error's exit code and message, `--help` examples, and a clone taken while fio is writing.
 *
 * One daemon serves the whole file (each test uses its own volume names); tests that need a pool
 * with no daemon, or a daemon that died, make their own.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import {
  CLI_PATH,
  startServerProcess,
  stopAllServerProcesses,
  type LogLine,
  type ServerProcess,
} from '../helpers/server-process.js';
import { describeResult, makeTempDir, removeTempDirs, requireTools, run, type RunResult } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1 << 20;

/** The fields of `volume show --json` this file checks; written out here, not imported. */
interface VolumeJson {
  name: string;
  kind: 'volume' | 'snapshot';
  size: number;
  readOnly: boolean;
  parent: string | null;
  snapshots: string[];
  exclusiveBytes: number;
  sharedBytes: number;
  clients: number;
  createdAt: string;
  labels: Record<string, string>;
}

interface PoolJson {
  capacityBytes: number;
  usedBytes: number;
  freeBytes: number;
  layers: number;
  volumes: Array<{ name: string; kind: string; size: number; exclusiveBytes: number; sharedBytes: number }>;
}

let server: ServerProcess;
const children = new Set<ChildProcess>();

beforeAll(async () => {
  server = await startServerProcess({ args: ['--no-default-volume'] });
});

afterEach(() => {
  for (const child of children) child.kill('SIGKILL');
  children.clear();
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

/** The caller's environment without CLONEBD_* settings, which would change what the CLI does. */
function cleanEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('CLONEBD_')) env[key] = value;
  return { ...env, ...extra };
}

/** Runs `clonebd ARGS --pool POOL` (the shared daemon's pool unless told otherwise). */
function cli(args: readonly string[], pool: string | null = server.pool, env?: NodeJS.ProcessEnv): Promise<RunResult> {
  return run(process.execPath, [CLI_PATH, ...args, ...(pool === null ? [] : ['--pool', pool])], {
    env: env ?? cleanEnv(),
    timeoutMs: 20_000,
  });
}

async function cliOk(args: readonly string[]): Promise<RunResult> {
  const result = await cli(args);
  expect(result.code, describeResult(result)).toBe(0);
  return result;
}

/** Runs a command with `--json`, expects exit 0, and parses what it printed. */
async function cliJson<T>(args: readonly string[]): Promise<T> {
  const result = await cliOk([...args, '--json']);
  try {
    return JSON.parse(result.stdout) as T;
  } catch (error) {
    throw new Error(`--json output does not parse\n${describeResult(result)}`, { cause: error });
  }
}

/** A failed command: the exit code, a one-line message a person can read, no stack trace. */
function expectFailure(result: RunResult, code: number, message: RegExp): void {
  const report = describeResult(result);
  expect(result.code, report).toBe(code);
  expect(result.stderr, report).toMatch(message);
  expect(result.stderr, report).not.toMatch(/\n\s+at /);
}

const show = (name: string): Promise<VolumeJson> => cliJson<VolumeJson>(['volume', 'show', name]);
const list = (): Promise<VolumeJson[]> => cliJson<VolumeJson[]>(['volume', 'list']);

function nbdUri(name: string): string {
  return server.uri(name);
}

/** qemu-io commands (`-c`) against a volume; asserts success (qemu-io exits 1 on a pattern mismatch). */
async function qemuIo(qemuIoPath: string, name: string, commands: string[], readOnly = false): Promise<RunResult> {
  const args = ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...commands.flatMap((command) => ['-c', command]), nbdUri(name)];
  const result = await run(qemuIoPath, args);
  const report = describeResult(result);
  expect(result.code, report).toBe(0);
  expect(result.stdout + result.stderr, report).not.toMatch(/failed|error/i);
  return result;
}

async function nbdinfoSize(nbdinfo: string, name: string): Promise<number> {
  const result = await run(nbdinfo, ['--size', nbdUri(name)]);
  expect(result.code, describeResult(result)).toBe(0);
  return Number(result.stdout.trim());
}

/** The log line with this message for this export that arrives after `since` lines were logged. */
function waitForExportLog(msg: string, exportName: string, since: number): Promise<LogLine> {
  return server.waitForLog((line) => line.msg === msg && line.export === exportName && server.logs.indexOf(line) >= since);
}

function tools(ctx: TestContext): { qemuIo: string; nbdinfo: string } {
  const [qemuIoPath, nbdinfo] = requireTools(ctx, 'qemu-io', 'nbdinfo');
  return { qemuIo: qemuIoPath, nbdinfo };
}

describe('volume lifecycle', () => {
  it('creates volumes from sizes 10M, 10MiB and 10485760, all of 10 MiB, and shows them', async () => {
    const created = await Promise.all(
      [
        ['size-m', '10M'],
        ['size-mib', '10MiB'],
        ['size-bytes', '10485760'],
      ].map(([name, size]) => cliJson<VolumeJson>(['volume', 'create', name!, '--size', size!])),
    );
    for (const volume of created) {
      expect(volume).toMatchObject({
        kind: 'volume',
        size: 10 * MiB,
        readOnly: false,
        parent: null,
        snapshots: [],
        exclusiveBytes: 0,
        sharedBytes: 0,
        clients: 0,
      });
    }
    expect(created.map((volume) => volume.name)).toEqual(['size-m', 'size-mib', 'size-bytes']);

    const shown = await show('size-mib');
    expect(shown).toEqual(created[1]);
    const listed = await list();
    expect(listed.filter((volume) => volume.name.startsWith('size-')).map((volume) => [volume.name, volume.size])).toEqual(
      expect.arrayContaining([
        ['size-m', 10 * MiB],
        ['size-mib', 10 * MiB],
        ['size-bytes', 10 * MiB],
      ]),
    );

    const text = await cliOk(['volume', 'create', 'size-text', '--size', '2MiB']);
    expect(text.stdout).toMatch(/size-text.*2\.00 MiB/);
    const table = await cliOk(['volume', 'list']);
    expect(table.stdout).toMatch(/^NAME\s+KIND\s+SIZE\s+USED\s+EXCLUSIVE\s+SHARED\s+PARENT\s+RO\s+CLIENTS$/m);
    expect(table.stdout).toMatch(/^size-m\s+volume\s+10\.0 MiB\s+0 B\s+0 B\s+0 B\s+-\s+no\s+0$/m);
    const details = await cliOk(['volume', 'show', 'size-bytes']);
    expect(details.stdout).toMatch(/size\s+10\.0 MiB \(10485760 bytes\)/);
  });

  it('accounts exclusive and shared bytes through writes, a snapshot and overwrites', async (ctx) => {
    const { qemuIo: qemuIoPath, nbdinfo } = tools(ctx);
    await cliOk(['volume', 'create', 'acct', '--size', '4M']);
    await qemuIo(qemuIoPath, 'acct', ['write -P 0xab 0 1M']);
    expect(await show('acct')).toMatchObject({ exclusiveBytes: MiB, sharedBytes: 0 });

    const snapshot = await cliJson<VolumeJson>(['snapshot', 'create', 'acct', 'acct-snap']);
    expect(snapshot).toMatchObject({
      name: 'acct-snap',
      kind: 'snapshot',
      size: 4 * MiB,
      readOnly: true,
      parent: 'acct',
      exclusiveBytes: 0,
      sharedBytes: MiB,
    });
    const afterSnapshot = await list();
    expect(afterSnapshot.find((volume) => volume.name === 'acct')).toMatchObject({
      exclusiveBytes: 0,
      sharedBytes: MiB,
      snapshots: ['acct-snap'],
    });
    expect(afterSnapshot.find((volume) => volume.name === 'acct-snap')).toMatchObject({ exclusiveBytes: 0, sharedBytes: MiB });

    const snapshotsOfAcct = await cliJson<VolumeJson[]>(['snapshot', 'list', 'acct']);
    expect(snapshotsOfAcct.map((volume) => volume.name)).toEqual(['acct-snap']);
    const allSnapshots = await cliJson<VolumeJson[]>(['snapshot', 'list']);
    expect(allSnapshots.every((volume) => volume.kind === 'snapshot')).toBe(true);
    expect(allSnapshots.map((volume) => volume.name)).toContain('acct-snap');

    // Fresh space written after the snapshot is the volume's own; the snapshot's MiB stays shared.
    await qemuIo(qemuIoPath, 'acct', ['write -P 0xee 2M 256k']);
    const usage = await list();
    expect(usage.find((volume) => volume.name === 'acct')).toMatchObject({ exclusiveBytes: 256 * KiB, sharedBytes: MiB });
    expect(usage.find((volume) => volume.name === 'acct-snap')).toMatchObject({ exclusiveBytes: 0, sharedBytes: MiB });

    // The snapshot still holds the data of the moment it was taken, and is read-only over NBD.
    await qemuIo(qemuIoPath, 'acct-snap', ['read -P 0xab 0 1M', 'read -P 0 1M 3M'], true);
    await qemuIo(qemuIoPath, 'acct', ['read -P 0xab 0 1M', 'read -P 0 1M 1M', 'read -P 0xee 2M 256k'], true);
    const info = await run(nbdinfo, ['--json', nbdUri('acct-snap')]);
    expect(info.code, describeResult(info)).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ exports: [expect.objectContaining({ is_read_only: true })] });

    const pool = await cliJson<PoolJson>(['pool', 'status']);
    expect(pool.volumes.find((volume) => volume.name === 'acct')).toMatchObject({ exclusiveBytes: 256 * KiB, sharedBytes: MiB });
    expect(pool.usedBytes).toBeGreaterThanOrEqual(MiB + 256 * KiB);
    expect(pool.capacityBytes).toBe(pool.usedBytes + pool.freeBytes);
    const poolText = await cliOk(['pool', 'status']);
    expect(poolText.stdout).toMatch(/^CAPACITY\s+USED\s+FREE\s+LAYERS\s+VOLUMES$/m);
  });

  it('an overwrite of snapshotted data makes those bytes exclusive on both sides', async (ctx) => {
    const { qemuIo: qemuIoPath } = tools(ctx);
    await cliOk(['volume', 'create', 'overw', '--size', '4M']);
    await qemuIo(qemuIoPath, 'overw', ['write -P 0xab 0 1M']);
    await cliOk(['snapshot', 'create', 'overw', 'overw-snap']);
    await qemuIo(qemuIoPath, 'overw', ['write -P 0xcd 0 64k']);
    // Each side now holds 64 KiB that nothing else points at; the other 960 KiB both point at.
    const usage = await list();
    expect(usage.find((volume) => volume.name === 'overw')).toMatchObject({ exclusiveBytes: 64 * KiB, sharedBytes: MiB - 64 * KiB });
    expect(usage.find((volume) => volume.name === 'overw-snap')).toMatchObject({ exclusiveBytes: 64 * KiB, sharedBytes: MiB - 64 * KiB });
  });

  it('clones a volume and a snapshot (larger); both read the source data at once', async (ctx) => {
    const { qemuIo: qemuIoPath, nbdinfo } = tools(ctx);
    await cliOk(['volume', 'create', 'src', '--size', '4M']);
    await qemuIo(qemuIoPath, 'src', ['write -P 0x11 0 1M']);
    await cliOk(['snapshot', 'create', 'src', 'src-snap']);
    await qemuIo(qemuIoPath, 'src', ['write -P 0x22 0 64k']);

    const fromVolume = await cliJson<VolumeJson>(['volume', 'clone', 'src', 'src-clone']);
    expect(fromVolume).toMatchObject({ name: 'src-clone', kind: 'volume', size: 4 * MiB, parent: 'src', readOnly: false, exclusiveBytes: 0 });
    expect(fromVolume.sharedBytes).toBe(MiB);

    const fromSnapshot = await cliJson<VolumeJson>(['volume', 'clone', 'src-snap', 'snap-clone', '--size', '8MiB']);
    expect(fromSnapshot).toMatchObject({ name: 'snap-clone', kind: 'volume', size: 8 * MiB, parent: 'src-snap', readOnly: false });
    expect(fromSnapshot.sharedBytes).toBe(MiB);

    expect(await nbdinfoSize(nbdinfo, 'src-clone')).toBe(4 * MiB);
    expect(await nbdinfoSize(nbdinfo, 'snap-clone')).toBe(8 * MiB);
    await qemuIo(qemuIoPath, 'src-clone', ['read -P 0x22 0 64k', 'read -P 0x11 64k 960k', 'read -P 0 1M 3M'], true);
    await qemuIo(qemuIoPath, 'snap-clone', ['read -P 0x11 0 1M', 'read -P 0 1M 7M'], true);

    // A clone is writable and its writes stay its own.
    await qemuIo(qemuIoPath, 'snap-clone', ['write -P 0x33 7M 1M']);
    await qemuIo(qemuIoPath, 'src-snap', ['read -P 0x11 0 1M'], true);
    expect(await show('snap-clone')).toMatchObject({ exclusiveBytes: MiB, sharedBytes: MiB });

    const text = await cliOk(['volume', 'clone', 'src', 'src-clone-text']);
    expect(text.stdout).toMatch(/src.*src-clone-text/);
  });

  it('grows a volume; nbdinfo sees the new size on reconnect and the data stays', async (ctx) => {
    const { qemuIo: qemuIoPath, nbdinfo } = tools(ctx);
    await cliOk(['volume', 'create', 'grower', '--size', '4M']);
    await qemuIo(qemuIoPath, 'grower', ['write -P 0x44 3M 1M']);
    expect(await nbdinfoSize(nbdinfo, 'grower')).toBe(4 * MiB);

    const grown = await cliJson<VolumeJson>(['volume', 'grow', 'grower', '--size', '12M']);
    expect(grown).toMatchObject({ name: 'grower', size: 12 * MiB });
    expect(await nbdinfoSize(nbdinfo, 'grower')).toBe(12 * MiB);
    expect((await show('grower')).size).toBe(12 * MiB);
    await qemuIo(qemuIoPath, 'grower', ['read -P 0x44 3M 1M', 'read -P 0 4M 8M', 'write -P 0x55 11M 1M', 'read -P 0x55 11M 1M']);

    const text = await cliOk(['volume', 'grow', 'grower', '--size', '16MiB']);
    expect(text.stdout).toMatch(/grower.*16\.0 MiB/);
    expect(await nbdinfoSize(nbdinfo, 'grower')).toBe(16 * MiB);
  });

  it('flattens clones: afterwards they share nothing and read the same data', async (ctx) => {
    const { qemuIo: qemuIoPath } = tools(ctx);
    await cliOk(['volume', 'create', 'flat-base', '--size', '4M']);
    await qemuIo(qemuIoPath, 'flat-base', ['write -P 0x66 0 1M']);
    await cliOk(['volume', 'clone', 'flat-base', 'flat-json']);
    await cliOk(['volume', 'clone', 'flat-base', 'flat-text']);
    await qemuIo(qemuIoPath, 'flat-json', ['write -P 0x77 512k 4k']);

    const flattened = await cliJson<VolumeJson>(['volume', 'flatten', 'flat-json']);
    expect(flattened).toMatchObject({ name: 'flat-json', sharedBytes: 0, exclusiveBytes: MiB });

    const text = await cliOk(['volume', 'flatten', 'flat-text']);
    expect(text.stdout).toMatch(/flat-text.*flat/);
    expect(text.stderr).toMatch(/100\.0%/);
    expect(await show('flat-text')).toMatchObject({ sharedBytes: 0, exclusiveBytes: MiB });
    // Nothing else points at the base's blocks any more.
    expect(await show('flat-base')).toMatchObject({ sharedBytes: 0, exclusiveBytes: MiB });

    await qemuIo(qemuIoPath, 'flat-json', ['read -P 0x66 0 512k', 'read -P 0x77 512k 4k', 'read -P 0x66 516k 508k', 'read -P 0 1M 3M'], true);
    await qemuIo(qemuIoPath, 'flat-text', ['read -P 0x66 0 1M', 'read -P 0 1M 3M'], true);
  });

  it('deletes a source with live clones; the clones keep its data', async (ctx) => {
    const { qemuIo: qemuIoPath } = tools(ctx);
    await cliOk(['volume', 'create', 'doomed', '--size', '4M']);
    await qemuIo(qemuIoPath, 'doomed', ['write -P 0x88 0 1M']);
    await cliOk(['snapshot', 'create', 'doomed', 'doomed-snap']);
    await cliOk(['volume', 'clone', 'doomed', 'survivor']);
    await cliOk(['volume', 'clone', 'doomed-snap', 'snap-survivor']);

    expect(await cliJson<unknown>(['volume', 'delete', 'doomed'])).toEqual({ deleted: 'doomed' });
    expect((await list()).map((volume) => volume.name)).not.toContain('doomed');
    expectFailure(await cli(['volume', 'show', 'doomed']), 5, /doomed/);
    await qemuIo(qemuIoPath, 'survivor', ['read -P 0x88 0 1M', 'read -P 0 1M 3M'], true);
    await qemuIo(qemuIoPath, 'doomed-snap', ['read -P 0x88 0 1M'], true);

    expect(await cliJson<unknown>(['snapshot', 'delete', 'doomed-snap'])).toEqual({ deleted: 'doomed-snap' });
    expect((await cliJson<VolumeJson[]>(['snapshot', 'list'])).map((volume) => volume.name)).not.toContain('doomed-snap');
    expectFailure(await cli(['volume', 'show', 'doomed-snap']), 5, /doomed-snap/);
    await qemuIo(qemuIoPath, 'snap-survivor', ['read -P 0x88 0 1M', 'read -P 0 1M 3M'], true);

    // Both survivors point at the blocks the deleted volume wrote, so they share them...
    expect(await show('survivor')).toMatchObject({ exclusiveBytes: 0, sharedBytes: MiB });
    expect(await show('snap-survivor')).toMatchObject({ exclusiveBytes: 0, sharedBytes: MiB });
    const text = await cliOk(['volume', 'delete', 'snap-survivor']);
    expect(text.stdout).toMatch(/deleted snap-survivor/);
    // ...until one of them goes.
    expect(await show('survivor')).toMatchObject({ exclusiveBytes: MiB, sharedBytes: 0 });
    await qemuIo(qemuIoPath, 'survivor', ['read -P 0x88 0 1M'], true);
  });

  it('keeps the admin and pool NBD sockets owner-only', async () => {
    for (const name of ['admin.sock', 'nbd.sock']) {
      const mode = (await stat(join(server.pool, name))).mode & 0o777;
      expect(mode.toString(8), name).toBe('600');
    }
  });

  it('finds the daemon through CLONEBD_POOL when --pool is not given', async () => {
    await cliOk(['volume', 'create', 'by-env', '--size', '1M']);
    const result = await cli(['volume', 'show', 'by-env', '--json'], null, cleanEnv({ CLONEBD_POOL: server.pool }));
    expect(result.code, describeResult(result)).toBe(0);
    expect(JSON.parse(result.stdout)).toMatchObject({ name: 'by-env', size: MiB });
  });
});

describe('errors: exit code and message', () => {
  it('daemon not running: exit 3 and says how to start it', async () => {
    const empty = await makeTempDir('clonebd-nodaemon-');
    for (const args of [['volume', 'list'], ['volume', 'create', 'x', '--size', '1M'], ['snapshot', 'list'], ['pool', 'status']]) {
      expectFailure(await cli(args, empty), 3, /no clonebd daemon is running.*clonebd serve/s);
    }
    const viaEnv = await cli(['volume', 'list'], null, cleanEnv({ CLONEBD_POOL: join(empty, 'absent') }));
    expectFailure(viaEnv, 3, /clonebd serve/);
  });

  it('daemon gone, its socket left behind: exit 3', async () => {
    const dir = await makeTempDir('clonebd-dead-');
    const pool = join(dir, 'pool');
    const doomed = await startServerProcess({ pool, args: ['--no-default-volume'] });
    expect((await cli(['volume', 'list'], pool)).code).toBe(0);
    await doomed.stop('SIGKILL');
    expectFailure(await cli(['volume', 'list'], pool), 3, /no clonebd daemon is running.*clonebd serve/s);
  });

  it('name taken: exit 4', async () => {
    await cliOk(['volume', 'create', 'taken', '--size', '1M']);
    await cliOk(['volume', 'create', 'taken-too', '--size', '1M']);
    expectFailure(await cli(['volume', 'create', 'taken', '--size', '1M']), 4, /taken.*already exists/);
    expectFailure(await cli(['volume', 'clone', 'taken', 'taken-too']), 4, /taken-too.*already exists/);
    expectFailure(await cli(['snapshot', 'create', 'taken', 'taken-too']), 4, /taken-too.*already exists/);
  });

  it('not found: exit 5', async () => {
    const cases: string[][] = [
      ['volume', 'show', 'missing'],
      ['volume', 'clone', 'missing', 'missing-clone'],
      ['volume', 'grow', 'missing', '--size', '2M'],
      ['volume', 'flatten', 'missing'],
      ['volume', 'delete', 'missing'],
      ['snapshot', 'create', 'missing', 'missing-snap'],
      ['snapshot', 'delete', 'missing'],
    ];
    const results = await Promise.all(cases.map((args) => cli(args)));
    for (const result of results) expectFailure(result, 5, /missing/);
  });

  it('clone smaller than its source, grow to a smaller size: exit 6', async () => {
    await cliOk(['volume', 'create', 'big', '--size', '4M']);
    expectFailure(await cli(['volume', 'clone', 'big', 'small-clone', '--size', '1M']), 6, /smaller/);
    expectFailure(await cli(['volume', 'grow', 'big', '--size', '1M']), 6, /shrink|smaller/);
    expect((await show('big')).size).toBe(4 * MiB);
    expectFailure(await cli(['volume', 'show', 'small-clone']), 5, /small-clone/);
  });

  it('keeps labels given at creation on volumes, clones and snapshots; a bad key is exit 8', async () => {
    const volume = await cliJson<VolumeJson>(['volume', 'create', 'labelled', '--size', '1M', '--label', 'owner=ann', '--label', 'team/app=db=1']);
    expect(volume.labels).toEqual({ owner: 'ann', 'team/app': 'db=1' });
    const clone = await cliJson<VolumeJson>(['volume', 'clone', 'labelled', 'labelled-copy', '--label', 'purpose=test']);
    expect(clone.labels).toEqual({ purpose: 'test' });
    const snapshot = await cliJson<VolumeJson>(['snapshot', 'create', 'labelled', 'labelled-snap']);
    expect(snapshot.labels).toEqual({});
    expect((await show('labelled')).labels).toEqual(volume.labels);
    expect((await cliOk(['volume', 'show', 'labelled'])).stdout).toMatch(/labels\s+owner=ann, team\/app=db=1/);
    expectFailure(await cli(['volume', 'create', 'badly-labelled', '--size', '1M', '--label', 'Owner=x']), 8, /invalid label key/);
    const unparsed = await cli(['volume', 'create', 'badly-labelled', '--size', '1M', '--label', 'novalue']);
    expect(unparsed.code, describeResult(unparsed)).not.toBe(0);
    expect(unparsed.stderr).toMatch(/--label wants KEY=VALUE, got "novalue"/);
    expect((await list()).map((entry) => entry.name)).not.toContain('badly-labelled');
  });

  it('invalid names: exit 8, with the rule in the message', async () => {
    await cliOk(['volume', 'create', 'named', '--size', '1M']);
    const bad = ['../x', 'a/b', '.hidden', 'n'.repeat(200), 'sp ace', '..', 'a..b'];
    const cases = [
      ...bad.map((name) => ['volume', 'create', name, '--size', '1M']),
      ...['../x', 'a/b'].flatMap((name) => [
        ['volume', 'clone', 'named', name],
        ['snapshot', 'create', 'named', name],
      ]),
    ];
    const results = await Promise.all(cases.map((args) => cli(args)));
    for (const result of results) expectFailure(result, 8, /invalid name/);
    const names = (await list()).map((volume) => volume.name);
    for (const name of bad) expect(names).not.toContain(name);
  });

  it('bad sizes: a message and a non-zero exit', async () => {
    const ten = await cli(['volume', 'create', 'bad-size', '--size', 'ten']);
    expect(ten.code, describeResult(ten)).not.toBe(0);
    expect(ten.stderr).toMatch(/invalid size "ten".*10GiB/);
    expect(ten.stderr).not.toMatch(/\n\s+at /);
    expectFailure(await cli(['volume', 'create', 'bad-size', '--size', '0']), 8, /size/);
    expectFailure(await cli(['volume', 'create', 'bad-size']), 2, /size/);
    expectFailure(await cli(['volume', 'show', 'bad-size']), 5, /bad-size/);
  });

  it('usage errors (no subcommand, unknown subcommand, missing argument): exit 2', async () => {
    const cases: Array<[string[], RegExp]> = [
      [[], /Name a command/],
      [['volume'], /Name a volume command/],
      [['snapshot'], /Name a snapshot command/],
      [['pool'], /Name a pool command/],
      [['volume', 'frob'], /Unknown argument: frob/],
      [['volume', 'show'], /Not enough non-option arguments|name/],
    ];
    const results = await Promise.all(cases.map(([args]) => cli(args, null)));
    results.forEach((result, index) => expectFailure(result, 2, cases[index]![1]));
  });

  it('deleting a volume with a client attached: exit 9 without --force; --force disconnects it', async (ctx) => {
    const [qemuIoPath] = requireTools(ctx, 'qemu-io');
    await cliOk(['volume', 'create', 'attached', '--size', '1M']);
    const since = server.logs.length;
    // An interactive qemu-io holds its connection open until it reads "quit".
    const client = spawn(qemuIoPath, ['-f', 'raw', nbdUri('attached')], { stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(client);
    let output = '';
    client.stdout.setEncoding('utf8').on('data', (chunk: string) => (output += chunk));
    client.stderr.setEncoding('utf8').on('data', (chunk: string) => (output += chunk));
    client.stdin.on('error', () => undefined);
    const exited = new Promise<number | null>((resolve) => client.on('exit', (code) => resolve(code)));
    const opened = await waitForExportLog('transmission started', 'attached', since);

    expect(await show('attached')).toMatchObject({ clients: 1 });
    expect((await cliOk(['volume', 'list'])).stdout).toMatch(/^attached\s.*\s1$/m);
    expectFailure(await cli(['volume', 'delete', 'attached']), 9, /attached.*1 connected client.*force/);
    expect(await show('attached')).toMatchObject({ clients: 1 });

    expect(await cliJson<unknown>(['volume', 'delete', 'attached', '--force'])).toEqual({ deleted: 'attached' });
    const closed = await waitForExportLog('connection closed', 'attached', since);
    expect(closed.conn).toBe(opened.conn);
    expectFailure(await cli(['volume', 'show', 'attached']), 5, /attached/);

    client.stdin.end('read 0 4k\nquit\n');
    await exited;
    expect(output).toMatch(/read failed/);
  });
});

describe('--help', () => {
  const leafCommands = [
    ['volume', 'create'],
    ['volume', 'list'],
    ['volume', 'show'],
    ['volume', 'clone'],
    ['volume', 'grow'],
    ['volume', 'flatten'],
    ['volume', 'delete'],
    ['volume', 'import'],
    ['volume', 'export'],
    ['snapshot', 'create'],
    ['snapshot', 'list'],
    ['snapshot', 'delete'],
    ['pool', 'status'],
  ];

  it('every volume, snapshot and pool command shows an example of itself', async () => {
    const results = await Promise.all(leafCommands.map((words) => cli([...words, '--help'], null)));
    results.forEach((result, index) => {
      const words = leafCommands[index]!.join(' ');
      const report = describeResult(result);
      expect(result.code, report).toBe(0);
      const examples = result.stdout.split(/^Examples:$/m)[1];
      expect(examples, report).toBeDefined();
      expect(examples, report).toContain(`clonebd ${words} `);
      expect(result.stdout, report).toMatch(/--pool/);
      expect(result.stdout, report).toMatch(/--json/);
    });
  });

  it('the volume, snapshot and pool command groups show an example too', async () => {
    const groups = ['volume', 'snapshot', 'pool'];
    const results = await Promise.all(groups.map((group) => cli([group, '--help'], null)));
    results.forEach((result, index) => {
      const report = describeResult(result);
      expect(result.code, report).toBe(0);
      const examples = result.stdout.split(/^Examples:$/m)[1];
      expect(examples, report).toBeDefined();
      expect(examples, report).toContain(`clonebd ${groups[index]!} `);
    });
  });
});

describe('a clone taken while fio writes', () => {
  const BLOCK = 4096;
  const PATTERN = 0x5a;
  const FIO_BYTE = 0xc3;

  it('is attachable at once with nbdinfo and holds the data written before it', async (ctx) => {
    const [qemuIoPath, nbdinfo, nbdcopy, fio] = requireTools(ctx, 'qemu-io', 'nbdinfo', 'nbdcopy', 'fio');
    const work = await makeTempDir('clonebd-live-clone-');
    await cliOk(['volume', 'create', 'live', '--size', '16M']);
    await qemuIo(qemuIoPath, 'live', [`write -P ${PATTERN} 0 4M`]);

    // fio writes only [8M, 16M), every byte FIO_BYTE, so each 4 KiB block there is either still
    // zero or wholly fio's. A bounded run: it ends by itself if the test fails half-way.
    const fioJob = spawn(
      fio,
      [
        '--name=live',
        '--ioengine=nbd',
        `--uri=${nbdUri('live')}`,
        '--rw=randwrite',
        `--bs=${BLOCK}`,
        '--offset=8M',
        '--size=8M',
        '--iodepth=4',
        '--time_based',
        '--runtime=6',
        `--buffer_pattern=${FIO_BYTE}`,
        '--scramble_buffers=0',
      ],
      { cwd: work, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.add(fioJob);
    let fioOutput = '';
    fioJob.stdout.setEncoding('utf8').on('data', (chunk: string) => (fioOutput += chunk));
    fioJob.stderr.setEncoding('utf8').on('data', (chunk: string) => (fioOutput += chunk));
    let fioExit: number | null | undefined;
    const fioExited = new Promise<number | null>((resolve) =>
      fioJob.on('exit', (code) => {
        fioExit = code;
        resolve(code);
      }),
    );

    // Wait until fio's writes are landing: the volume then holds more than the pattern.
    let writtenBeforeClone = 0;
    const deadline = Date.now() + 15_000;
    while (writtenBeforeClone === 0) {
      if (fioExit !== undefined || Date.now() > deadline) throw new Error(`fio never wrote to the volume\n${fioOutput}`);
      const volume = await show('live');
      writtenBeforeClone = volume.exclusiveBytes - 4 * MiB;
    }

    const clone = await cliJson<VolumeJson>(['volume', 'clone', 'live', 'live-clone']);
    expect(fioExit, `fio ended before the clone was taken; the clone was not made mid-run\n${fioOutput}`).toBeUndefined();
    expect(clone).toMatchObject({ name: 'live-clone', size: 16 * MiB, parent: 'live' });
    expect(await nbdinfoSize(nbdinfo, 'live-clone')).toBe(16 * MiB);
    await qemuIo(qemuIoPath, 'live-clone', [`read -P ${PATTERN} 0 4M`, 'read -P 0 4M 4M'], true);
    const atClone = join(work, 'at-clone.raw');
    const copied = await run(nbdcopy, [nbdUri('live-clone'), atClone]);
    expect(copied.code, describeResult(copied)).toBe(0);
    expect(fioExit, `fio ended before the clone was read; the checks did not run mid-run\n${fioOutput}`).toBeUndefined();

    const image = await readFile(atClone);
    let fioBlocks = 0;
    const torn: number[] = [];
    for (let offset = 8 * MiB; offset < 16 * MiB; offset += BLOCK) {
      const block = image.subarray(offset, offset + BLOCK);
      if (block.every((byte) => byte === FIO_BYTE)) fioBlocks++;
      else if (!block.every((byte) => byte === 0)) torn.push(offset);
    }
    expect(torn, 'blocks in the clone that are neither zero nor wholly written by fio').toEqual([]);
    expect(fioBlocks * BLOCK).toBeGreaterThanOrEqual(writtenBeforeClone);

    expect(await fioExited, fioOutput).toBe(0);
    // fio's later writes went to the source only: the clone is as it was when taken.
    const afterFio = join(work, 'after-fio.raw');
    const again = await run(nbdcopy, [nbdUri('live-clone'), afterFio]);
    expect(again.code, describeResult(again)).toBe(0);
    expect((await readFile(afterFio)).equals(image)).toBe(true);
    await qemuIo(qemuIoPath, 'live', [`read -P ${PATTERN} 0 4M`], true);
    // fio kept writing after the clone, so the source now holds blocks of its own.
    expect((await show('live')).exclusiveBytes).toBeGreaterThan(0);
  });
});

describe('a full pool', () => {
  it('pool full: exit 7, and the volume keeps working', async (ctx) => {
    const [qemuIoPath] = requireTools(ctx, 'qemu-io');
    const small = await startServerProcess({ args: ['--no-default-volume', '--capacity', '1MiB'] });
    const create = await cli(['volume', 'create', 'tiny', '--size', '8M'], small.pool);
    expect(create.code, describeResult(create)).toBe(0);
    const fill = await run(qemuIoPath, ['-f', 'raw', '-c', 'write -P 1 0 2M', small.uri('tiny')]);
    expect(fill.stdout + fill.stderr).toMatch(/No space left on device/i);
    const kept = await run(qemuIoPath, ['-f', 'raw', '-c', 'write -P 2 0 512k', '-c', 'read -P 2 0 512k', small.uri('tiny')]);
    expect(kept.code, describeResult(kept)).toBe(0);
    expect(kept.stdout).not.toMatch(/failed/i);
    const status = JSON.parse((await cli(['pool', 'status', '--json'], small.pool)).stdout) as PoolJson;
    expect(status.capacityBytes).toBe(MiB);
    expectFailure(await cli(['volume', 'import', 'tiny', await bigFile()], small.pool), 7, /space|full/i);
  });
});

/** A 2 MiB file of non-zero bytes, which cannot fit a 1 MiB pool. */
async function bigFile(): Promise<string> {
  const { writeFile } = await import('node:fs/promises');
  const path = join(await makeTempDir('clonebd-big-'), 'big.raw');
  await writeFile(path, Buffer.alloc(2 * MiB, 0x5a));
  return path;
}

describe('the admin API over TCP', () => {
  it('answers only requests that carry the token, and is off unless asked for', async () => {
    const dir = await makeTempDir('clonebd-token-');
    const tokenFile = join(dir, 'token');
    const { writeFile } = await import('node:fs/promises');
    await writeFile(tokenFile, 'correct-horse-battery-staple\n');
    const remote = await startServerProcess({ args: ['--admin-listen', '127.0.0.1:0', '--admin-token-file', tokenFile] });
    const listening = await remote.waitForLog((line) => line.msg === 'listening');
    const { port } = listening.adminTcp as { port: number };

    const good = await cli(['volume', 'create', 'remote', '--size', '1M', '--admin', `127.0.0.1:${port}`, '--admin-token-file', tokenFile], null);
    expect(good.code, describeResult(good)).toBe(0);
    const badFile = join(dir, 'bad');
    await writeFile(badFile, 'not-the-right-token-at-all\n');
    expectFailure(await cli(['volume', 'list', '--admin', `127.0.0.1:${port}`, '--admin-token-file', badFile], null), 1, /token/);
    const bare = await fetch(`http://127.0.0.1:${port}/v1/volumes`);
    expect(bare.status).toBe(401);
    const created = JSON.parse((await cli(['volume', 'show', 'remote', '--json'], remote.pool)).stdout) as VolumeJson;
    expect(created.size).toBe(MiB);

    expect((await server.waitForLog((line) => line.msg === 'listening')).adminTcp).toBeUndefined();
    expectFailure(
      await run(process.execPath, [CLI_PATH, 'serve', '--pool', join(dir, 'p'), '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], {
        env: cleanEnv(),
        timeoutMs: 15_000,
      }),
      8,
      /token/,
    );
  });
});
