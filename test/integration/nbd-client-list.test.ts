/** nbd-client (the reference client) lists a real `clonebd serve`'s exports with `-l`. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { requireTool, runOk } from '../helpers/tools.js';

const MiB = 1 << 20;

let server: ServerProcess;

beforeAll(async () => {
  server = await startServerProcess({
    prepare: async (pool) => {
      await pool.createVolume('alpha', 4 * MiB);
      await pool.createVolume('beta', 8 * MiB);
      await pool.snapshot('beta', 'beta-snap');
    },
  });
});

afterAll(stopAllServerProcesses);

describe('nbd-client -l', () => {
  it('lists every export by name', async (ctx) => {
    const nbdClient = requireTool(ctx, 'nbd-client');
    const result = await runOk(nbdClient, ['-l', server.host, String(server.port)]);
    // After its "Negotiation: .." line nbd-client prints one export per line, as `name` or `name: description`.
    const names = result.stdout
      .split('\n')
      .filter((line) => line !== '' && !line.startsWith('Negotiation:'))
      .map((line) => line.split(': ')[0]);
    expect(names.sort()).toEqual(['alpha', 'beta', 'beta-snap']);
  });
});
