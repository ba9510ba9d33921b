/**
 * A clone taken while several connections keep writing is a point in time: each block of the
 * clone holds one whole version, every write acknowledged before the clone was requested is in
 * it, and no write issued after the clone completed is. Afterwards the two are independent, and
 * the clone outlives its deleted source.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../native-free/index.js';
import { AdminClient } from '../../src/control/admin-client.js';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { requireTool, runOk } from '../helpers/tools.js';

afterEach(stopAllServerProcesses);

const BLOCK = 4096;
const BLOCKS = 512;
const WRITERS = 4;

/** A block stamped with its number and version in every 8-byte word, so a torn mix shows. */
function stamped(block: number, version: number): Buffer {
  const out = Buffer.allocUnsafe(BLOCK);
  for (let at = 0; at < BLOCK; at += 8) {
    out.writeUInt32BE(block, at);
    out.writeUInt32BE(version, at + 4);
  }
  return out;
}

/** The version a block holds, or an error naming how it is torn. */
function versionOf(data: Buffer, block: number): number {
  const version = data.readUInt32BE(4);
  for (let at = 0; at < BLOCK; at += 8) {
    if (data.readUInt32BE(at) !== block || data.readUInt32BE(at + 4) !== version) {
      throw new Error(`block ${block} is torn at byte ${at}: holds ${data.readUInt32BE(at)}/${data.readUInt32BE(at + 4)}, starts ${version}`);
    }
  }
  return version;
}

async function connect(server: ServerProcess, exportName: string): Promise<NbdClient> {
  return NbdClient.connect({ host: server.host, port: server.port }, { exportName });
}

describe('a clone of a volume under concurrent writes', () => {
  it('holds exactly the writes completed before it, whole, and stays independent', async (ctx) => {
    const qemuImg = requireTool(ctx, 'qemu-img');
    const server = await startServerProcess({
      args: ['--no-default-volume'],
      prepare: async (pool) => pool.createVolume('src', BLOCKS * BLOCK),
    });
    const admin = new AdminClient(join(server.pool, 'admin.sock'));
    const writers = await Promise.all(Array.from({ length: WRITERS }, () => connect(server, 'src')));
    for (let block = 0; block < BLOCKS; block++) await writers[block % WRITERS]!.write(block * BLOCK, stamped(block, 0));

    const version = new Array<number>(BLOCKS).fill(0);
    let acked = 0;
    let phase: 'before' | 'cloning' | 'after' = 'before';
    let stop = false;
    const ackedBeforeRequest = new Array<number>(BLOCKS).fill(0);
    const firstIssuedAfter = new Array<number>(BLOCKS).fill(Infinity);
    const lastAcked = new Array<number>(BLOCKS).fill(0);
    let reachedAfter = 0;
    let wake: (() => void) | undefined;
    const loops = writers.map(async (client, writer) => {
      // Each writer owns the blocks ≡ writer (mod WRITERS) and writes them one at a time, so the
      // versions of a block reach the server in order.
      for (let n = 0; !stop; n++) {
        const block = writer + WRITERS * ((n * 7919) % (BLOCKS / WRITERS));
        const next = ++version[block]!;
        if (phase === 'after') firstIssuedAfter[block] = Math.min(firstIssuedAfter[block]!, next);
        await client.write(block * BLOCK, stamped(block, next));
        lastAcked[block] = next;
        acked++;
        if (phase === 'after') reachedAfter++;
        wake?.();
      }
    });
    const until = (condition: () => boolean): Promise<void> =>
      new Promise((resolve) => {
        wake = () => {
          if (condition()) {
            wake = undefined;
            resolve();
          }
        };
      });

    await until(() => acked >= 2000);
    ackedBeforeRequest.splice(0, BLOCKS, ...lastAcked);
    phase = 'cloning';
    await admin.clone('src', 'copy');
    phase = 'after';
    await until(() => reachedAfter >= 500);
    stop = true;
    await Promise.all(loops);

    const reader = await connect(server, 'copy');
    const cloneVersions: number[] = [];
    for (let block = 0; block < BLOCKS; block++) {
      const held = versionOf(await reader.read(block * BLOCK, BLOCK), block);
      expect(held, `block ${block}`).toBeGreaterThanOrEqual(ackedBeforeRequest[block]!);
      expect(held, `block ${block}`).toBeLessThan(firstIssuedAfter[block]!);
      cloneVersions.push(held);
    }
    expect(firstIssuedAfter.some((v) => v !== Infinity)).toBe(true);

    // Independent: a write on either side shows only there.
    await reader.write(0, Buffer.alloc(BLOCK, 0xc1));
    await writers[1]!.write(BLOCK, Buffer.alloc(BLOCK, 0x5e));
    expect((await writers[0]!.read(0, BLOCK)).equals(Buffer.alloc(BLOCK, 0xc1))).toBe(false);
    expect((await reader.read(BLOCK, BLOCK)).equals(Buffer.alloc(BLOCK, 0x5e))).toBe(false);

    // A snapshot and a clone of it compare identical through qemu.
    await admin.snapshot('src', 'src-snap');
    await admin.clone('src-snap', 'copy-of-snap');
    const compared = await runOk(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', server.uri('src-snap'), server.uri('copy-of-snap')]);
    expect(compared.stdout).toContain('Images are identical');

    await Promise.all(writers.map((client) => client.disconnect()));
    await admin.delete('src');
    await admin.delete('src-snap');
    for (let block = 1; block < BLOCKS; block++) {
      expect(versionOf(await reader.read(block * BLOCK, BLOCK), block)).toBe(cloneVersions[block]);
    }
    await reader.disconnect();
  });
});
