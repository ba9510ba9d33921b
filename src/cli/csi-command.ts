/**
 * `clonebd csi`: the Kubernetes CSI driver of one node. It serves Identity, Controller and Node on
 * a Unix socket and does its work through the daemon of its node: the admin API for volumes and
 * snapshots, the pool's NBD socket to attach them. With --pool it serves all three services; with
 * --admin HOST:PORT it reaches a daemon over TCP and, having no NBD socket to attach through,
 * serves Identity and Controller only.
 */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import type { Argv, CommandModule } from 'yargs';
import { AdminClient } from '../control/admin-client.js';
import { OperationError } from '../util/errors.js';
import { createControllerHandlers } from '../csi/controller.js';
import { CsiDriver } from '../csi/driver.js';
import { createIdentityHandlers } from '../csi/identity.js';
import { createNodeHandlers } from '../csi/node.js';
import { readAdminToken } from './admin-commands.js';
import { parseListen } from './parse.js';
import { stopSignal } from './stop-signal.js';
import { adminSocketPath, defaultPoolDir, nbdSocketPath } from './serve.js';

const env = process.env;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export const DEFAULT_DRIVER_NAME = 'clonebd.csi.clonebd.io';
export const DEFAULT_CSI_ENDPOINT = 'unix:///csi/csi.sock';
export const DEFAULT_CSI_STATE_DIR = '/var/lib/clonebd-csi';
// The spec's rule for plugin names: domain name notation, at most 63 characters.
const DRIVER_NAME = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$/;

interface CsiArgs {
  endpoint: string;
  pool: string;
  admin: string | undefined;
  'admin-token-file': string | undefined;
  'node-id': string;
  'driver-name': string;
  'max-volumes': number;
  'state-dir': string;
  'log-level': (typeof LOG_LEVELS)[number];
}

/** The topology segment key of a driver: its volumes are accessible from the node it names. */
export function topologyKeyOf(driverName: string): string {
  return `topology.${driverName}/node`;
}

/** The version in the package.json above this module, in src/ as in dist/. */
function packageVersion(): string {
  let directory = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      const manifest = JSON.parse(readFileSync(join(directory, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
      if (manifest.name === 'clonebd' && typeof manifest.version === 'string') return manifest.version;
    } catch {
      // No manifest here: look further up.
    }
    const parent = dirname(directory);
    if (parent === directory) return 'unknown';
    directory = parent;
  }
}

function builder(yargs: Argv): Argv<CsiArgs> {
  return yargs
    .option('endpoint', {
      type: 'string',
      default: env.CSI_ENDPOINT ?? DEFAULT_CSI_ENDPOINT,
      defaultDescription: `$CSI_ENDPOINT or ${DEFAULT_CSI_ENDPOINT}`,
      describe: 'Unix socket to serve CSI on, unix:///absolute/path',
    })
    .option('pool', {
      type: 'string',
      default: defaultPoolDir(),
      describe: 'Pool directory of this node\'s daemon (its admin.sock and nbd.sock); env CLONEBD_POOL',
    })
    .option('admin', {
      type: 'string',
      default: env.CLONEBD_ADMIN,
      describe: 'Reach the daemon\'s admin API over TCP at HOST:PORT instead (Identity and Controller only); env CLONEBD_ADMIN',
    })
    .option('admin-token-file', { type: 'string', describe: 'File holding the admin token for --admin (or env CLONEBD_ADMIN_TOKEN)' })
    .option('node-id', {
      type: 'string',
      default: env.NODE_ID ?? hostname(),
      defaultDescription: '$NODE_ID or the host name',
      describe: 'This node\'s id, as the CO knows it',
    })
    .option('driver-name', {
      type: 'string',
      default: env.CLONEBD_CSI_DRIVER_NAME ?? DEFAULT_DRIVER_NAME,
      describe: 'CSI driver name, in domain name notation; env CLONEBD_CSI_DRIVER_NAME',
    })
    .option('max-volumes', { type: 'number', default: 0, describe: 'Most volumes the node may have attached (0: no limit)' })
    .option('state-dir', {
      type: 'string',
      default: env.CLONEBD_CSI_STATE_DIR ?? DEFAULT_CSI_STATE_DIR,
      describe: 'Where the node service records what it attached and mounted; env CLONEBD_CSI_STATE_DIR',
    })
    .option('log-level', {
      choices: LOG_LEVELS,
      default: (env.CLONEBD_LOG_LEVEL ?? 'info') as (typeof LOG_LEVELS)[number],
      describe: 'Log level; env CLONEBD_LOG_LEVEL',
    })
    .check((args) => {
      if (!DRIVER_NAME.test(args['driver-name'])) {
        throw new OperationError('EINVAL', `invalid --driver-name "${args['driver-name']}": up to 63 of [A-Za-z0-9.-], starting and ending alphanumeric`);
      }
      if (args['node-id'] === '') throw new OperationError('EINVAL', '--node-id must not be empty');
      if (!Number.isSafeInteger(args['max-volumes']) || args['max-volumes'] < 0) {
        throw new OperationError('EINVAL', '--max-volumes must be a whole number, 0 or more');
      }
      return true;
    })
    .example('$0 csi --pool /var/lib/clonebd/pool --endpoint unix:///csi/csi.sock', 'the driver of this node, all services') as Argv<CsiArgs>;
}

async function run(args: CsiArgs): Promise<void> {
  const logger = pino({ level: args['log-level'] });
  const driverName = args['driver-name'];
  const nodeId = args['node-id'];
  const topologyKey = topologyKeyOf(driverName);
  const admin =
    args.admin === undefined
      ? new AdminClient(adminSocketPath(args.pool))
      : new AdminClient({ ...parseListen(args.admin), token: readAdminToken(args['admin-token-file']) });
  const services = {
    Identity: createIdentityHandlers({ driverName, version: packageVersion(), admin, logger: logger.child({ service: 'identity' }) }),
    Controller: createControllerHandlers({ admin, driverName, nodeId, topologyKey, logger: logger.child({ service: 'controller' }) }),
    ...(args.admin === undefined
      ? {
          Node: createNodeHandlers({
            nodeId,
            topologyKey,
            maxVolumes: args['max-volumes'],
            nbdSocket: nbdSocketPath(args.pool),
            stateDir: args['state-dir'],
            logger: logger.child({ service: 'node' }),
          }),
        }
      : {}),
  };
  const driver = new CsiDriver({ logger, services });
  const socket = await driver.start(args.endpoint);
  const stopped = stopSignal(logger);
  logger.info({ endpoint: `unix://${socket}`, driverName, nodeId, services: Object.keys(services) }, 'listening');
  await stopped;
  await driver.close();
}

export const csiCommand: CommandModule<object, CsiArgs> = {
  command: 'csi',
  describe: 'Run the Kubernetes CSI driver of this node (identity, controller, node) over its daemon',
  builder,
  handler: run,
};
