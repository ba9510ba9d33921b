/**
 * The CSI Identity and Controller services of a real `clonebd csi` process, driven over its gRPC
 * socket, over a real `clonebd serve` daemon: every RPC, the error codes the CSI spec names for
 * each failure, idempotent retries, pagination and topology.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AdminClient } from '../../src/control/admin-client.js';
import { expectStatus, status, type CsiClient, type CsiReply } from '../helpers/csi-client.js';
import { startCsiProcess, stopAllCsiProcesses } from '../helpers/csi-process.js';
import { startServerProcess, stopAllServerProcesses } from '../helpers/server-process.js';

const DRIVER = 'clonebd.csi.clonebd.io';
const TOPOLOGY_KEY = `topology.${DRIVER}/node`;
const NODE = 'node-a';
const MiB = 2 ** 20;
const MOUNT = [{ mount: { fs_type: 'ext4' }, access_mode: { mode: 'SINGLE_NODE_WRITER' } }];
const BLOCK = [{ block: {}, access_mode: { mode: 'SINGLE_NODE_WRITER' } }];
const VERSION = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

let csi: CsiClient;
let admin: AdminClient;
let counter = 0;

/** A fresh Kubernetes-style name. */
function fresh(prefix = 'pvc'): string {
  counter += 1;
  return `${prefix}-${counter.toString().padStart(4, '0')}-5d1f0a7e-0c4b-4c5e-9f59-7a1c2b3d4e5f`.slice(0, 40);
}

function createVolume(request: object): Promise<CsiReply> {
  return csi.call('Controller', 'CreateVolume', { volume_capabilities: MOUNT, ...request });
}

async function volume(request: object): Promise<CsiReply> {
  return (await createVolume(request)).volume as CsiReply;
}

beforeAll(async () => {
  const server = await startServerProcess({ args: ['--no-default-volume'] });
  admin = new AdminClient(join(server.pool, 'admin.sock'));
  const driver = await startCsiProcess({ pool: server.pool, nodeId: NODE });
  csi = driver.client;
});

afterAll(async () => {
  await stopAllCsiProcesses();
  await stopAllServerProcesses();
});

describe('Identity', () => {
  it('GetPluginInfo names the driver and the package version', async () => {
    const info = await csi.call('Identity', 'GetPluginInfo');
    expect(info).toMatchObject({ name: DRIVER, vendor_version: VERSION });
  });

  it('GetPluginCapabilities offers the controller, topology and online expansion', async () => {
    const { capabilities } = await csi.call('Identity', 'GetPluginCapabilities');
    expect(capabilities).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ service: { type: 'CONTROLLER_SERVICE' } }),
        expect.objectContaining({ service: { type: 'VOLUME_ACCESSIBILITY_CONSTRAINTS' } }),
        expect.objectContaining({ volume_expansion: { type: 'ONLINE' } }),
      ]),
    );
    expect(capabilities).toHaveLength(3);
  });

  it('Probe is ready while the daemon answers', async () => {
    expect((await csi.call('Identity', 'Probe')).ready).toEqual({ value: true });
  });
});

describe('ControllerGetCapabilities', () => {
  it('lists exactly the RPCs the controller implements', async () => {
    const { capabilities } = await csi.call('Controller', 'ControllerGetCapabilities');
    const types = (capabilities as CsiReply[]).map((capability) => capability.rpc.type as string).sort();
    expect(types).toEqual(
      ['CLONE_VOLUME', 'CREATE_DELETE_SNAPSHOT', 'CREATE_DELETE_VOLUME', 'EXPAND_VOLUME', 'GET_CAPACITY', 'LIST_SNAPSHOTS', 'LIST_VOLUMES'].sort(),
    );
  });
});

describe('CreateVolume', () => {
  it('creates a volume of the size asked, rounded up to 4 KiB, on this node', async () => {
    const name = fresh();
    const created = await volume({ name, capacity_range: { required_bytes: 3 * MiB + 1 } });
    expect(created).toMatchObject({
      volume_id: name,
      capacity_bytes: 3 * MiB + 4096,
      accessible_topology: [{ segments: { [TOPOLOGY_KEY]: NODE } }],
    });
    expect(created.content_source).toBeNull();
    const view = await admin.showVolume(name);
    expect(view).toMatchObject({ kind: 'volume', size: 3 * MiB + 4096 });
    expect(view.labels['csi/name']).toBe(name);
  });

  it('stays inside limit_bytes and defaults to 1 GiB', async () => {
    expect((await volume({ name: fresh(), capacity_range: { required_bytes: 1000, limit_bytes: 2000 } })).capacity_bytes).toBe(2000);
    expect((await volume({ name: fresh() })).capacity_bytes).toBe(2 ** 30);
    expect((await volume({ name: fresh(), volume_capabilities: BLOCK, capacity_range: { limit_bytes: MiB } })).capacity_bytes).toBe(MiB);
  });

  it('is idempotent: a retry with the same arguments returns the same volume', async () => {
    const name = fresh();
    const request = { name, capacity_range: { required_bytes: MiB }, parameters: { tier: 'gold' } };
    const first = await volume(request);
    const again = await Promise.all([volume(request), volume(request), volume({ ...request, volume_capabilities: BLOCK })]);
    for (const retry of again) expect(retry).toEqual(first);
    expect((await admin.listVolumes()).filter((view) => view.labels['csi/name'] === name)).toHaveLength(1);
  });

  it('is ALREADY_EXISTS for the same name with another size, parameters or source', async () => {
    const name = fresh();
    await volume({ name, capacity_range: { required_bytes: MiB }, parameters: { tier: 'gold' } });
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    await expectStatus(createVolume({ name, capacity_range: { required_bytes: 2 * MiB }, parameters: { tier: 'gold' } }), status.ALREADY_EXISTS);
    await expectStatus(createVolume({ name, capacity_range: { required_bytes: MiB }, parameters: { tier: 'silver' } }), status.ALREADY_EXISTS);
    await expectStatus(createVolume({ name, capacity_range: { required_bytes: MiB } }), status.ALREADY_EXISTS);
    await expectStatus(
      createVolume({ name, capacity_range: { required_bytes: MiB }, parameters: { tier: 'gold' }, volume_content_source: { volume: { volume_id: source } } }),
      status.ALREADY_EXISTS,
    );
  });

  it('keeps unicode and hostile names out of store names, and finds them again', async () => {
    for (const name of ['ünïcødé-volume', '../../etc/passwd', 'a/b\\c d', 'x'.repeat(300), 'PVC-Upper', '-leading', 'snapshot-and-volume']) {
      const created = await volume({ name, capacity_range: { required_bytes: MiB } });
      const id = created.volume_id as string;
      expect(id).toMatch(name === 'snapshot-and-volume' ? /^snapshot-and-volume$/ : /^csi_v_[0-9a-f]{32}$/);
      expect((await volume({ name, capacity_range: { required_bytes: MiB } })).volume_id).toBe(id);
      expect((await admin.showVolume(id)).labels['csi/name']).toBe(name);
    }
    // A snapshot of the same CSI name lives beside the volume, under a store name of its own.
    const snapshot = (await csi.call('Controller', 'CreateSnapshot', { name: 'snapshot-and-volume', source_volume_id: 'snapshot-and-volume' })).snapshot;
    expect(snapshot.snapshot_id).toMatch(/^csi_s_[0-9a-f]{32}$/);
  });

  it('takes another store name when a plain one is held by a volume made by hand', async () => {
    const name = fresh();
    await admin.createVolume(name, MiB);
    const created = await volume({ name, capacity_range: { required_bytes: 2 * MiB } });
    expect(created.volume_id).toMatch(/^csi_v_/);
    expect((await admin.showVolume(name)).size).toBe(MiB);
    expect((await volume({ name, capacity_range: { required_bytes: 2 * MiB } })).volume_id).toBe(created.volume_id);
  });

  it('is INVALID_ARGUMENT without a name or capabilities, or with malformed ones', async () => {
    await expectStatus(createVolume({ name: '' }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: 'bad\u0001name' }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), volume_capabilities: [] }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), volume_capabilities: [{ mount: {} }] }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), volume_capabilities: [{ access_mode: { mode: 'SINGLE_NODE_WRITER' } }] }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), capacity_range: { required_bytes: -1 } }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), volume_content_source: {} }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), volume_content_source: { volume: { volume_id: '' } } }), status.INVALID_ARGUMENT);
    await expectStatus(createVolume({ name: fresh(), mutable_parameters: { iops: '100' } }), status.INVALID_ARGUMENT);
  });

  it('refuses capabilities a volume of one node cannot give with INVALID_ARGUMENT', async () => {
    for (const mode of ['MULTI_NODE_READER_ONLY', 'MULTI_NODE_SINGLE_WRITER', 'MULTI_NODE_MULTI_WRITER']) {
      await expectStatus(createVolume({ name: fresh(), volume_capabilities: [{ block: {}, access_mode: { mode } }] }), status.INVALID_ARGUMENT);
    }
    await expectStatus(
      createVolume({ name: fresh(), volume_capabilities: [{ mount: { fs_type: 'ntfs' }, access_mode: { mode: 'SINGLE_NODE_WRITER' } }] }),
      status.INVALID_ARGUMENT,
    );
    for (const mode of ['SINGLE_NODE_READER_ONLY', 'SINGLE_NODE_SINGLE_WRITER', 'SINGLE_NODE_MULTI_WRITER']) {
      await volume({ name: fresh(), capacity_range: { required_bytes: MiB }, volume_capabilities: [{ mount: { fs_type: 'xfs' }, access_mode: { mode } }] });
    }
  });

  it('is OUT_OF_RANGE for a range it cannot meet', async () => {
    await expectStatus(createVolume({ name: fresh(), capacity_range: { required_bytes: 2 * MiB, limit_bytes: MiB } }), status.OUT_OF_RANGE);
    await expectStatus(createVolume({ name: fresh(), capacity_range: { required_bytes: 2 ** 53 } }), status.OUT_OF_RANGE);
  });

  it('honours the requisite topology: this node is OK, any other RESOURCE_EXHAUSTED', async () => {
    const here = { segments: { [TOPOLOGY_KEY]: NODE } };
    const elsewhere = { segments: { [TOPOLOGY_KEY]: 'node-b' } };
    const created = await volume({ name: fresh(), capacity_range: { required_bytes: MiB }, accessibility_requirements: { requisite: [elsewhere, here], preferred: [here] } });
    expect(created.accessible_topology).toEqual([here]);
    await expectStatus(
      createVolume({ name: fresh(), capacity_range: { required_bytes: MiB }, accessibility_requirements: { requisite: [elsewhere], preferred: [elsewhere] } }),
      status.RESOURCE_EXHAUSTED,
    );
    await expectStatus(
      createVolume({ name: fresh(), capacity_range: { required_bytes: MiB }, accessibility_requirements: { requisite: [{ segments: { 'zone.example/zone': 'z1' } }] } }),
      status.RESOURCE_EXHAUSTED,
    );
  });
});

describe('CreateVolume from a content source', () => {
  it('clones a volume, reporting its source, at the source size or larger', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: 4 * MiB } })).volume_id as string;
    const clone = await volume({ name: fresh(), volume_content_source: { volume: { volume_id: source } } });
    expect(clone).toMatchObject({ capacity_bytes: 4 * MiB, content_source: { volume: { volume_id: source } } });
    expect(clone.accessible_topology).toEqual([{ segments: { [TOPOLOGY_KEY]: NODE } }]);
    const larger = await volume({ name: fresh(), capacity_range: { required_bytes: 8 * MiB }, volume_content_source: { volume: { volume_id: source } } });
    expect(larger.capacity_bytes).toBe(8 * MiB);
    expect((await admin.showVolume(larger.volume_id as string)).parent).toBe(source);
  });

  it('is OUT_OF_RANGE for a clone smaller than its source', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: 4 * MiB } })).volume_id as string;
    const from = { volume: { volume_id: source } };
    await expectStatus(createVolume({ name: fresh(), capacity_range: { required_bytes: 2 * MiB }, volume_content_source: from }), status.OUT_OF_RANGE);
    await expectStatus(createVolume({ name: fresh(), capacity_range: { limit_bytes: 2 * MiB }, volume_content_source: from }), status.OUT_OF_RANGE);
  });

  it('restores a snapshot, reporting it as the source', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: 2 * MiB } })).volume_id as string;
    const snapshot = (await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source })).snapshot;
    const restored = await volume({ name: fresh(), volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } });
    expect(restored).toMatchObject({ capacity_bytes: 2 * MiB, content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } });
    await expectStatus(
      createVolume({ name: fresh(), capacity_range: { required_bytes: MiB }, volume_content_source: { snapshot: { snapshot_id: snapshot.snapshot_id } } }),
      status.OUT_OF_RANGE,
    );
  });

  it('is NOT_FOUND for a source that does not exist, is malformed, or is of the other kind', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const snapshot = (await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source })).snapshot.snapshot_id as string;
    for (const content of [
      { volume: { volume_id: 'pvc-missing' } },
      { snapshot: { snapshot_id: 'snapshot-missing' } },
      { volume: { volume_id: '../../etc/passwd' } },
      { volume: { volume_id: snapshot } },
      { snapshot: { snapshot_id: source } },
    ]) {
      await expectStatus(createVolume({ name: fresh(), volume_content_source: content }), status.NOT_FOUND);
    }
  });

  it('is RESOURCE_EXHAUSTED for a clone whose source is on another node', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    await expectStatus(
      createVolume({
        name: fresh(),
        volume_content_source: { volume: { volume_id: source } },
        accessibility_requirements: { requisite: [{ segments: { [TOPOLOGY_KEY]: 'node-b' } }] },
      }),
      status.RESOURCE_EXHAUSTED,
    );
  });
});

describe('DeleteVolume', () => {
  it('deletes, and is OK again for a volume already gone', async () => {
    const id = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    await csi.call('Controller', 'DeleteVolume', { volume_id: id });
    await expect(admin.showVolume(id)).rejects.toMatchObject({ code: 'ENOENT' });
    await csi.call('Controller', 'DeleteVolume', { volume_id: id });
  });

  it('is OK for unknown and malformed ids, INVALID_ARGUMENT without one', async () => {
    for (const id of ['pvc-never-made', '../../etc', 'ünï', 'x'.repeat(500)]) await csi.call('Controller', 'DeleteVolume', { volume_id: id });
    await expectStatus(csi.call('Controller', 'DeleteVolume', { volume_id: '' }), status.INVALID_ARGUMENT);
  });

  it('leaves volumes it did not make, and snapshots, alone', async () => {
    const handMade = fresh('hand');
    await admin.createVolume(handMade, MiB);
    await csi.call('Controller', 'DeleteVolume', { volume_id: handMade });
    expect((await admin.showVolume(handMade)).kind).toBe('volume');
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const snapshot = (await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source })).snapshot.snapshot_id as string;
    await csi.call('Controller', 'DeleteVolume', { volume_id: snapshot });
    expect((await admin.showVolume(snapshot)).kind).toBe('snapshot');
  });

  it('leaves the clones of a deleted source intact', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const clone = (await volume({ name: fresh(), volume_content_source: { volume: { volume_id: source } } })).volume_id as string;
    await csi.call('Controller', 'DeleteVolume', { volume_id: source });
    expect((await admin.showVolume(clone)).size).toBe(MiB);
    const listed = await csi.call('Controller', 'ListVolumes', {});
    expect((listed.entries as CsiReply[]).some((entry) => entry.volume.volume_id === clone)).toBe(true);
  });
});

describe('ValidateVolumeCapabilities', () => {
  it('confirms what a volume supports and not what it does not', async () => {
    const id = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB }, parameters: { tier: 'gold' } })).volume_id as string;
    const confirmed = await csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: id, volume_capabilities: [...MOUNT, ...BLOCK] });
    expect(confirmed.confirmed.volume_capabilities).toHaveLength(2);
    const withParameters = await csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: id, volume_capabilities: MOUNT, parameters: { tier: 'gold' } });
    expect(withParameters.confirmed.parameters).toEqual({ tier: 'gold' });
    for (const request of [
      { volume_capabilities: [{ block: {}, access_mode: { mode: 'MULTI_NODE_MULTI_WRITER' } }] },
      { volume_capabilities: MOUNT, parameters: { tier: 'silver' } },
    ]) {
      const answer = await csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: id, ...request });
      expect(answer.confirmed).toBeNull();
      expect(answer.message).not.toBe('');
    }
  });

  it('is NOT_FOUND for an unknown volume, INVALID_ARGUMENT without id or capabilities', async () => {
    await expectStatus(csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: 'pvc-never-made', volume_capabilities: MOUNT }), status.NOT_FOUND);
    await expectStatus(csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: '../x', volume_capabilities: MOUNT }), status.NOT_FOUND);
    await expectStatus(csi.call('Controller', 'ValidateVolumeCapabilities', { volume_capabilities: MOUNT }), status.INVALID_ARGUMENT);
    const id = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    await expectStatus(csi.call('Controller', 'ValidateVolumeCapabilities', { volume_id: id }), status.INVALID_ARGUMENT);
  });
});

/** Every page of a listing, following next_token. */
async function listAll(method: 'ListVolumes' | 'ListSnapshots', request: object, maxEntries: number): Promise<{ pages: number; entries: CsiReply[] }> {
  const entries: CsiReply[] = [];
  let token = '';
  let pages = 0;
  do {
    const reply = await csi.call('Controller', method, { ...request, max_entries: maxEntries, starting_token: token });
    expect((reply.entries as CsiReply[]).length).toBeLessThanOrEqual(maxEntries);
    entries.push(...(reply.entries as CsiReply[]));
    token = reply.next_token as string;
    pages += 1;
  } while (token !== '');
  return { pages, entries };
}

describe('ListVolumes', () => {
  it('pages through every volume of the driver once, and only those', async () => {
    await admin.createVolume(fresh('hand'), MiB);
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push((await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string);
    const all = (await csi.call('Controller', 'ListVolumes', {})).entries as CsiReply[];
    const paged = await listAll('ListVolumes', {}, 2);
    expect(paged.entries.map((entry) => entry.volume.volume_id)).toEqual(all.map((entry) => entry.volume.volume_id));
    expect(paged.pages).toBe(Math.ceil(all.length / 2));
    expect(new Set(paged.entries.map((entry) => entry.volume.volume_id)).size).toBe(all.length);
    expect(all.map((entry) => entry.volume.volume_id)).toEqual(expect.arrayContaining(ids));
    const storeVolumes = (await admin.listVolumes()).filter((view) => view.kind === 'volume' && view.labels['csi/driver'] === DRIVER);
    expect(all).toHaveLength(storeVolumes.length);
    for (const entry of all) expect(entry.volume.accessible_topology).toEqual([{ segments: { [TOPOLOGY_KEY]: NODE } }]);
  });

  it('keeps paging consistent when volumes are deleted between pages', async () => {
    const ids = [];
    for (let i = 0; i < 4; i++) ids.push((await volume({ name: fresh('page'), capacity_range: { required_bytes: MiB } })).volume_id as string);
    const first = await csi.call('Controller', 'ListVolumes', { max_entries: 1 });
    const next = first.next_token as string;
    expect(next).not.toBe('');
    const rest = await csi.call('Controller', 'ListVolumes', { starting_token: next });
    const firstId = (first.entries as CsiReply[])[0]!.volume.volume_id as string;
    await csi.call('Controller', 'DeleteVolume', { volume_id: ((rest.entries as CsiReply[])[0]!.volume.volume_id) as string });
    const afterDelete = await csi.call('Controller', 'ListVolumes', { starting_token: next });
    expect((afterDelete.entries as CsiReply[]).map((entry) => entry.volume.volume_id)).toEqual(
      (rest.entries as CsiReply[]).slice(1).map((entry) => entry.volume.volume_id),
    );
    expect((afterDelete.entries as CsiReply[]).some((entry) => entry.volume.volume_id === firstId)).toBe(false);
  });

  it('is ABORTED for a token it did not give out, INVALID_ARGUMENT for negative max_entries', async () => {
    for (const token of ['invalid-token', 'p1.', 'p1.Li4vZXRj', 'p1.!!!']) {
      await expectStatus(csi.call('Controller', 'ListVolumes', { starting_token: token }), status.ABORTED);
    }
    await expectStatus(csi.call('Controller', 'ListVolumes', { max_entries: -1 }), status.INVALID_ARGUMENT);
  });
});

describe('snapshots', () => {
  it('CreateSnapshot is ready at once, with the size, source and time of the volume', async () => {
    const before = Math.floor(Date.now() / 1000) - 1;
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: 3 * MiB } })).volume_id as string;
    const name = fresh('snapshot');
    const { snapshot } = await csi.call('Controller', 'CreateSnapshot', { name, source_volume_id: source });
    expect(snapshot).toMatchObject({ snapshot_id: name, source_volume_id: source, size_bytes: 3 * MiB, ready_to_use: true });
    expect(snapshot.creation_time.seconds).toBeGreaterThanOrEqual(before);
    expect(snapshot.creation_time.seconds).toBeLessThanOrEqual(Math.ceil(Date.now() / 1000));
  });

  it('CreateSnapshot is idempotent, ALREADY_EXISTS for another source or parameters', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const other = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const name = fresh('snapshot');
    const first = await csi.call('Controller', 'CreateSnapshot', { name, source_volume_id: source, parameters: { a: 'b' } });
    expect(await csi.call('Controller', 'CreateSnapshot', { name, source_volume_id: source, parameters: { a: 'b' } })).toEqual(first);
    await expectStatus(csi.call('Controller', 'CreateSnapshot', { name, source_volume_id: other, parameters: { a: 'b' } }), status.ALREADY_EXISTS);
    await expectStatus(csi.call('Controller', 'CreateSnapshot', { name, source_volume_id: source }), status.ALREADY_EXISTS);
  });

  it('CreateSnapshot is NOT_FOUND for a missing source, INVALID_ARGUMENT without name or source', async () => {
    await expectStatus(csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: 'pvc-missing' }), status.NOT_FOUND);
    await expectStatus(csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: '../etc' }), status.NOT_FOUND);
    await expectStatus(csi.call('Controller', 'CreateSnapshot', { source_volume_id: 'pvc-x' }), status.INVALID_ARGUMENT);
    await expectStatus(csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot') }), status.INVALID_ARGUMENT);
  });

  it('ListSnapshots filters by id and by source and pages', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push((await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source })).snapshot.snapshot_id as string);
    const bySource = await listAll('ListSnapshots', { source_volume_id: source }, 2);
    expect(bySource.entries.map((entry) => entry.snapshot.snapshot_id)).toEqual([...ids].sort());
    expect(bySource.pages).toBe(3);
    const byId = await csi.call('Controller', 'ListSnapshots', { snapshot_id: ids[2] });
    expect((byId.entries as CsiReply[]).map((entry) => entry.snapshot)).toEqual([expect.objectContaining({ snapshot_id: ids[2], source_volume_id: source, ready_to_use: true })]);
    for (const snapshotId of ['snapshot-missing', '../etc', source]) {
      expect((await csi.call('Controller', 'ListSnapshots', { snapshot_id: snapshotId })).entries).toEqual([]);
    }
    expect((await csi.call('Controller', 'ListSnapshots', { source_volume_id: 'pvc-missing' })).entries).toEqual([]);
    const all = await listAll('ListSnapshots', {}, 3);
    expect(new Set(all.entries.map((entry) => entry.snapshot.snapshot_id)).size).toBe(all.entries.length);
    expect(all.entries.map((entry) => entry.snapshot.snapshot_id)).toEqual(expect.arrayContaining(ids));
  });

  it('ListSnapshots is ABORTED for a bad token', async () => {
    await expectStatus(csi.call('Controller', 'ListSnapshots', { starting_token: 'invalid-token' }), status.ABORTED);
  });

  it('DeleteSnapshot deletes, OK again and for unknown ids; the restored volume and source stay', async () => {
    const source = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const snapshot = (await csi.call('Controller', 'CreateSnapshot', { name: fresh('snapshot'), source_volume_id: source })).snapshot.snapshot_id as string;
    const restored = (await volume({ name: fresh(), volume_content_source: { snapshot: { snapshot_id: snapshot } } })).volume_id as string;
    await csi.call('Controller', 'DeleteSnapshot', { snapshot_id: snapshot });
    await csi.call('Controller', 'DeleteSnapshot', { snapshot_id: snapshot });
    await csi.call('Controller', 'DeleteSnapshot', { snapshot_id: '../../x' });
    await csi.call('Controller', 'DeleteSnapshot', { snapshot_id: source });
    await expect(admin.showVolume(snapshot)).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await admin.showVolume(source)).kind).toBe('volume');
    expect((await admin.showVolume(restored)).kind).toBe('volume');
    await expectStatus(csi.call('Controller', 'DeleteSnapshot', {}), status.INVALID_ARGUMENT);
  });
});

describe('GetCapacity', () => {
  it('reports the pool free space here, nothing for another node or an unsupported capability', async () => {
    const reply = await csi.call('Controller', 'GetCapacity', { volume_capabilities: MOUNT, accessible_topology: { segments: { [TOPOLOGY_KEY]: NODE } } });
    const { freeBytes } = await admin.poolStatus();
    expect(reply.available_capacity).toBeGreaterThan(0);
    // Other tests write to the same file system meanwhile: the two readings are close, not equal.
    expect(Math.abs((reply.available_capacity as number) - freeBytes)).toBeLessThan(freeBytes / 10);
    expect(reply.maximum_volume_size.value).toBe(reply.available_capacity);
    expect((await csi.call('Controller', 'GetCapacity', { accessible_topology: { segments: { [TOPOLOGY_KEY]: 'node-b' } } })).available_capacity).toBe(0);
    expect(
      (await csi.call('Controller', 'GetCapacity', { volume_capabilities: [{ block: {}, access_mode: { mode: 'MULTI_NODE_MULTI_WRITER' } }] })).available_capacity,
    ).toBe(0);
  });
});

describe('ControllerExpandVolume', () => {
  it('grows a volume; a file system needs the node, a block volume does not', async () => {
    const id = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    const grown = await csi.call('Controller', 'ControllerExpandVolume', { volume_id: id, capacity_range: { required_bytes: 3 * MiB }, volume_capability: MOUNT[0] });
    expect(grown).toEqual({ capacity_bytes: 3 * MiB, node_expansion_required: true });
    expect((await admin.showVolume(id)).size).toBe(3 * MiB);
    const block = await csi.call('Controller', 'ControllerExpandVolume', { volume_id: id, capacity_range: { required_bytes: 4 * MiB }, volume_capability: BLOCK[0] });
    expect(block).toEqual({ capacity_bytes: 4 * MiB, node_expansion_required: false });
  });

  it('answers a request at or below the current size with the current size; never shrinks', async () => {
    const id = (await volume({ name: fresh(), capacity_range: { required_bytes: 2 * MiB } })).volume_id as string;
    expect((await csi.call('Controller', 'ControllerExpandVolume', { volume_id: id, capacity_range: { required_bytes: MiB } })).capacity_bytes).toBe(2 * MiB);
    await expectStatus(csi.call('Controller', 'ControllerExpandVolume', { volume_id: id, capacity_range: { limit_bytes: MiB } }), status.OUT_OF_RANGE);
    expect((await admin.showVolume(id)).size).toBe(2 * MiB);
  });

  it('is NOT_FOUND for an unknown volume, INVALID_ARGUMENT without id or range', async () => {
    await expectStatus(csi.call('Controller', 'ControllerExpandVolume', { volume_id: 'pvc-missing', capacity_range: { required_bytes: MiB } }), status.NOT_FOUND);
    await expectStatus(csi.call('Controller', 'ControllerExpandVolume', { volume_id: '../x', capacity_range: { required_bytes: MiB } }), status.NOT_FOUND);
    await expectStatus(csi.call('Controller', 'ControllerExpandVolume', { capacity_range: { required_bytes: MiB } }), status.INVALID_ARGUMENT);
    const id = (await volume({ name: fresh(), capacity_range: { required_bytes: MiB } })).volume_id as string;
    await expectStatus(csi.call('Controller', 'ControllerExpandVolume', { volume_id: id }), status.INVALID_ARGUMENT);
  });
});
