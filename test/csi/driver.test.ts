/**
 * `clonebd csi` as a process: which services it serves with --pool and with --admin over TCP,
 * its socket (a stale one is replaced, a live one is not stolen, a stopped driver removes its
 * own), a full pool (RESOURCE_EXHAUSTED), a daemon that is gone (Probe not ready, UNAVAILABLE),
 * and the options it refuses.
 */
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../native-free/index.js';
import { expectStatus, status, type CsiClient, type CsiReply } from '../helpers/csi-client.js';
import { startCsiProcess, stopAllCsiProcesses } from '../helpers/csi-process.js';
import { CLI_PATH, startServerProcess, stopAllServerProcesses } from '../helpers/server-process.js';
import { makeTempDir, removeTempDirs, run } from '../helpers/tools.js';

const MiB = 2 ** 20;
const BLOCK = 4096;
const CAPABILITIES = [{ block: {}, access_mode: { mode: 'SINGLE_NODE_WRITER' } }];

afterEach(async () => {
  await stopAllCsiProcesses();
  await stopAllServerProcesses();
  await removeTempDirs();
});

function createVolume(csi: CsiClient, request: object): Promise<CsiReply> {
  return csi.call('Controller', 'CreateVolume', { volume_capabilities: CAPABILITIES, ...request });
}

describe('services', () => {
  it('with --pool: Identity, Controller and Node, under the driver name given', async () => {
    const server = await startServerProcess({ args: ['--no-default-volume'] });
    const driver = await startCsiProcess({ pool: server.pool, nodeId: 'worker-7', args: ['--driver-name', 'blocks.example.org', '--max-volumes', '12'] });
    expect((await driver.client.call('Identity', 'GetPluginInfo')).name).toBe('blocks.example.org');
    const info = await driver.client.call('Node', 'NodeGetInfo');
    expect(info).toMatchObject({
      node_id: 'worker-7',
      max_volumes_per_node: 12,
      accessible_topology: { segments: { 'topology.blocks.example.org/node': 'worker-7' } },
    });
    const created = await createVolume(driver.client, { name: 'pvc-topology', capacity_range: { required_bytes: MiB } });
    expect(created.volume.accessible_topology).toEqual([{ segments: { 'topology.blocks.example.org/node': 'worker-7' } }]);
  });

  it('with --admin over TCP: Identity and Controller; Node RPCs are UNIMPLEMENTED', async () => {
    const dir = await makeTempDir('clonebd-csi-token-');
    const tokenFile = join(dir, 'token');
    await writeFile(tokenFile, 'a-long-enough-admin-token\n');
    const server = await startServerProcess({ args: ['--no-default-volume', '--admin-listen', '127.0.0.1:0', '--admin-token-file', tokenFile] });
    const { port } = (await server.waitForLog((line) => line.msg === 'listening')).adminTcp as { port: number };
    const driver = await startCsiProcess({ args: ['--admin', `127.0.0.1:${port}`, '--admin-token-file', tokenFile] });
    const created = await createVolume(driver.client, { name: 'pvc-remote', capacity_range: { required_bytes: MiB } });
    expect(created.volume.volume_id).toBe('pvc-remote');
    expect((await driver.client.call('Identity', 'Probe')).ready).toEqual({ value: true });
    await expectStatus(driver.client.call('Node', 'NodeGetInfo'), status.UNIMPLEMENTED);
  });
});

describe('the socket', () => {
  it('replaces a stale socket, refuses to steal a live one, and is removed on stop', async () => {
    const server = await startServerProcess({ args: ['--no-default-volume'] });
    const dir = await makeTempDir('clonebd-csi-socket-');
    const socket = join(dir, 'sub', 'csi.sock');
    const endpoint = `unix://${socket}`;
    const killed = await startCsiProcess({ pool: server.pool, endpoint });
    await killed.stop('SIGKILL');
    expect(existsSync(socket)).toBe(true);

    const driver = await startCsiProcess({ pool: server.pool, endpoint });
    expect((await driver.client.call('Identity', 'Probe')).ready).toEqual({ value: true });
    const second = await run(process.execPath, [CLI_PATH, 'csi', '--pool', server.pool, '--endpoint', endpoint, '--state-dir', join(dir, 'state')]);
    expect(second.code).toBe(4);
    expect(second.stderr).toMatch(/another process serves/);
    expect((await driver.client.call('Identity', 'Probe')).ready).toEqual({ value: true });

    await driver.stop();
    expect(existsSync(socket)).toBe(false);
  });

  it('refuses endpoints that are no absolute unix socket path, and bad option values', async () => {
    const dir = await makeTempDir('clonebd-csi-args-');
    const socket = `unix://${join(dir, 'csi.sock')}`;
    // An invalid value exits 8 (EINVAL), as for every clonebd command.
    for (const [args, code, message] of [
      [['--endpoint', 'tcp://127.0.0.1:9000'], 8, /invalid CSI endpoint/],
      [['--endpoint', 'unix://relative/csi.sock'], 8, /invalid CSI endpoint/],
      [['--endpoint', socket, '--driver-name', 'under_score.example.org'], 8, /--driver-name/],
      [['--endpoint', socket, '--driver-name', `${'a'.repeat(64)}.org`], 8, /--driver-name/],
      [['--endpoint', socket, '--max-volumes=-1'], 8, /--max-volumes/],
    ] as const) {
      const result = await run(process.execPath, [CLI_PATH, 'csi', '--pool', join(dir, 'pool'), '--state-dir', join(dir, 'state'), ...args]);
      expect(result.code, args.join(' ')).toBe(code);
      expect(result.stderr).toMatch(message);
    }
  });
});

describe('a full pool', () => {
  it('is RESOURCE_EXHAUSTED for new volumes, growing clones and expansion, and GetCapacity says so', async () => {
    const server = await startServerProcess({ args: ['--no-default-volume', '--capacity', '8MiB'] });
    const { client: csi } = await startCsiProcess({ pool: server.pool });
    const capacity = await csi.call('Controller', 'GetCapacity', {});
    expect(capacity.available_capacity).toBeGreaterThan(7 * MiB);
    expect(capacity.available_capacity).toBeLessThanOrEqual(8 * MiB);
    await expectStatus(createVolume(csi, { name: 'pvc-too-big', capacity_range: { required_bytes: 16 * MiB } }), status.RESOURCE_EXHAUSTED);

    const id = (await createVolume(csi, { name: 'pvc-data', capacity_range: { required_bytes: 6 * MiB } })).volume.volume_id as string;
    const client = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: id });
    try {
      await client.write(0, Buffer.alloc(6 * MiB, 0xa5));
      await client.flush();
    } finally {
      await client.disconnect();
    }
    expect((await csi.call('Controller', 'GetCapacity', {})).available_capacity).toBeLessThanOrEqual(2 * MiB);
    await expectStatus(createVolume(csi, { name: 'pvc-more', capacity_range: { required_bytes: 4 * MiB } }), status.RESOURCE_EXHAUSTED);
    await expectStatus(
      createVolume(csi, { name: 'pvc-grown-clone', capacity_range: { required_bytes: 12 * MiB }, volume_content_source: { volume: { volume_id: id } } }),
      status.RESOURCE_EXHAUSTED,
    );
    await expectStatus(csi.call('Controller', 'ControllerExpandVolume', { volume_id: id, capacity_range: { required_bytes: 12 * MiB } }), status.RESOURCE_EXHAUSTED);
    // A clone of the same size costs nothing until written, so it still fits.
    const clone = (await createVolume(csi, { name: 'pvc-clone', volume_content_source: { volume: { volume_id: id } } })).volume.volume_id as string;

    const filler = await NbdClient.connect({ host: server.host, port: server.port }, { exportName: clone });
    try {
      for (let offset = 0; offset < 6 * MiB; offset += BLOCK) {
        const full = await filler.write(offset, Buffer.alloc(BLOCK, 0x3c)).then(
          () => false,
          () => true,
        );
        if (full) break;
      }
    } finally {
      await filler.disconnect();
    }
    expect((await csi.call('Controller', 'GetCapacity', {})).available_capacity).toBeLessThan(BLOCK);
    await expectStatus(createVolume(csi, { name: 'pvc-last-clone', volume_content_source: { volume: { volume_id: id } } }), status.RESOURCE_EXHAUSTED);
  });
});

describe('a daemon that is gone', () => {
  it('makes Probe not ready and the controller UNAVAILABLE', async () => {
    const server = await startServerProcess({ args: ['--no-default-volume'] });
    const { client: csi } = await startCsiProcess({ pool: server.pool });
    await createVolume(csi, { name: 'pvc-before', capacity_range: { required_bytes: MiB } });
    await server.stop();
    expect((await csi.call('Identity', 'Probe')).ready).toEqual({ value: false });
    await expectStatus(createVolume(csi, { name: 'pvc-after', capacity_range: { required_bytes: MiB } }), status.UNAVAILABLE);
    await expectStatus(csi.call('Controller', 'DeleteVolume', { volume_id: 'pvc-before' }), status.UNAVAILABLE);
    await expectStatus(csi.call('Controller', 'ListVolumes', {}), status.UNAVAILABLE);
  });
});
