import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { Pool, type PoolOptions } from '../../../src/store/index.js';
import { pattern, readBytes, sameBytes, usePoolFixture } from '../../helpers/store-pool.js';
import { MemoryFiles } from '../../helpers/store-memfs.js';

const MiB = 1024 * 1024;
const fixture = usePoolFixture();
const openPool = (options: PoolOptions = {}): Promise<Pool> => fixture.openPool(options);

describe('plain volumes', () => {
  it('reads back unaligned writes and reads zeros elsewhere', async () => {
    const pool = await openPool();
    await pool.createVolume('a', 4 * MiB);
    const device = await pool.open('a');
    const data = pattern(10_000, 1);
    await device.write(1234, data, false);
    expect(sameBytes(await readBytes(device, 1234, data.length), data)).toBe('same');
    const around = await readBytes(device, 0, 16384);
    expect(around.subarray(0, 1234).every((b) => b === 0)).toBe(true);
    expect(around.subarray(1234 + data.length).every((b) => b === 0)).toBe(true);
    const pieces = await device.read(2 * MiB, 8192);
    expect(pieces).toEqual([{ kind: 'zero', offset: 2 * MiB, length: 8192 }]);
  });

  it('persists across close and reopen', async () => {
    let pool = await openPool();
    await pool.createVolume('a', MiB);
    let device = await pool.open('a');
    await device.write(100, pattern(5000, 2), false);
    await device.flush();
    await pool.close();
    pool = await openPool();
    expect(pool.info('a')).toMatchObject({ name: 'a', kind: 'volume', size: MiB, readOnly: false, parent: null });
    device = await pool.open('a');
    expect(sameBytes(await readBytes(device, 100, 5000), pattern(5000, 2))).toBe('same');
  });

  it('reports holes, zeros and data in block status', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const device = await pool.open('a');
    await device.write(8192, pattern(8192, 3), false);
    expect(await device.blockStatus(0, 32768)).toEqual([
      { length: 8192, hole: true, zero: true },
      { length: 8192, hole: false, zero: false },
      { length: 16384, hole: true, zero: true },
    ]);
    await device.trim(8192, 4096, false);
    expect(await device.blockStatus(0, 32768)).toEqual([
      { length: 12288, hole: true, zero: true },
      { length: 4096, hole: false, zero: false },
      { length: 16384, hole: true, zero: true },
    ]);
    expect((await readBytes(device, 8192, 4096)).every((b) => b === 0)).toBe(true);
  });

  it('zeroes partial blocks', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const device = await pool.open('a');
    await device.write(0, pattern(16384, 4), false);
    await device.zero(1000, 9000, { mayTrim: true, fua: false });
    const expected = pattern(16384, 4);
    expected.fill(0, 1000, 10000);
    expect(sameBytes(await readBytes(device, 0, 16384), expected)).toBe('same');
  });

  it('shares one volume between handles', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const one = await pool.open('a');
    const two = await pool.open('a');
    await one.write(0, pattern(4096, 5), false);
    expect(sameBytes(await readBytes(two, 0, 4096), pattern(4096, 5))).toBe('same');
    await one.close();
    await expect(one.read(0, 10)).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    expect(sameBytes(await readBytes(two, 0, 4096), pattern(4096, 5))).toBe('same');
  });

  it('keeps concurrent sub-block writes to one block', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    const device = await pool.open('a');
    await Promise.all(Array.from({ length: 16 }, (_, i) => device.write(i * 256, Buffer.alloc(256, i + 1), false)));
    const block = await readBytes(device, 0, 4096);
    for (let i = 0; i < 16; i++) expect(block.subarray(i * 256, i * 256 + 256).every((b) => b === i + 1)).toBe(true);
  });

  it('refuses duplicate names, bad names and bad sizes', async () => {
    const pool = await openPool();
    await pool.createVolume('a', MiB);
    await expect(pool.createVolume('a', MiB)).rejects.toMatchObject({ code: 'EEXIST' });
    for (const name of ['', '.x', '-x', 'a/b', 'a..b', 'x'.repeat(129), 'sp ace']) {
      await expect(pool.createVolume(name, MiB)).rejects.toMatchObject({ code: 'EINVAL' });
    }
    await expect(pool.createVolume('b', 0)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(pool.open('missing')).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe('lock', () => {
  it('refuses a second open in this process, naming the holder', async () => {
    await openPool();
    await expect(Pool.open(fixture.dir)).rejects.toMatchObject({ code: 'EBUSY', message: expect.stringContaining(String(process.pid)) });
  });

  it('refuses while another live process holds the lock, and takes it over once that process is gone', async () => {
    // The other process follows the lock protocol: O_EXCL-create the lock file holding its pid.
    const lockPath = join(fixture.dir, 'lock');
    const holder = spawn(process.execPath, [
      '-e',
      `require('fs').writeFileSync(${JSON.stringify(lockPath)}, process.pid + '\\n', { flag: 'wx' }); console.log('locked'); setInterval(() => {}, 1000);`,
    ]);
    try {
      await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
      await expect(Pool.open(fixture.dir)).rejects.toMatchObject({ code: 'EBUSY', message: expect.stringContaining(`process ${holder.pid}`) });
    } finally {
      const exited = new Promise((resolve) => holder.once('exit', resolve));
      holder.kill('SIGKILL');
      await exited;
    }
    const pool = await openPool();
    expect(pool.volumes()).toEqual([]);
  });

  it('takes over a stale lock', async () => {
    let pool = await openPool();
    await pool.close();
    const { writeFile } = await import('node:fs/promises');
    await writeFile(`${fixture.dir}/lock`, '999999999\n');
    pool = await openPool();
    expect(pool.volumes()).toEqual([]);
  });
});

describe('volume sizes the file system cannot hold', () => {
  it('refuses to create, clone into or grow to a size beyond the largest file, with the limit named', async () => {
    const files = new MemoryFiles();
    files.largestFileSize = 1 << 30;
    const pool = await Pool.open('/pool', { files });
    try {
      expect((await pool.usage()).largestVolumeBytes).toBe(1 << 30);
      await pool.createVolume('fits', 1 << 30);
      const tooLarge = /more than the pool's file system holds in one file \(1073741824 bytes at most\)/;
      await expect(pool.createVolume('big', (1 << 30) + 4096)).rejects.toMatchObject({ code: 'ERANGE', message: expect.stringMatching(tooLarge) });
      await expect(pool.clone('fits', 'bigger', { size: 2 * 2 ** 30 })).rejects.toMatchObject({ code: 'ERANGE' });
      await pool.createVolume('small', 1 << 20);
      await expect(pool.grow('small', 2 * 2 ** 30)).rejects.toMatchObject({ code: 'ERANGE' });
      expect(pool.volumes().map((volume) => [volume.name, volume.size])).toEqual([
        ['fits', 1 << 30],
        ['small', 1 << 20],
      ]);
    } finally {
      await pool.close();
    }
  });
});
