/**
 * What one client, or all of them, may cost the server: connections, time, and memory.
 *
 * Connections beyond `maxConnections` (all listeners together) or `maxConnectionsPerAddress`
 * (one remote IP address; Unix socket clients have none) are closed before the greeting.
 * A connection still negotiating (TLS included) after `handshakeTimeoutMs` is dropped; one in
 * transmission with nothing in flight and no traffic for `idleTimeoutMs` is closed after a flush.
 * A timeout of 0 is off. After traffic the event loop polls rather than sleeps for
 * `busyPollUs` (see busy-poll.ts): CPU a client may cost to be answered sooner; 0 is off.
 */
import { MAX_PAYLOAD } from '../nbd/constants.js';
import { OperationError } from '../util/errors.js';

export interface SessionLimits {
  maxInFlightRequests: number;
  maxInFlightBytes: number;
  /** Largest WRITE or READ payload; advertised as the maximum block size. */
  maxPayload: number;
  /** Most descriptors one BLOCK_STATUS reply carries. */
  maxStatusDescriptors: number;
  handshakeTimeoutMs: number;
  idleTimeoutMs: number;
}

export interface ServerLimits extends SessionLimits {
  /** Option data larger than this is refused during the handshake. */
  maxOptionLength: number;
  maxConnections: number;
  maxConnectionsPerAddress: number;
  busyPollUs: number;
}

export const DEFAULT_LIMITS: ServerLimits = {
  maxInFlightRequests: 256,
  maxInFlightBytes: 64 * 1024 * 1024,
  maxPayload: MAX_PAYLOAD,
  maxStatusDescriptors: 1 << 16,
  maxOptionLength: 64 * 1024,
  maxConnections: 1024,
  maxConnectionsPerAddress: 256,
  handshakeTimeoutMs: 10_000,
  idleTimeoutMs: 0,
  busyPollUs: 200,
};

/** Inclusive bounds of each limit; messages name the CLI option a user would change. */
const BOUNDS: Readonly<Record<keyof ServerLimits, { min: number; max: number; option: string }>> = {
  maxInFlightRequests: { min: 1, max: 65_536, option: '--max-requests-in-flight' },
  maxInFlightBytes: { min: 64 * 1024, max: 2 ** 40, option: '--max-bytes-in-flight' },
  // The spec: at least the preferred block size (4096).
  maxPayload: { min: 4096, max: 256 * 1024 * 1024, option: '--max-request-size' },
  maxStatusDescriptors: { min: 1, max: 1 << 20, option: 'maxStatusDescriptors' },
  // Room for INFO/GO with the longest export name the spec allows (4096 bytes).
  maxOptionLength: { min: 8 * 1024, max: 64 * 1024 * 1024, option: '--max-option-size' },
  maxConnections: { min: 1, max: 1_000_000, option: '--max-connections' },
  maxConnectionsPerAddress: { min: 1, max: 1_000_000, option: '--max-connections-per-address' },
  handshakeTimeoutMs: { min: 0, max: 2 ** 31 - 1, option: '--handshake-timeout (in ms)' },
  idleTimeoutMs: { min: 0, max: 2 ** 31 - 1, option: '--idle-timeout (in ms)' },
  busyPollUs: { min: 0, max: 1_000_000, option: '--busy-poll (in µs)' },
};

/** The defaults overridden by `limits`; throws EINVAL naming the first value out of bounds. */
export function resolveLimits(limits: Partial<ServerLimits> = {}): ServerLimits {
  const resolved: ServerLimits = { ...DEFAULT_LIMITS };
  for (const key of Object.keys(BOUNDS) as (keyof ServerLimits)[]) {
    const value = limits[key];
    if (value === undefined) continue;
    const { min, max, option } = BOUNDS[key];
    if (!Number.isInteger(value) || value < min || value > max) {
      throw new OperationError('EINVAL', `${option} must be a whole number from ${min} to ${max}, not ${value}`);
    }
    resolved[key] = value;
  }
  return resolved;
}
