/**
 * nbdinfo (libnbd) against a real `clonebd serve`: what the handshake advertises, the export list,
 * and the base:allocation map after writes at known offsets.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { removeTempDirs, requireTool, requireTools, runOk } from '../helpers/tools.js';

const MiB = 1 << 20;
const VOLUME_SIZE = 64 * MiB;
const MAP_VOLUME_SIZE = 8 * MiB;

interface NbdinfoExport {
  'export-name': string;
  'export-size': number;
  contexts?: string[];
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

interface NbdinfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}

let server: ServerProcess;

beforeAll(async () => {
  server = await startServerProcess({
    prepare: async (pool) => {
      await pool.createVolume('vol', VOLUME_SIZE);
      await pool.snapshot('vol', 'snap');
      await pool.createVolume('map', MAP_VOLUME_SIZE);
    },
  });
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

async function nbdinfoJson(nbdinfo: string, ...args: string[]): Promise<NbdinfoJson> {
  const result = await runOk(nbdinfo, ['--json', '--no-content', ...args]);
  return JSON.parse(result.stdout) as NbdinfoJson;
}

/** nbdinfo --map lines with runs of blanks collapsed: `offset length type description`. */
function normaliseMap(text: string): string[] {
  return text
    .split('\n')
    .map((line) => line.trim().split(/\s+/).join(' '))
    .filter((line) => line !== '');
}

describe('nbdinfo', () => {
  it('shows a volume with its size, every advertised capability, structured replies and base:allocation', async (ctx) => {
    const nbdinfo = requireTool(ctx, 'nbdinfo');
    const info = await nbdinfoJson(nbdinfo, server.uri('vol'));
    expect(info.protocol).toBe('newstyle-fixed');
    expect(info.TLS).toBe(false);
    expect(info.structured).toBe(true);
    expect(info.exports).toHaveLength(1);
    const volume = info.exports[0]!;
    expect(volume).toMatchObject({
      'export-name': 'vol',
      'export-size': VOLUME_SIZE,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_trim: true,
      can_zero: true,
      can_fast_zero: true,
      can_multi_conn: true,
      can_df: true,
      can_cache: true,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
    });
    expect(volume.contexts).toContain('base:allocation');
  });

  it('shows a snapshot as read-only', async (ctx) => {
    const nbdinfo = requireTool(ctx, 'nbdinfo');
    const info = await nbdinfoJson(nbdinfo, server.uri('snap'));
    expect(info.structured).toBe(true);
    expect(info.exports[0]).toMatchObject({ 'export-name': 'snap', 'export-size': VOLUME_SIZE, is_read_only: true });
    expect(info.exports[0]!.contexts).toContain('base:allocation');
  });

  it('--list lists every volume and snapshot', async (ctx) => {
    const nbdinfo = requireTool(ctx, 'nbdinfo');
    const info = await nbdinfoJson(nbdinfo, '--list', `nbd://127.0.0.1:${server.port}`);
    const byName = new Map(info.exports.map((entry) => [entry['export-name'], entry]));
    expect([...byName.keys()].sort()).toEqual(['map', 'snap', 'vol']);
    expect(byName.get('vol')).toMatchObject({ 'export-size': VOLUME_SIZE, is_read_only: false });
    expect(byName.get('snap')).toMatchObject({ 'export-size': VOLUME_SIZE, is_read_only: true });
    expect(byName.get('map')).toMatchObject({ 'export-size': MAP_VOLUME_SIZE, is_read_only: false });
  });

  it('--map shows data exactly where it was written and holes everywhere else', async (ctx) => {
    const [nbdinfo, qemuIo] = requireTools(ctx, 'nbdinfo', 'qemu-io');
    const uri = server.uri('map');

    const before = await runOk(nbdinfo, ['--map', uri]);
    expect(normaliseMap(before.stdout)).toEqual(['0 8388608 3 hole,zero']);

    await runOk(qemuIo, [
      '-f', 'raw', uri,
      '-c', 'write -P 0x11 0 4k',
      '-c', 'write -P 0x22 1M 64k',
      '-c', 'write -P 0x33 1088k 4k', // adjoins the previous write: one data extent of 68k
      '-c', 'write -P 0x44 4M 8k',
      '-c', 'write -P 0x55 8188k 4k', // the last block of the volume
      '-c', 'flush',
    ]);

    const after = await runOk(nbdinfo, ['--map', uri]);
    // Golden map: offset, length, type (0 data, 3 hole+zero), description.
    expect(normaliseMap(after.stdout)).toEqual([
      '0 4096 0 data',
      '4096 1044480 3 hole,zero',
      '1048576 69632 0 data',
      '1118208 3076096 3 hole,zero',
      '4194304 8192 0 data',
      '4202496 4182016 3 hole,zero',
      '8384512 4096 0 data',
    ]);
  });
});
