/**
 * What the CO gets from CreateVolume with a content source, checked through the data: a pattern
 * written to a volume over NBD (the native-free client) before a clone or snapshot is read back
 * from the clone or the restored volume. Clones are independent of their source and of each
 * other, survive the source's deletion, can be cloned again, can be made or grown larger, and
 * many at once of one source all succeed.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../native-free/index.js';
import { AdminClient } from '../../src/control/admin-client.js';
import { expectStatus, status, type CsiClient, type CsiReply } from '../helpers/csi-client.js';
import { startCsiProcess, stopAllCsiProcesses } from '../helpers/csi-process.js';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';

const MiB = 2 ** 20;
const BLOCK = 4096;
const SIZE = 4 * MiB;
const CAPABILITIES = [{ block: {}, access_mode: { mode: 'SINGLE_NODE_WRITER' } }];

let server: ServerProcess;
let csi: CsiClient;
let admin: AdminClient;
let counter = 0;

/** Deterministic bytes that differ per seed and per offset. */
function pattern(seed: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  let state = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    out[i] = state & 0xff;
  }
  return out;
}

/** Resolves once the daemon no longer counts a connection to `name` (its close is seen later than ours). */
async function detached(name: string): Promise<void> {
  while ((await admin.showVolume(name)).clients > 0) await new Promise((resolve) => setImmediate(resolve));
}

async function withExport<T>(name: string, work: (client: NbdClient) => Promise<T>): Promise<T> {
  const client = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: name });
  try {
    return await work(client);
  } finally {
    await client.disconnect();
    await detached(name);
  }
}

async function write(name: string, offset: number, data: Buffer): Promise<void> {
  await withExport(name, async (client) => {
    await client.write(offset, data);
    await client.flush();
  });
}

async function read(name: string, offset: number, length: number): Promise<Buffer> {
  return withExport(name, (client) => client.read(offset, length));
}

async function exportSize(name: string): Promise<number> {
  return withExport(name, async (client) => client.size);
}

function fresh(prefix = 'pvc'): string {
  counter += 1;
  return `${prefix}-${counter}-7d0c2a51-93b4-4f0e-8a1d`;
}

async function createVolume(request: object): Promise<CsiReply> {
  return (await csi.call('Controller', 'CreateVolume', { volume_capabilities: CAPABILITIES, ...request })).volume as CsiReply;
}

async function cloneOf(source: string, request: object = {}): Promise<string> {
  return (await createVolume({ name: fresh(), volume_content_source: { volume: { volume_id: source } }, ...request })).volume_id as string;
}

/** A volume of SIZE bytes holding pattern(seed) in its first MiB and in its last block. */
async function sourceWithData(seed: number): Promise<string> {
  const id = (await createVolume({ name: fresh(), capacity_range: { required_bytes: SIZE } })).volume_id as string;
  await write(id, 0, pattern(seed, MiB));
  await write(id, SIZE - BLOCK, pattern(seed + 1, BLOCK));
  return id;
}

async function expectData(name: string, seed: number): Promise<void> {
  expect((await read(name, 0, MiB)).equals(pattern(seed, MiB))).toBe(true);
  expect((await read(name, SIZE - BLOCK, BLOCK)).equals(pattern(seed + 1, BLOCK))).toBe(true);
}

beforeAll(async () => {
  server = await startServerProcess({ args: ['--no-default-volume'] });
  admin = new AdminClient(join(server.pool, 'admin.sock'));
  csi = (await startCsiProcess({ pool: server.pool })).client;
});

afterAll(async () => {
  await stopAllCsiProcesses();
  await stopAllServerProcesses();
});

describe('clones and restores, by their data', () => {
  it('a clone holds the source data; afterwards each side changes alone', async () => {
    const source = await sourceWithData(1);
    const clone = await cloneOf(source);
    await expectData(clone, 1);
    await write(source, 0, pattern(50, BLOCK));
    await write(clone, BLOCK, pattern(51, BLOCK));
    expect((await read(clone, 0, BLOCK)).equals(pattern(1, BLOCK))).toBe(true);
    expect((await read(source, BLOCK, BLOCK)).equals(pattern(1, 2 * BLOCK).subarray(BLOCK))).toBe(true);
  });

  it('a restore holds the data of the snapshot, not what the source holds since', async () => {
    const source = await sourceWithData(2);
    const { snapshot } = await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source });
    await write(source, 0, pattern(60, MiB));
    const restored = (await createVolume({ name: fresh(), volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } })).volume_id as string;
    await expectData(restored, 2);
    expect((await read(source, 0, MiB)).equals(pattern(60, MiB))).toBe(true);
  });

  it('a clone asked larger than its source has the source data, then zeros, at the new size', async () => {
    const source = await sourceWithData(3);
    const clone = await cloneOf(source, { capacity_range: { required_bytes: 2 * SIZE } });
    expect(await exportSize(clone)).toBe(2 * SIZE);
    await expectData(clone, 3);
    expect((await read(clone, SIZE, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
  });

  it('16 clones of one source requested at once all succeed, each with the data', async () => {
    const source = await sourceWithData(4);
    const clones = await Promise.all(Array.from({ length: 16 }, () => cloneOf(source)));
    expect(new Set(clones).size).toBe(16);
    for (const clone of clones) expect((await read(clone, 0, MiB)).equals(pattern(4, MiB))).toBe(true);
    await write(clones[0]!, 0, pattern(70, BLOCK));
    expect((await read(clones[1]!, 0, BLOCK)).equals(pattern(4, BLOCK))).toBe(true);
  });

  it('a clone of a clone holds the first clone data, its own writes included', async () => {
    const source = await sourceWithData(5);
    const first = await cloneOf(source);
    await write(first, 2 * MiB, pattern(80, BLOCK));
    const second = await cloneOf(first);
    await expectData(second, 5);
    expect((await read(second, 2 * MiB, BLOCK)).equals(pattern(80, BLOCK))).toBe(true);
    expect((await read(source, 2 * MiB, BLOCK)).equals(Buffer.alloc(BLOCK))).toBe(true);
  });

  it('deleting a source, and its snapshot, leaves its clones and restores intact', async () => {
    const source = await sourceWithData(6);
    const clone = await cloneOf(source);
    const { snapshot } = await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source });
    const restored = (await createVolume({ name: fresh(), volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } })).volume_id as string;
    await csi.call('Controller', 'DeleteVolume', { volume_id: source });
    await admin.waitIdle();
    // The snapshot outlives its source, and restores from it still have the data.
    const restoredLater = (await createVolume({ name: fresh(), volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } }))
      .volume_id as string;
    await csi.call('Controller', 'DeleteSnapshot', { snapshot_id: snapshot.snapshot_id });
    // Deleted layers are folded into what still reads them in the background: wait for that too.
    await admin.waitIdle();
    for (const volumeId of [clone, restored, restoredLater]) await expectData(volumeId, 6);
  });

  it('DeleteVolume of a volume still attached is FAILED_PRECONDITION and leaves it whole', async () => {
    const id = await sourceWithData(8);
    const attached = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: id });
    try {
      await expectStatus(csi.call('Controller', 'DeleteVolume', { volume_id: id }), status.FAILED_PRECONDITION);
    } finally {
      await attached.disconnect();
    }
    await detached(id);
    await expectData(id, 8);
    await csi.call('Controller', 'DeleteVolume', { volume_id: id });
    await expect(admin.showVolume(id)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('an expanded clone keeps its data and reads zeros in the new space', async () => {
    const source = await sourceWithData(7);
    const clone = await cloneOf(source);
    const grown = await csi.call('Controller', 'ControllerExpandVolume', { volume_id: clone, capacity_range: { required_bytes: 3 * SIZE } });
    expect(grown.capacity_bytes).toBe(3 * SIZE);
    expect(await exportSize(clone)).toBe(3 * SIZE);
    await expectData(clone, 7);
    expect((await read(clone, 2 * SIZE, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
    expect(await exportSize(source)).toBe(SIZE);
  });

  it('a clone of a volume in use holds every write acknowledged before it was requested', async () => {
    const source = (await createVolume({ name: fresh(), capacity_range: { required_bytes: SIZE } })).volume_id as string;
    const writer = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: source });
    try {
      const blocks = SIZE / BLOCK;
      let next = 0;
      let stop = false;
      const writing = (async () => {
        while (!stop && next < blocks) {
          await writer.write(next * BLOCK, pattern(1000 + next, BLOCK));
          next += 1;
        }
      })();
      while (next < 16) await new Promise((resolve) => setImmediate(resolve));
      const acknowledged = next;
      const clone = await cloneOf(source);
      stop = true;
      await writing;
      for (let block = 0; block < acknowledged; block++) {
        expect((await read(clone, block * BLOCK, BLOCK)).equals(pattern(1000 + block, BLOCK))).toBe(true);
      }
    } finally {
      await writer.disconnect();
    }
  });
});
