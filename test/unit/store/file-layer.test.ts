import { afterEach, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SyncIoPolicy, nodeFileLayer } from '../../../src/store/file-layer.js';

const MiB = 1024 * 1024;
let dir: string | undefined;

afterEach(async () => {
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  dir = undefined;
});

describe('node file layer', () => {
  it('closes a descriptor only after the transfers on the thread pool are done with it', async () => {
    dir = await mkdtemp(join(tmpdir(), 'clonebd-files-'));
    const path = join(dir, 'data');
    const content = Buffer.alloc(4 * MiB);
    for (let i = 0; i < content.length; i += 4096) content.writeUInt32LE(i, i);
    await writeFile(path, content);
    const files = nodeFileLayer();
    const handle = await files.open(path, 'readWrite');
    const settled: string[] = [];
    // Larger than any synchronous transfer, so each goes through the pool.
    const reads = Array.from({ length: 16 }, async () => {
      const into = Buffer.alloc(2 * MiB);
      const length = await handle.read(into, 0, into.length, MiB);
      settled.push('read');
      expect(length).toBe(2 * MiB);
      expect(into.equals(content.subarray(MiB, 3 * MiB))).toBe(true);
    });
    const write = handle.write(content, 0, 2 * MiB, 0).then(() => settled.push('write'));
    await handle.close();
    settled.push('close');
    await Promise.all([...reads, write]);
    expect(settled.indexOf('close')).toBe(17);
  });

  it('prefetches inside and past the end of a file, and closes only after its prefetches are done', async () => {
    dir = await mkdtemp(join(tmpdir(), 'clonebd-files-'));
    const path = join(dir, 'data');
    await writeFile(path, Buffer.alloc(3 * MiB, 7));
    // As while the disk serves the reads; with the cache serving them, prefetch does nothing.
    class ColdCache extends SyncIoPolicy {
      override missingCache(): boolean {
        return true;
      }
    }
    const handle = await nodeFileLayer(new ColdCache()).open(path, 'read');
    const settled: string[] = [];
    const prefetches = [0, 2 * MiB + 4096, 8 * MiB].map((position) =>
      handle.prefetch(position, 2 * MiB).then(() => settled.push('prefetch')),
    );
    await handle.close();
    settled.push('close');
    await Promise.all(prefetches);
    expect(settled).toEqual(['prefetch', 'prefetch', 'prefetch', 'close']);
  });
});

describe('lone transfers while slow ones are frequent', () => {
  /** A policy backing off, as after a run of reads from the disk, that notes what it was asked. */
  class BackingOff extends SyncIoPolicy {
    readonly asked: boolean[] = [];
    override attempt(length: number, transfer: () => number, alone = false): number | undefined {
      this.asked.push(alone);
      return alone ? transfer() : undefined;
    }
  }

  async function loneTransfers(policy: BackingOff): Promise<void> {
    dir = await mkdtemp(join(tmpdir(), 'clonebd-files-'));
    const path = join(dir, 'data');
    await writeFile(path, Buffer.alloc(8192, 5));
    const handle = await nodeFileLayer(policy).open(path, 'readWrite');
    const into = Buffer.alloc(4096);
    expect(await handle.read(into, 0, 4096, 0, true)).toBe(4096);
    expect(into.every((byte) => byte === 5)).toBe(true);
    await handle.write(Buffer.alloc(4096, 9), 0, 4096, 4096, true);
    expect(await handle.read(into, 0, 4096, 4096, true)).toBe(4096);
    expect(into.every((byte) => byte === 9)).toBe(true);
    await handle.close();
  }

  it('are done on the spot by default, reads and writes', async () => {
    const policy = new BackingOff();
    await loneTransfers(policy);
    expect(policy.asked).toEqual([true, true, true]);
  });

  it('send lone reads off the loop when the loop polls for them, and still write on the spot', async () => {
    const policy = new BackingOff({ loneReadsWaitOnSpot: false });
    await loneTransfers(policy);
    expect(policy.asked).toEqual([false, true, false]);
  });
});

describe('largest file probe', () => {
  it('finds the largest size a file on the file system can be truncated to, and removes its probe', async () => {
    dir = await mkdtemp(join(tmpdir(), 'clonebd-files-'));
    const files = nodeFileLayer();
    const limit = 2 ** 52;
    const largest = await files.largestFile(join(dir, 'probe'), limit);
    expect(largest % 4096).toBe(0);
    expect(largest).toBeGreaterThan(0);
    expect(largest).toBeLessThanOrEqual(limit);
    expect(await files.readdir(dir)).toEqual([]);
    const handle = await files.open(join(dir, 'file'), 'create');
    try {
      await handle.truncate(largest);
      if (largest < limit) await expect(handle.truncate(largest + 4096)).rejects.toThrow(/EFBIG|EINVAL/);
    } finally {
      await handle.close();
    }
  });

  it('returns a smaller limit when asked for less than the file system allows', async () => {
    dir = await mkdtemp(join(tmpdir(), 'clonebd-files-'));
    expect(await nodeFileLayer().largestFile(join(dir, 'probe'), 1 << 30)).toBe(1 << 30);
  });
});
