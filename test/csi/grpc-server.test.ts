/**
 * The CSI gRPC server in-process, with handlers made for the test: a CsiError leaves as its
 * status, an OperationError through loggedHandlers as its mapped status, anything else as
 * INTERNAL, logged with its cause; RPCs without a handler are UNIMPLEMENTED; requests arrive
 * decoded as the services expect them. Also the endpoint forms and KeyedLock.
 */
import { Writable } from 'node:stream';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { CsiDriver, socketPathOf } from '../../src/csi/driver.js';
import { KeyedLock } from '../../src/csi/keyed-lock.js';
import { CsiError, loggedHandlers, type CsiMessage } from '../../src/csi/rpc.js';
import { OperationError } from '../../src/util/errors.js';
import { CsiClient, codeOf, expectStatus } from '../helpers/csi-client.js';
import { makeTempDir, removeTempDirs } from '../helpers/tools.js';

const cleanups: (() => Promise<void> | void)[] = [];

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  await removeTempDirs();
});

function capturingLogger(): { logger: pino.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const text of chunk.toString('utf8').split('\n')) if (text !== '') lines.push(JSON.parse(text) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level: 'debug' }, stream), lines };
}

async function startDriver(services: ConstructorParameters<typeof CsiDriver>[0]['services'], logger: pino.Logger): Promise<CsiClient> {
  const dir = await makeTempDir('clonebd-grpc-');
  const driver = new CsiDriver({ services, logger });
  const socket = await driver.start(`unix://${join(dir, 'csi.sock')}`);
  const client = new CsiClient(`unix://${socket}`);
  cleanups.push(() => driver.close(), () => client.close());
  return client;
}

describe('the CSI gRPC server', () => {
  it('maps handler failures to statuses and logs unexpected ones with their cause', async () => {
    const { logger, lines } = capturingLogger();
    const client = await startDriver(
      {
        Identity: {
          GetPluginInfo: async () => ({ name: 'test.example.org', vendor_version: '1' }),
          Probe: async () => {
            throw new CsiError(status.FAILED_PRECONDITION, 'not today');
          },
          GetPluginCapabilities: async () => {
            throw new TypeError('a bug');
          },
        },
        Controller: loggedHandlers(logger, {
          DeleteVolume: async () => {
            throw new OperationError('EBUSY', 'attached');
          },
          CreateVolume: async () => {
            throw new OperationError('EIO', 'disk on fire');
          },
        }),
      },
      logger,
    );
    expect(await client.call('Identity', 'GetPluginInfo')).toMatchObject({ name: 'test.example.org' });
    expect((await expectStatus(client.call('Identity', 'Probe'), status.FAILED_PRECONDITION)).details).toBe('not today');
    expect((await expectStatus(client.call('Identity', 'GetPluginCapabilities'), status.INTERNAL)).details).toBe('a bug');
    expect(lines.some((line) => line.rpc === 'GetPluginCapabilities' && (line.err as { message?: string } | undefined)?.message === 'a bug')).toBe(true);
    await expectStatus(client.call('Controller', 'DeleteVolume', { volume_id: 'v' }), status.FAILED_PRECONDITION);
    await expectStatus(client.call('Controller', 'CreateVolume', { name: 'n', secrets: { password: 'hunter2' } }), status.INTERNAL);
    expect(lines.some((line) => line.rpc === 'CreateVolume' && line.msg === 'failed')).toBe(true);
    expect(JSON.stringify(lines)).not.toContain('hunter2');
  });

  it('answers UNIMPLEMENTED for RPCs without a handler and services not served', async () => {
    const { logger } = capturingLogger();
    const client = await startDriver({ Identity: {}, Controller: {} }, logger);
    await expectStatus(client.call('Identity', 'Probe'), status.UNIMPLEMENTED);
    await expectStatus(client.call('Controller', 'ListVolumes'), status.UNIMPLEMENTED);
    await expectStatus(client.call('Node', 'NodeGetInfo'), status.UNIMPLEMENTED);
  });

  it('hands handlers requests decoded with snake_case fields, enum names, numbers and named oneofs', async () => {
    const { logger } = capturingLogger();
    let seen: CsiMessage | undefined;
    const client = await startDriver(
      {
        Identity: {},
        Controller: {
          CreateVolume: async (request) => {
            seen = request;
            return { volume: { volume_id: 'v1', capacity_bytes: 2 ** 40, content_source: { snapshot: { snapshot_id: 's1' } } } };
          },
        },
      },
      logger,
    );
    const reply = await client.call('Controller', 'CreateVolume', {
      name: 'pvc-1',
      capacity_range: { required_bytes: 2 ** 40 },
      volume_capabilities: [{ mount: { fs_type: 'xfs' }, access_mode: { mode: 'SINGLE_NODE_WRITER' } }],
      volume_content_source: { volume: { volume_id: 'src' } },
    });
    expect(seen).toMatchObject({
      name: 'pvc-1',
      capacity_range: { required_bytes: 2 ** 40, limit_bytes: 0 },
      volume_capabilities: [{ access_type: 'mount', mount: { fs_type: 'xfs', mount_flags: [] }, access_mode: { mode: 'SINGLE_NODE_WRITER' } }],
      volume_content_source: { type: 'volume', volume: { volume_id: 'src' } },
      parameters: {},
      accessibility_requirements: null,
    });
    expect(reply.volume).toMatchObject({ volume_id: 'v1', capacity_bytes: 2 ** 40, content_source: { type: 'snapshot', snapshot: { snapshot_id: 's1' } } });
  });
});

describe('endpoints', () => {
  it('are absolute unix socket paths', () => {
    expect(socketPathOf('unix:///csi/csi.sock')).toBe('/csi/csi.sock');
    expect(socketPathOf('unix:/csi/csi.sock')).toBe('/csi/csi.sock');
    for (const bad of ['/csi/csi.sock', 'unix://csi/csi.sock', 'unix:csi.sock', 'tcp://127.0.0.1:1', 'unix:////x', 'unix:///a\u0000b']) {
      expect(() => socketPathOf(bad), bad).toThrow(OperationError);
    }
  });
});

describe('KeyedLock', () => {
  it('runs work of one key in order, other keys alongside, and goes on after a failure', async () => {
    const lock = new KeyedLock();
    const events: string[] = [];
    let releaseFirst!: () => void;
    const firstBlocked = new Promise<void>((resolve) => {
      releaseFirst = resolve;
    });
    const first = lock.run('a', async () => {
      events.push('a1 start');
      await firstBlocked;
      events.push('a1 end');
      throw new Error('a1 failed');
    });
    const second = lock.run('a', async () => {
      events.push('a2');
    });
    await lock.run('b', async () => {
      events.push('b');
    });
    expect(events).toEqual(['a1 start', 'b']);
    releaseFirst();
    await expect(first).rejects.toThrow('a1 failed');
    await second;
    expect(events).toEqual(['a1 start', 'b', 'a1 end', 'a2']);
    expect(lock.size).toBe(0);
  });
});

describe('codeOf', () => {
  it('reads gRPC codes and nothing else', () => {
    expect(codeOf({ code: status.NOT_FOUND })).toBe(status.NOT_FOUND);
    expect(codeOf(new Error('plain'))).toBeUndefined();
  });
});
