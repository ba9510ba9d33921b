/**
 * The FUSE server's NBD backing file against a real `clonebd serve`: growing switches to a fresh
 * connection that sees the new size, nothing written on the old one is lost or left unflushed, and
 * a volume that did not grow changes nothing. No FUSE and no root needed.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../native-free/index.js';
import { AdminClient } from '../../src/control/admin-client.js';
import { NbdBackingFile } from '../../src/fuse/nbd-file.js';
import { startServerProcess, stopAllServerProcesses } from '../helpers/server-process.js';

const MiB = 2 ** 20;

afterEach(stopAllServerProcesses);

async function setUp(size: number) {
  const server = await startServerProcess({ args: ['--no-default-volume'] });
  const admin = new AdminClient(join(server.pool, 'admin.sock'));
  await admin.createVolume('vol', size);
  const target = { path: join(server.pool, 'nbd.sock') };
  return { server, admin, target };
}

/** The export's bytes as a fresh connection reads them. */
async function readBack(target: { path: string }, offset: number, length: number): Promise<Buffer> {
  const client = await NbdClient.connect(target, { exportName: 'vol' });
  try {
    return await client.read(offset, length);
  } finally {
    await client.disconnect();
  }
}

describe('NBD backing file', () => {
  it('grows to the volume\'s new size on refresh, and keeps every write made before, during and after', async () => {
    const { admin, target } = await setUp(4 * MiB);
    const file = await NbdBackingFile.open(target, 'vol');
    try {
      expect(file.size).toBe(4 * MiB);
      expect(file.readOnly).toBe(false);
      const before = randomBytes(64 * 1024);
      await file.write(4 * MiB - before.length, before);
      await expect(file.write(4 * MiB, Buffer.alloc(4096))).rejects.toMatchObject({ code: 'ENOSPC' });

      await admin.grow('vol', 8 * MiB);
      // Writes in flight across the switch land on whichever connection took them.
      const during = Array.from({ length: 16 }, (_, index) => ({ offset: index * 128 * 1024, data: randomBytes(128 * 1024) }));
      const writes = during.map(({ offset, data }) => file.write(offset, data));
      const grown = await file.refresh();
      await Promise.all(writes);
      expect(grown).toEqual({ previous: 4 * MiB, size: 8 * MiB });
      expect(file.size).toBe(8 * MiB);

      const after = randomBytes(MiB);
      await file.write(7 * MiB, after);
      await file.flush();
      expect((await file.read(4 * MiB - before.length, before.length)).equals(before)).toBe(true);
      for (const { offset, data } of during) expect((await readBack(target, offset, data.length)).equals(data)).toBe(true);
      expect((await readBack(target, 4 * MiB - before.length, before.length)).equals(before)).toBe(true);
      expect((await readBack(target, 7 * MiB, MiB)).equals(after)).toBe(true);
      await file.zero(7 * MiB, 4096, { punch: true });
      await file.zero(7 * MiB + 4096, 4096, { punch: false });
      expect((await file.read(7 * MiB, 8192)).equals(Buffer.alloc(8192))).toBe(true);
      expect((await file.read(7 * MiB + 8192, 4096)).equals(after.subarray(8192, 12288))).toBe(true);
    } finally {
      await file.close();
    }
  });

  it('changes nothing when the volume has not grown, and shares one refresh between callers', async () => {
    const { admin, target } = await setUp(4 * MiB);
    const file = await NbdBackingFile.open(target, 'vol');
    try {
      expect(await file.refresh()).toEqual({ previous: 4 * MiB, size: 4 * MiB });
      await admin.grow('vol', 6 * MiB);
      const [first, second] = await Promise.all([file.refresh(), file.refresh()]);
      expect(first).toEqual({ previous: 4 * MiB, size: 6 * MiB });
      expect(second).toBe(first);
      expect(await file.refresh()).toEqual({ previous: 6 * MiB, size: 6 * MiB });
    } finally {
      await file.close();
    }
  });

  it('refuses to replace a connection that broke: writes answered on it may be lost, a new FLUSH must not vouch for them', async () => {
    const { server, target } = await setUp(4 * MiB);
    const file = await NbdBackingFile.open(target, 'vol');
    try {
      await file.write(0, randomBytes(4096));
      await server.stop('SIGKILL');
      await expect(file.read(0, 4096)).rejects.toMatchObject({ code: 'ECONNRESET' });
      await expect(file.flush()).rejects.toMatchObject({ code: 'ECONNRESET' });
      await expect(file.refresh()).rejects.toMatchObject({ code: 'ECONNRESET' });
    } finally {
      await file.close().catch(() => undefined);
    }
  });
});
