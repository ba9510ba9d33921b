import { describe, expect, it } from 'vitest';
import { Pool, type PoolOptions } from '../../../src/store/index.js';
import { MemoryFiles, crashAndReopen } from '../../helpers/store-memfs.js';
import { usePoolFixture } from '../../helpers/store-pool.js';

const MiB = 1024 * 1024;
const fixture = usePoolFixture();
const openPool = (options: PoolOptions = {}): Promise<Pool> => fixture.openPool(options);

async function labelledPool(pool: Pool): Promise<void> {
  await pool.createVolume('base', MiB, { labels: { 'csi/name': 'pvc-1', 'csi/fs': 'ext4' } });
  await pool.snapshot('base', 'snap', { labels: { 'csi/name': 'snapshot-ü' } });
  await pool.clone('base', 'copy', { labels: { 'csi/source': 'base' } });
  await pool.createVolume('plain', MiB);
}

function expectLabels(pool: Pool): void {
  expect(pool.info('base')?.labels).toEqual({ 'csi/name': 'pvc-1', 'csi/fs': 'ext4' });
  expect(pool.info('snap')?.labels).toEqual({ 'csi/name': 'snapshot-ü' });
  expect(pool.info('copy')?.labels).toEqual({ 'csi/source': 'base' });
  expect(pool.info('plain')?.labels).toEqual({});
}

describe('labels', () => {
  it('are kept on volumes, snapshots and clones, and not copied to clones or snapshots', async () => {
    const pool = await openPool();
    await labelledPool(pool);
    expectLabels(pool);
  });

  it('survive a crash, replayed from the journal', async () => {
    const files = new MemoryFiles();
    const pool = await Pool.open('/pool', { files });
    await labelledPool(pool);
    const reopened = await crashAndReopen(files, pool, '/pool', 1);
    try {
      expectLabels(reopened);
    } finally {
      await reopened.close();
    }
  });

  it('survive a close and reopen, read from the checkpoint', async () => {
    const pool = await openPool({ checkpointBytes: 1 });
    await labelledPool(pool);
    await pool.close();
    expectLabels(await openPool({ checkpointBytes: 1 }));
  });

  it('refuse bad keys, bad values and too many, creating nothing', async () => {
    const pool = await openPool();
    await pool.createVolume('base', MiB);
    const refusals: [string, Promise<unknown>][] = [
      ['upper-case key', pool.createVolume('a', MiB, { labels: { Name: 'x' } })],
      ['empty key', pool.clone('base', 'b', { labels: { '': 'x' } })],
      ['key with a space', pool.snapshot('base', 'c', { labels: { 'a b': 'x' } })],
      ['long value', pool.createVolume('d', MiB, { labels: { k: 'x'.repeat(1025) } })],
      ['not a string', pool.createVolume('e', MiB, { labels: { k: 1 as unknown as string } })],
      ['33 labels', pool.createVolume('f', MiB, { labels: Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, 'v'])) })],
    ];
    for (const [what, refusal] of refusals) {
      await expect(refusal, what).rejects.toMatchObject({ code: 'EINVAL' });
    }
    expect(pool.volumes().map((volume) => volume.name)).toEqual(['base']);
  });
});
