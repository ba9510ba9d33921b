/**
 * The CSI Identity service: the driver's name and version, what it offers, and whether it can
 * work. Probe is ready when the node's daemon answers; a daemon that is down or starting makes
 * Probe answer ready=false (the spec's "still initializing"), not an error, so a liveness probe
 * does not restart a driver that could not help it.
 */
import type { Logger } from 'pino';
import type { AdminClient } from '../control/admin-client.js';
import { isOperationError } from '../util/errors.js';
import { loggedHandlers, type CsiHandlers } from './rpc.js';

export interface IdentityServiceOptions {
  driverName: string;
  version: string;
  admin: Pick<AdminClient, 'poolStatus'>;
  logger: Logger;
}

const QUIET_RPCS = new Set(['GetPluginInfo', 'GetPluginCapabilities', 'Probe']);

export function createIdentityHandlers(options: IdentityServiceOptions): CsiHandlers {
  return loggedHandlers(
    options.logger,
    {
      GetPluginInfo: async () => ({ name: options.driverName, vendor_version: options.version, manifest: {} }),
      GetPluginCapabilities: async () => ({
        capabilities: [
          { service: { type: 'CONTROLLER_SERVICE' } },
          { service: { type: 'VOLUME_ACCESSIBILITY_CONSTRAINTS' } },
          { volume_expansion: { type: 'ONLINE' } },
        ],
      }),
      Probe: async () => {
        try {
          await options.admin.poolStatus();
          return { ready: { value: true } };
        } catch (error) {
          if (!isOperationError(error, 'ENOTCONN') && !isOperationError(error, 'ESHUTDOWN')) throw error;
          options.logger.warn({ reason: error.message }, 'not ready: the daemon does not answer');
          return { ready: { value: false } };
        }
      },
    },
    QUIET_RPCS,
  );
}
