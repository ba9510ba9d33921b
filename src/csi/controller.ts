/**
 * The CSI Controller service over one node's clonebd daemon.
 *
 * Mapping. A CSI volume is a store volume, a CSI snapshot a store snapshot; volume_id and
 * snapshot_id are their store names (names.ts), which the node service uses as NBD export names.
 * CreateVolume from a volume is a store clone, from a snapshot a store clone of that snapshot
 * (a restore); both are O(1) and independent of their source, which may be deleted afterwards.
 * Clones and restores therefore live in the pool that holds their source, on this node, and every
 * volume reports this node as its only accessible topology.
 *
 * What each object remembers. The store keeps labels with every volume and snapshot; the driver
 * writes, at creation:
 *
 *   csi/driver      the driver name: only objects carrying ours are listed or deleted, so volumes
 *                   made by hand in the same pool are never touched
 *   csi/name        the CSI name, so a retried Create finds the object (names.ts)
 *   csi/parameters  SHA-256 of the request's parameters, so a retry with other parameters is told
 *                   apart without storing values of any length
 *   csi/source      `volume:ID` or `snapshot:ID` for a clone or restore: its content_source
 *
 * Idempotency. Creates of one (kind, name) run one at a time (KeyedLock), as do deletes and
 * expansions of one id; different names run in parallel (the store orders what touches one
 * source). A Create first looks for the object: found and compatible (same parameters and source,
 * a size inside the requested range) it is returned as it is; found and incompatible it is
 * ALREADY_EXISTS. A Delete of an id that names nothing of ours is OK.
 *
 * Sizes. Sizes are rounded up to 4 KiB within the requested range. A clone or restore is at least
 * its source: a larger request grows it, a smaller one (required_bytes, or a limit below the source)
 * is OUT_OF_RANGE. Volumes are thin, yet creation is refused (RESOURCE_EXHAUSTED) unless the pool's
 * free space covers the new bytes the volume may hold: its size when empty, the growth beyond its
 * source for a clone, and at least one block. That keeps CreateVolume consistent with GetCapacity,
 * which reports the same free space to the CO's scheduler.
 */
import { createHash } from 'node:crypto';
import { status } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { AdminClient } from '../control/admin-client.js';
import type { VolumeView } from '../control/admin-server.js';
import { isOperationError } from '../util/errors.js';
import { capabilitiesProblem, capabilityProblem, isObject, readCapabilities, readCapability } from './capabilities.js';
import { KeyedLock } from './keyed-lock.js';
import {
  csiNameProblem,
  decodePageToken,
  encodePageToken,
  isStoreName,
  storeNameCandidates,
  type ObjectKind,
} from './names.js';
import { CsiError, loggedHandlers, type CsiHandlers, type CsiMessage } from './rpc.js';

export type ControllerAdmin = Pick<
  AdminClient,
  'poolStatus' | 'listVolumes' | 'showVolume' | 'createVolume' | 'clone' | 'snapshot' | 'grow' | 'delete'
>;

export interface ControllerServiceOptions {
  admin: ControllerAdmin;
  driverName: string;
  nodeId: string;
  /** Topology segment key whose value is the node id. */
  topologyKey: string;
  logger: Logger;
}

export const CONTROLLER_CAPABILITIES = [
  'CREATE_DELETE_VOLUME',
  'CLONE_VOLUME',
  'CREATE_DELETE_SNAPSHOT',
  'LIST_VOLUMES',
  'LIST_SNAPSHOTS',
  'GET_CAPACITY',
  'EXPAND_VOLUME',
] as const;

export const LABEL_KEYS = {
  driver: 'csi/driver',
  name: 'csi/name',
  parameters: 'csi/parameters',
  source: 'csi/source',
} as const;

const ALLOCATION_UNIT = 4096;
export const DEFAULT_VOLUME_SIZE = 2 ** 30;
/** The store's largest volume. */
const MAX_VOLUME_SIZE = 2 ** 52;
/** A Create that loses a store name to a concurrent one looks again this many times. */
const CREATE_ATTEMPTS = 3;

const QUIET_RPCS = new Set(['ControllerGetCapabilities', 'GetCapacity', 'ListVolumes', 'ListSnapshots', 'ValidateVolumeCapabilities']);

interface CapacityRange {
  /** 0: not given. */
  required: number;
  /** 0: not given. */
  limit: number;
}

type ContentSource = { kind: 'volume'; id: string } | { kind: 'snapshot'; id: string };

function invalid(message: string): CsiError {
  return new CsiError(status.INVALID_ARGUMENT, message);
}

function outOfRange(message: string): CsiError {
  return new CsiError(status.OUT_OF_RANGE, message);
}

function requireString(request: CsiMessage, field: string): string {
  const value = request[field];
  if (typeof value !== 'string' || value === '') throw invalid(`${field} is required`);
  return value;
}

function requireName(request: CsiMessage): string {
  const name = requireString(request, 'name');
  const problem = csiNameProblem(name);
  if (problem !== undefined) throw invalid(`name ${problem}`);
  return name;
}

function stringMap(value: unknown, field: string): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (!isObject(value) || !Object.values(value).every((entry) => typeof entry === 'string')) {
    throw invalid(`${field} must map strings to strings`);
  }
  return value as Record<string, string>;
}

function parametersDigest(parameters: Record<string, string>): string {
  const entries = Object.entries(parameters).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return createHash('sha256').update(JSON.stringify(entries), 'utf8').digest('hex');
}

function bytesField(range: Record<string, unknown>, field: string): number {
  const value = range[field] ?? 0;
  if (typeof value !== 'number' || !Number.isInteger(value)) throw invalid(`capacity_range.${field} must be a whole number`);
  if (value < 0) throw invalid(`capacity_range.${field} must not be negative`);
  if (value > MAX_VOLUME_SIZE) throw outOfRange(`capacity_range.${field} is over the largest volume, ${MAX_VOLUME_SIZE} bytes`);
  return value;
}

function readCapacityRange(value: unknown): CapacityRange {
  if (value === undefined || value === null) return { required: 0, limit: 0 };
  if (!isObject(value)) throw invalid('capacity_range must be a CapacityRange');
  const range = { required: bytesField(value, 'required_bytes'), limit: bytesField(value, 'limit_bytes') };
  if (range.limit > 0 && range.required > range.limit) {
    throw outOfRange(`capacity_range: required_bytes ${range.required} is over limit_bytes ${range.limit}`);
  }
  return range;
}

function roundUp(bytes: number): number {
  return Math.ceil(bytes / ALLOCATION_UNIT) * ALLOCATION_UNIT;
}

/** The size to give a new volume (no source) or a clone of a source of `sourceSize` bytes. */
function sizeFor(range: CapacityRange, sourceSize?: number): number {
  const ceiling = range.limit > 0 ? range.limit : Infinity;
  if (sourceSize === undefined) {
    return Math.min(range.required > 0 ? roundUp(range.required) : DEFAULT_VOLUME_SIZE, ceiling);
  }
  if (range.required > 0 && roundUp(range.required) < sourceSize) {
    throw outOfRange(`required_bytes ${range.required} is smaller than the source, ${sourceSize} bytes`);
  }
  if (ceiling < sourceSize) throw outOfRange(`limit_bytes ${range.limit} is smaller than the source, ${sourceSize} bytes`);
  return Math.max(sourceSize, Math.min(roundUp(range.required), ceiling));
}

function fitsRange(size: number, range: CapacityRange): boolean {
  return size >= range.required && (range.limit === 0 || size <= range.limit);
}

function readContentSource(value: unknown): ContentSource | undefined {
  if (value === undefined || value === null) return undefined;
  if (!isObject(value)) throw invalid('volume_content_source must be a VolumeContentSource');
  if (value.type === 'volume' && isObject(value.volume)) {
    const id = value.volume.volume_id;
    if (typeof id !== 'string' || id === '') throw invalid('volume_content_source.volume.volume_id is required');
    return { kind: 'volume', id };
  }
  if (value.type === 'snapshot' && isObject(value.snapshot)) {
    const id = value.snapshot.snapshot_id;
    if (typeof id !== 'string' || id === '') throw invalid('volume_content_source.snapshot.snapshot_id is required');
    return { kind: 'snapshot', id };
  }
  throw invalid('volume_content_source needs a volume or a snapshot');
}

function sourceLabel(source: ContentSource | undefined): string {
  return source === undefined ? '' : `${source.kind}:${source.id}`;
}

function contentSourceMessage(label: string | undefined): CsiMessage | undefined {
  if (label === undefined || label === '') return undefined;
  const colon = label.indexOf(':');
  const kind = label.slice(0, colon);
  const id = label.slice(colon + 1);
  if (kind === 'volume') return { volume: { volume_id: id } };
  if (kind === 'snapshot') return { snapshot: { snapshot_id: id } };
  return undefined;
}

function timestamp(iso: string): CsiMessage {
  const ms = Date.parse(iso);
  if (Number.isNaN(ms)) return { seconds: 0, nanos: 0 };
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 };
}

function maxEntries(request: CsiMessage): number {
  const value = request.max_entries ?? 0;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) throw invalid('max_entries must not be negative');
  return value;
}

/** The name a listing starts at ('' for the first page); ABORTED for a token we did not make. */
function pageStart(request: CsiMessage): string {
  const token = request.starting_token ?? '';
  if (typeof token !== 'string') throw invalid('starting_token must be a string');
  if (token === '') return '';
  const start = decodePageToken(token);
  if (start === undefined) throw new CsiError(status.ABORTED, 'starting_token is not one this driver gave out; list again from the start');
  return start;
}

/** One page of `views` (sorted by name) starting at `start`, and the token of the next page. */
function page(views: readonly VolumeView[], start: string, max: number): { views: VolumeView[]; nextToken: string } {
  const first = views.findIndex((view) => view.name >= start);
  if (first < 0) return { views: [], nextToken: '' };
  const end = max > 0 ? first + max : views.length;
  const next = views[end];
  return { views: views.slice(first, end), nextToken: next === undefined ? '' : encodePageToken(next.name) };
}

function byName(a: VolumeView, b: VolumeView): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

class ControllerService {
  readonly #options: ControllerServiceOptions;
  readonly #admin: ControllerAdmin;
  readonly #segments: Record<string, string>;
  readonly #locks = new KeyedLock();

  constructor(options: ControllerServiceOptions) {
    this.#options = options;
    this.#admin = options.admin;
    this.#segments = { [options.topologyKey]: options.nodeId };
  }

  handlers(): CsiHandlers {
    return loggedHandlers(
      this.#options.logger,
      {
        ControllerGetCapabilities: async () => ({ capabilities: CONTROLLER_CAPABILITIES.map((type) => ({ rpc: { type } })) }),
        CreateVolume: (request) => this.#createVolume(request),
        DeleteVolume: (request) => this.#delete(request, 'volume', 'volume_id'),
        ValidateVolumeCapabilities: (request) => this.#validate(request),
        ListVolumes: (request) => this.#listVolumes(request),
        GetCapacity: (request) => this.#capacity(request),
        CreateSnapshot: (request) => this.#createSnapshot(request),
        DeleteSnapshot: (request) => this.#delete(request, 'snapshot', 'snapshot_id'),
        ListSnapshots: (request) => this.#listSnapshots(request),
        ControllerExpandVolume: (request) => this.#expand(request),
      },
      QUIET_RPCS,
    );
  }

  // ---- volumes

  async #createVolume(request: CsiMessage): Promise<CsiMessage> {
    const name = requireName(request);
    const capabilities = readCapabilities(request.volume_capabilities, 'volume_capabilities');
    const problem = capabilitiesProblem(capabilities);
    if (problem !== undefined) throw invalid(problem);
    const range = readCapacityRange(request.capacity_range);
    const parameters = stringMap(request.parameters, 'parameters');
    if (Object.keys(stringMap(request.mutable_parameters, 'mutable_parameters')).length > 0) {
      throw invalid('mutable_parameters are not supported');
    }
    const source = readContentSource(request.volume_content_source);
    if (!this.#reachable(request.accessibility_requirements)) {
      throw new CsiError(
        status.RESOURCE_EXHAUSTED,
        `volumes of this driver are accessible from node ${this.#options.nodeId} only, which the requisite topology excludes`,
      );
    }
    const labels = {
      [LABEL_KEYS.driver]: this.#options.driverName,
      [LABEL_KEYS.name]: name,
      [LABEL_KEYS.parameters]: parametersDigest(parameters),
      ...(source === undefined ? {} : { [LABEL_KEYS.source]: sourceLabel(source) }),
    };

    return this.#locks.run(`volume-name:${name}`, async () => {
      for (let attempt = 1; ; attempt++) {
        const found = await this.#find('volume', name);
        if (found.existing !== undefined) {
          const existing = found.existing;
          const differences = [
            existing.labels[LABEL_KEYS.parameters] !== labels[LABEL_KEYS.parameters] ? 'parameters' : undefined,
            (existing.labels[LABEL_KEYS.source] ?? '') !== sourceLabel(source) ? 'content source' : undefined,
            fitsRange(existing.size, range) ? undefined : `size (${existing.size} bytes)`,
          ].filter((entry) => entry !== undefined);
          if (differences.length > 0) {
            throw new CsiError(status.ALREADY_EXISTS, `volume ${JSON.stringify(name)} exists with another ${differences.join(', ')}`);
          }
          return { volume: this.#volumeMessage(existing) };
        }
        if (found.free === undefined) {
          throw new CsiError(status.ALREADY_EXISTS, `the store names for volume ${JSON.stringify(name)} are held by objects this driver did not make`);
        }
        try {
          const view = await this.#makeVolume(found.free, range, source, labels);
          return { volume: this.#volumeMessage(view) };
        } catch (error) {
          // Another Create (of a snapshot, or by hand) took the store name since we looked.
          if (!isOperationError(error, 'EEXIST') || attempt >= CREATE_ATTEMPTS) throw error;
        }
      }
    });
  }

  async #makeVolume(storeName: string, range: CapacityRange, source: ContentSource | undefined, labels: Record<string, string>): Promise<VolumeView> {
    if (source === undefined) {
      const size = sizeFor(range);
      await this.#admit(size);
      return this.#admin.createVolume(storeName, size, labels);
    }
    const origin = await this.#sourceView(source);
    const size = sizeFor(range, origin.size);
    await this.#admit(size - origin.size);
    return this.#admin.clone(origin.name, storeName, size, labels);
  }

  /** The source volume or snapshot; NOT_FOUND unless it exists here and is of the kind named. */
  async #sourceView(source: ContentSource): Promise<VolumeView> {
    const view = isStoreName(source.id) ? await this.#show(source.id) : undefined;
    if (view === undefined || view.kind !== source.kind) {
      throw new CsiError(status.NOT_FOUND, `source ${source.kind} ${JSON.stringify(source.id)} does not exist on node ${this.#options.nodeId}`);
    }
    return view;
  }

  /** RESOURCE_EXHAUSTED unless the pool has `bytes` (and at least one block) free. */
  async #admit(bytes: number): Promise<void> {
    const needed = Math.max(bytes, ALLOCATION_UNIT);
    const { freeBytes } = await this.#admin.poolStatus();
    if (freeBytes < needed) {
      throw new CsiError(status.RESOURCE_EXHAUSTED, `the pool has ${freeBytes} bytes free, ${needed} needed`);
    }
  }

  async #validate(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = requireString(request, 'volume_id');
    const capabilities = readCapabilities(request.volume_capabilities, 'volume_capabilities');
    const parameters = stringMap(request.parameters, 'parameters');
    const volumeContext = stringMap(request.volume_context, 'volume_context');
    const view = await this.#existingVolume(volumeId);
    if (view === undefined) throw new CsiError(status.NOT_FOUND, `no volume ${JSON.stringify(volumeId)}`);
    const problem = capabilitiesProblem(capabilities);
    if (problem !== undefined) return { message: problem };
    if (Object.keys(parameters).length > 0 && view.labels[LABEL_KEYS.parameters] !== parametersDigest(parameters)) {
      return { message: 'the volume was created with other parameters' };
    }
    return {
      confirmed: {
        volume_context: volumeContext,
        volume_capabilities: request.volume_capabilities,
        parameters,
        mutable_parameters: {},
      },
    };
  }

  async #listVolumes(request: CsiMessage): Promise<CsiMessage> {
    const max = maxEntries(request);
    const start = pageStart(request);
    const views = (await this.#admin.listVolumes()).filter((view) => view.kind === 'volume' && this.#isOurs(view)).sort(byName);
    const result = page(views, start, max);
    return { entries: result.views.map((view) => ({ volume: this.#volumeMessage(view) })), next_token: result.nextToken };
  }

  async #capacity(request: CsiMessage): Promise<CsiMessage> {
    const capabilities = Array.isArray(request.volume_capabilities)
      ? request.volume_capabilities.map((entry, index) => readCapability(entry, `volume_capabilities[${index}]`))
      : [];
    stringMap(request.parameters, 'parameters');
    const topology = request.accessible_topology;
    const here = !isObject(topology) || this.#matches(topology);
    if (!here || capabilities.some((capability) => capabilityProblem(capability) !== undefined)) {
      return { available_capacity: 0 };
    }
    const { freeBytes, largestVolumeBytes } = await this.#admin.poolStatus();
    const available = Math.max(0, freeBytes);
    return { available_capacity: available, maximum_volume_size: { value: Math.min(available, largestVolumeBytes) } };
  }

  async #expand(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = requireString(request, 'volume_id');
    if (!isObject(request.capacity_range)) throw invalid('capacity_range is required');
    const range = readCapacityRange(request.capacity_range);
    if (range.required === 0 && range.limit === 0) throw invalid('capacity_range needs required_bytes or limit_bytes');
    const capability = isObject(request.volume_capability) ? readCapability(request.volume_capability, 'volume_capability') : undefined;
    if (capability !== undefined) {
      const problem = capabilityProblem(capability);
      if (problem !== undefined) throw invalid(problem);
    }
    // A block volume is its device; a file system on it has to be grown by the node.
    const nodeExpansionRequired = capability?.accessType !== 'block';
    return this.#locks.run(`id:${volumeId}`, async () => {
      const view = isStoreName(volumeId) ? await this.#show(volumeId) : undefined;
      if (view === undefined || view.kind !== 'volume') throw new CsiError(status.NOT_FOUND, `no volume ${JSON.stringify(volumeId)}`);
      const target = Math.max(view.size, Math.min(roundUp(range.required), range.limit > 0 ? range.limit : Infinity));
      if (range.limit > 0 && target > range.limit) {
        throw outOfRange(`the volume is ${view.size} bytes, over limit_bytes ${range.limit}; volumes do not shrink`);
      }
      if (target === view.size) return { capacity_bytes: view.size, node_expansion_required: nodeExpansionRequired };
      await this.#admit(target - view.size);
      const grown = await this.#admin.grow(volumeId, target);
      return { capacity_bytes: grown.size, node_expansion_required: nodeExpansionRequired };
    });
  }

  // ---- snapshots

  async #createSnapshot(request: CsiMessage): Promise<CsiMessage> {
    const sourceId = requireString(request, 'source_volume_id');
    const name = requireName(request);
    const parameters = stringMap(request.parameters, 'parameters');
    const labels = {
      [LABEL_KEYS.driver]: this.#options.driverName,
      [LABEL_KEYS.name]: name,
      [LABEL_KEYS.parameters]: parametersDigest(parameters),
    };
    return this.#locks.run(`snapshot-name:${name}`, async () => {
      for (let attempt = 1; ; attempt++) {
        const found = await this.#find('snapshot', name);
        if (found.existing !== undefined) {
          const existing = found.existing;
          if (existing.parent !== sourceId) {
            throw new CsiError(status.ALREADY_EXISTS, `snapshot ${JSON.stringify(name)} exists, of another volume (${existing.parent ?? 'none'})`);
          }
          if (existing.labels[LABEL_KEYS.parameters] !== labels[LABEL_KEYS.parameters]) {
            throw new CsiError(status.ALREADY_EXISTS, `snapshot ${JSON.stringify(name)} exists with other parameters`);
          }
          return { snapshot: this.#snapshotMessage(existing) };
        }
        if (found.free === undefined) {
          throw new CsiError(status.ALREADY_EXISTS, `the store names for snapshot ${JSON.stringify(name)} are held by objects this driver did not make`);
        }
        const source = await this.#sourceView({ kind: 'volume', id: sourceId });
        try {
          return { snapshot: this.#snapshotMessage(await this.#admin.snapshot(source.name, found.free, labels)) };
        } catch (error) {
          if (!isOperationError(error, 'EEXIST') || attempt >= CREATE_ATTEMPTS) throw error;
        }
      }
    });
  }

  async #listSnapshots(request: CsiMessage): Promise<CsiMessage> {
    const max = maxEntries(request);
    const start = pageStart(request);
    const snapshotId = typeof request.snapshot_id === 'string' ? request.snapshot_id : '';
    const sourceId = typeof request.source_volume_id === 'string' ? request.source_volume_id : '';
    let views: VolumeView[];
    if (snapshotId !== '') {
      // An explicit id finds any snapshot of the pool, so one made by hand can be imported.
      const view = isStoreName(snapshotId) ? await this.#show(snapshotId) : undefined;
      views = view === undefined || view.kind !== 'snapshot' ? [] : [view];
    } else {
      views = (await this.#admin.listVolumes()).filter((view) => view.kind === 'snapshot' && this.#isOurs(view)).sort(byName);
    }
    if (sourceId !== '') views = views.filter((view) => view.parent === sourceId);
    const result = page(views, start, max);
    return { entries: result.views.map((view) => ({ snapshot: this.#snapshotMessage(view) })), next_token: result.nextToken };
  }

  // ---- both

  /** Deletes one of our volumes or snapshots; OK when the id names nothing of ours. */
  async #delete(request: CsiMessage, kind: ObjectKind, field: string): Promise<CsiMessage> {
    const id = requireString(request, field);
    if (!isStoreName(id)) return {};
    return this.#locks.run(`id:${id}`, async () => {
      const view = await this.#show(id);
      if (view === undefined || view.kind !== kind) return {};
      if (!this.#isOurs(view)) {
        this.#options.logger.warn({ [field]: id }, `${kind} was not made by this driver: left in place`);
        return {};
      }
      try {
        await this.#admin.delete(id);
      } catch (error) {
        if (isOperationError(error, 'ENOENT')) return {};
        if (isOperationError(error, 'EBUSY')) throw new CsiError(status.FAILED_PRECONDITION, `${kind} ${id} is in use: ${error.message}`);
        throw error;
      }
      return {};
    });
  }

  /** The object of (kind, name) if it exists, else the first store name free for it. */
  async #find(kind: ObjectKind, name: string): Promise<{ existing?: VolumeView; free?: string }> {
    let free: string | undefined;
    for (const candidate of storeNameCandidates(kind, name)) {
      const view = await this.#show(candidate);
      if (view === undefined) free ??= candidate;
      else if (view.kind === kind && this.#isOurs(view) && view.labels[LABEL_KEYS.name] === name) return { existing: view };
    }
    return free === undefined ? {} : { free };
  }

  async #show(storeName: string): Promise<VolumeView | undefined> {
    try {
      return await this.#admin.showVolume(storeName);
    } catch (error) {
      if (isOperationError(error, 'ENOENT')) return undefined;
      throw error;
    }
  }

  async #existingVolume(volumeId: string): Promise<VolumeView | undefined> {
    const view = isStoreName(volumeId) ? await this.#show(volumeId) : undefined;
    return view?.kind === 'volume' ? view : undefined;
  }

  #isOurs(view: VolumeView): boolean {
    return view.labels[LABEL_KEYS.driver] === this.#options.driverName;
  }

  #matches(topology: Record<string, unknown>): boolean {
    const segments = isObject(topology.segments) ? topology.segments : {};
    return Object.entries(segments).every(([key, value]) => this.#segments[key] === value);
  }

  /** Whether a volume on this node satisfies the requisite topologies (any, when none are given). */
  #reachable(requirements: unknown): boolean {
    if (!isObject(requirements) || !Array.isArray(requirements.requisite) || requirements.requisite.length === 0) return true;
    return requirements.requisite.some((topology) => isObject(topology) && this.#matches(topology));
  }

  #volumeMessage(view: VolumeView): CsiMessage {
    return {
      capacity_bytes: view.size,
      volume_id: view.name,
      volume_context: {},
      content_source: contentSourceMessage(view.labels[LABEL_KEYS.source]),
      accessible_topology: [{ segments: this.#segments }],
    };
  }

  #snapshotMessage(view: VolumeView): CsiMessage {
    return {
      size_bytes: view.size,
      snapshot_id: view.name,
      source_volume_id: view.parent ?? '',
      creation_time: timestamp(view.createdAt),
      // A store snapshot is complete when it exists: nothing is copied.
      ready_to_use: true,
    };
  }
}

export function createControllerHandlers(options: ControllerServiceOptions): CsiHandlers {
  return new ControllerService(options).handlers();
}
