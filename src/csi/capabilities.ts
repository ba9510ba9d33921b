/**
 * Volume capabilities as the controller checks them.
 *
 * A clonebd volume lives in the pool of one node and is attached through that node's daemon
 * (its pool's NBD socket), so it can be used on one node at a time: the single-node access modes
 * are supported, every MULTI_NODE_* mode is not. Both access types are: a block volume is the
 * attached device itself, a mount volume carries one of the file systems the node service makes.
 *
 * A capability that is malformed (no access mode, no access type) is the caller's error and
 * INVALID_ARGUMENT everywhere; one that is well formed but unsupported is INVALID_ARGUMENT for
 * CreateVolume and a plain "not confirmed" for ValidateVolumeCapabilities.
 */
import { status } from '@grpc/grpc-js';
import { FS_TYPES } from './node-state.js';
import { CsiError } from './rpc.js';

export const SUPPORTED_ACCESS_MODES = [
  'SINGLE_NODE_WRITER',
  'SINGLE_NODE_READER_ONLY',
  'SINGLE_NODE_SINGLE_WRITER',
  'SINGLE_NODE_MULTI_WRITER',
] as const;

export interface VolumeCapability {
  accessType: 'mount' | 'block';
  /** The mode's name as decoded (an unknown number stays a number). */
  accessMode: string | number;
  /** Empty when the CO leaves the choice to the node. */
  fsType: string;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function invalid(message: string): CsiError {
  return new CsiError(status.INVALID_ARGUMENT, message);
}

/** Reads one decoded VolumeCapability; INVALID_ARGUMENT when a required part is missing. */
export function readCapability(value: unknown, field: string): VolumeCapability {
  if (!isObject(value)) throw invalid(`${field} is required`);
  const accessMode = isObject(value.access_mode) ? value.access_mode.mode : undefined;
  if ((typeof accessMode !== 'string' && typeof accessMode !== 'number') || accessMode === 'UNKNOWN' || accessMode === 0) {
    throw invalid(`${field}.access_mode is required`);
  }
  // Decoded with oneofs, access_type names the member that is set.
  if (value.access_type === 'block' && isObject(value.block)) return { accessType: 'block', accessMode, fsType: '' };
  if (value.access_type === 'mount' && isObject(value.mount)) {
    const fsType = value.mount.fs_type;
    return { accessType: 'mount', accessMode, fsType: typeof fsType === 'string' ? fsType : '' };
  }
  throw invalid(`${field} needs an access type, mount or block`);
}

/** Reads a repeated VolumeCapability field that must not be empty. */
export function readCapabilities(value: unknown, field: string): VolumeCapability[] {
  if (!Array.isArray(value) || value.length === 0) throw invalid(`${field} is required`);
  return value.map((entry, index) => readCapability(entry, `${field}[${index}]`));
}

/** Why clonebd cannot provide a capability, or undefined when it can. */
export function capabilityProblem(capability: VolumeCapability): string | undefined {
  if (!(SUPPORTED_ACCESS_MODES as readonly unknown[]).includes(capability.accessMode)) {
    return `access mode ${String(capability.accessMode)} is not supported: a clonebd volume is attached on one node at a time (${SUPPORTED_ACCESS_MODES.join(', ')})`;
  }
  if (capability.accessType === 'mount' && capability.fsType !== '' && !(FS_TYPES as readonly string[]).includes(capability.fsType)) {
    return `fs_type ${JSON.stringify(capability.fsType)} is not supported (${FS_TYPES.join(', ')})`;
  }
  return undefined;
}

/** The first problem among several capabilities, or undefined when all are supported. */
export function capabilitiesProblem(capabilities: readonly VolumeCapability[]): string | undefined {
  for (const capability of capabilities) {
    const problem = capabilityProblem(capability);
    if (problem !== undefined) return problem;
  }
  return undefined;
}
