/**
 * The node service's bookkeeping without devices: the per-volume records in the state directory
 * and the mount table parser the service trusts over its records.
 */
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseMountInfo } from '../../src/csi/node-mount.js';
import { isValidVolumeId, StateStore, type VolumeRecord } from '../../src/csi/node-state.js';
import { makeTempDir, removeTempDirs } from '../helpers/tools.js';

afterEach(removeTempDirs);

function record(volumeId: string): VolumeRecord {
  return {
    version: 1,
    volumeId,
    stagingTargetPath: '/var/lib/kubelet/plugins/kubernetes.io/csi/clonebd.csi.dev/abc/globalmount',
    accessType: 'mount',
    fsType: 'ext4',
    mountFlags: ['noatime'],
    attachment: { kind: 'nbdfuse', bootId: '9a3c1c1e-0f3e-4d4e-9a41-1f2d3c4b5a69', fuseDir: '/state/fuse/v', file: '/state/fuse/v/disk', pid: 42, identity: { major: 0, minor: 51, ino: 2 }, loopDevice: '/dev/loop3' },
    device: '/dev/loop3',
    publications: { '/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv/mount': { readonly: true } },
  };
}

describe('node state records', () => {
  it('round-trip through the state directory and leave no temporary file behind', async () => {
    const dir = await makeTempDir();
    const store = new StateStore(dir);
    await store.init();
    await store.write(record('pvc-1'));
    const changed = { ...record('pvc-1'), publications: {} };
    await store.write(changed);
    expect(await store.read('pvc-1')).toEqual(changed);
    expect(await readdir(join(dir, 'volumes'))).toEqual(['pvc-1.json']);
    await store.remove('pvc-1');
    await store.remove('pvc-1');
    expect(await store.read('pvc-1')).toBeUndefined();
  });

  it('refuse a record that is not JSON, is malformed, or names another volume', async () => {
    const dir = await makeTempDir();
    const store = new StateStore(dir);
    await store.init();
    await writeFile(join(dir, 'volumes', 'a.json'), '{"version":1,');
    await expect(store.read('a')).rejects.toMatchObject({ code: 'EIO' });
    await writeFile(join(dir, 'volumes', 'b.json'), JSON.stringify({ ...record('b'), accessType: 'tape' }));
    await expect(store.read('b')).rejects.toMatchObject({ code: 'EIO' });
    await writeFile(join(dir, 'volumes', 'c.json'), JSON.stringify(record('d')));
    await expect(store.read('c')).rejects.toMatchObject({ code: 'EIO' });
  });

  it('take only volume ids that are clonebd names, so an id names no path of its own', async () => {
    for (const good of ['pvc-0b6e', 'a', 'A_b.c-d', 'x'.repeat(128)]) expect(isValidVolumeId(good), good).toBe(true);
    for (const bad of ['', '.', '..', '../etc', 'a/b', '-rf', '.hidden', 'x'.repeat(129), 'a\0b', 'spa ce']) {
      expect(isValidVolumeId(bad), bad).toBe(false);
    }
    const store = new StateStore(await makeTempDir());
    await store.init();
    await expect(store.read('../escape')).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(store.write(record('../escape'))).rejects.toMatchObject({ code: 'EINVAL' });
  });
});

describe('mountinfo parsing', () => {
  it('reads mount point, device, root, type and source, with escaped spaces and optional fields', () => {
    const text = [
      '36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue',
      '41 29 7:3 / /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv/mount rw,relatime shared:7 shared:9 - ext4 /dev/loop3 rw',
      '52 29 0:5 /loop3 /var/lib/kubelet/publish/pv/pod rw - devtmpfs udev rw',
      'garbage line without separator',
      '',
    ].join('\n');
    expect(parseMountInfo(text)).toEqual([
      { mountPoint: '/mnt/with space', device: '98:0', root: '/mnt1', fsType: 'ext3', source: '/dev/root' },
      { mountPoint: '/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv/mount', device: '7:3', root: '/', fsType: 'ext4', source: '/dev/loop3' },
      { mountPoint: '/var/lib/kubelet/publish/pv/pod', device: '0:5', root: '/loop3', fsType: 'devtmpfs', source: 'udev' },
    ]);
  });
});
