/**
 * The CSI Node service: makes a clonebd volume usable on this node.
 *
 *   NodeStageVolume      attach the export as a block device (node-attach.ts); for a filesystem
 *                        volume, create the filesystem if the device is blank, mount it at the
 *                        staging path
 *   NodePublishVolume    bind-mount the staged filesystem on the target directory, or the device
 *                        on the target file (block volumes); read-only on request
 *   NodeUnpublishVolume  undo one publication
 *   NodeUnstageVolume    unmount, detach, forget
 *   NodeExpandVolume     grow the filesystem once the device has the volume's new size
 *   NodeGetVolumeStats   statfs of a filesystem volume, size of a block volume
 *
 * State. Each staged volume has a record in the state directory (node-state.ts), written before
 * each step that creates something, so that a restarted driver can undo what an earlier one did.
 * The record says what may exist; the system (mount table, loop devices, /proc) says what does.
 * A repeated call therefore looks at both: NodeStageVolume on a volume whose record is intact
 * answers at once, one whose record is stale (the node rebooted, a stage was cut short) is torn
 * down and staged afresh.
 *
 * Concurrency. Calls for one volume run one at a time (KeyedLock per volume id); calls for
 * different volumes run in parallel. Nothing here keeps other state in memory.
 *
 * Expansion. NodeExpandVolume first makes sure the daemon's volume has the size asked for
 * (growing it through the admin socket beside the NBD socket, so expansion also works with no
 * controller EXPAND_VOLUME, which the multi-node deployment needs). Then the device follows:
 * - user space (`clonebd attach-file` + loop device): ONLINE, staged and published alike. The file
 *   server re-reads the export's size on SIGHUP, `losetup -c` grows the loop device (and any
 *   read-only loop device of a block publication over it), and the filesystem grows mounted:
 *   xfs_growfs on the mount point, resize2fs on the device for ext4 (which needs CAP_SYS_RESOURCE;
 *   a driver without it grows an unpublished ext4 offline and answers FAILED_PRECONDITION for a
 *   published one). A block volume is done once its device has grown.
 * - kernel nbd (and attachments made by nbdfuse in earlier versions): the device keeps the size it
 *   was attached with (the kernel learns a new one only through the NBD_SET_SIZE ioctl, which Node
 *   cannot issue without native code). A staged, unpublished volume is re-attached and its
 *   filesystem grown; a published one fails with FAILED_PRECONDITION, the spec's code for a
 *   volume that cannot be expanded while published.
 * NodeStageVolume also grows a filesystem smaller than its device (a clone made larger than its
 * source), so a volume expanded while unused comes up at its new size.
 *
 * Input. Everything a caller sends is checked at the edge: required fields, absolute paths without
 * NUL, volume ids by the daemon's naming rule (so an id can name no path of its own). Commands run
 * as argument vectors, never through a shell.
 */
import { mkdir, open, readFile, rmdir, stat, unlink } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { status } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { AdminClient } from '../control/admin-client.js';
import {
  attachLoop,
  attachmentIntact,
  attachKernelNbd,
  attachReadonlyLoop,
  currentBootId,
  detach,
  detachLoopIfBackedBy,
  detachLoopsBackedBy,
  fileAttachmentPaths,
  growFileAttachment,
  kernelNbdDevices,
  refreshLoopIfBackedBy,
  startFileServer,
} from './node-attach.js';
import {
  bindMount,
  blockDeviceSize,
  ext4CanGrow,
  filesystemUsage,
  growExt4Offline,
  growMounted,
  makeFilesystem,
  mountFilesystem,
  mountsAt,
  probeDevice,
  unmountAll,
} from './node-mount.js';
import { isObject, readCapability } from './capabilities.js';
import { KeyedLock } from './keyed-lock.js';
import { FS_TYPES, isValidVolumeId, StateStore, type FileAttachment, type FsType, type VolumeRecord } from './node-state.js';
import { CsiError, loggedHandlers, type CsiHandlers, type CsiMessage } from './rpc.js';

export interface NodeServiceOptions {
  nodeId: string;
  topologyKey: string;
  maxVolumes: number;
  /** The daemon's POOL/nbd.sock: the export name is the volume_id. */
  nbdSocket: string;
  stateDir: string;
  logger: Logger;
}

const DEFAULT_FS_TYPE: FsType = 'ext4';

const NODE_CAPABILITIES = ['STAGE_UNSTAGE_VOLUME', 'EXPAND_VOLUME', 'GET_VOLUME_STATS'] as const;

// The kubelet polls these; the calls that change the node are logged at info.
const QUIET_RPCS = new Set(['NodeGetCapabilities', 'NodeGetInfo', 'NodeGetVolumeStats']);

interface Capability {
  accessType: 'mount' | 'block';
  fsType?: FsType;
  mountFlags: string[];
}

function invalid(message: string): CsiError {
  return new CsiError(status.INVALID_ARGUMENT, message);
}

function requireString(request: CsiMessage, field: string): string {
  const value = request[field];
  if (typeof value !== 'string' || value === '') throw invalid(`${field} is required`);
  return value;
}

/** An absolute path without NUL, normalised (no `.`, `..` or doubled slashes). */
function requirePath(request: CsiMessage, field: string): string {
  const value = requireString(request, field);
  if (value.includes('\0')) throw invalid(`${field} contains NUL`);
  if (!isAbsolute(value)) throw invalid(`${field} must be an absolute path`);
  return resolve(value);
}

function parseCapability(value: unknown): Capability {
  const capability = readCapability(value, 'volume_capability');
  if (capability.accessType === 'block') return { accessType: 'block', mountFlags: [] };
  const fsType = capability.fsType === '' ? DEFAULT_FS_TYPE : capability.fsType;
  if (!(FS_TYPES as readonly string[]).includes(fsType)) {
    throw invalid(`fs_type ${JSON.stringify(fsType)} is not supported (${FS_TYPES.join(', ')})`);
  }
  const flags = isObject(value) && isObject(value.mount) ? (value.mount.mount_flags ?? []) : [];
  if (!Array.isArray(flags) || !flags.every((flag): flag is string => typeof flag === 'string' && flag !== '' && !flag.includes('\0'))) {
    throw invalid('mount_flags must be non-empty strings without NUL');
  }
  return { accessType: 'mount', fsType: fsType as FsType, mountFlags: flags };
}

/** A volume id that cannot be a clonebd export: nothing of it can be staged or published here. */
function knownVolumeId(request: CsiMessage): string | undefined {
  const volumeId = requireString(request, 'volume_id');
  return isValidVolumeId(volumeId) ? volumeId : undefined;
}

/** `major:minor` of a device node, as /proc/self/mountinfo shows it. */
async function deviceNumber(device: string): Promise<string> {
  const info = await stat(device, { bigint: true });
  const dev = info.rdev;
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** capability(7) number of CAP_SYS_RESOURCE. */
const CAP_SYS_RESOURCE = 24;

/** Whether this process holds capability `bit` in its effective set (/proc/self/status, CapEff). */
async function hasCapability(bit: number): Promise<boolean> {
  const text = await readFile('/proc/self/status', 'utf8');
  const mask = /^CapEff:\s*([0-9a-f]+)$/m.exec(text)?.[1];
  return mask !== undefined && ((BigInt(`0x${mask}`) >> BigInt(bit)) & 1n) === 1n;
}

async function pathExists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

class NodeService {
  readonly #options: NodeServiceOptions;
  readonly #store: StateStore;
  readonly #admin: AdminClient;
  readonly #locks = new KeyedLock();
  #ready: Promise<void> | undefined;

  constructor(options: NodeServiceOptions) {
    this.#options = options;
    this.#store = new StateStore(options.stateDir);
    // The daemon keeps its admin socket beside its NBD socket, in the pool directory.
    this.#admin = new AdminClient(join(dirname(options.nbdSocket), 'admin.sock'));
  }

  /** The volume's size as the daemon has it; NOT_FOUND for a name that is no volume. */
  async #volumeSize(volumeId: string): Promise<number> {
    const view = await this.#admin.showVolume(volumeId);
    if (view.kind !== 'volume') throw new CsiError(status.NOT_FOUND, `${volumeId} is a ${view.kind}, not a volume`);
    return view.size;
  }

  handlers(): CsiHandlers {
    return loggedHandlers(
      this.#options.logger,
      {
        NodeGetCapabilities: async () => ({ capabilities: NODE_CAPABILITIES.map((type) => ({ rpc: { type } })) }),
        NodeGetInfo: async () => ({
          node_id: this.#options.nodeId,
          max_volumes_per_node: this.#options.maxVolumes,
          accessible_topology: { segments: { [this.#options.topologyKey]: this.#options.nodeId } },
        }),
        NodeStageVolume: (request) => this.#stage(request),
        NodeUnstageVolume: (request) => this.#unstage(request),
        NodePublishVolume: (request) => this.#publish(request),
        NodeUnpublishVolume: (request) => this.#unpublish(request),
        NodeGetVolumeStats: (request) => this.#stats(request),
        NodeExpandVolume: (request) => this.#expand(request),
      },
      QUIET_RPCS,
    );
  }

  /** Creates the state directories once; a failure is tried again on the next call. */
  #init(): Promise<void> {
    this.#ready ??= this.#store.init().catch((error: unknown) => {
      this.#ready = undefined;
      throw error;
    });
    return this.#ready;
  }

  async #locked<T>(volumeId: string, work: () => Promise<T>): Promise<T> {
    await this.#init();
    return this.#locks.run(volumeId, work);
  }

  // ---- stage / unstage

  async #stage(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = knownVolumeId(request);
    const stagingPath = requirePath(request, 'staging_target_path');
    const capability = parseCapability(request.volume_capability);
    if (volumeId === undefined) throw new CsiError(status.NOT_FOUND, `no volume ${JSON.stringify(request.volume_id)}`);
    return this.#locked(volumeId, async () => {
      const existing = await this.#store.read(volumeId);
      if (existing !== undefined) {
        if (await this.#stagedIntact(existing)) {
          if (existing.stagingTargetPath !== stagingPath) {
            throw new CsiError(status.ALREADY_EXISTS, `${volumeId} is staged at ${existing.stagingTargetPath}`);
          }
          if (existing.accessType !== capability.accessType || existing.fsType !== capability.fsType) {
            throw new CsiError(status.ALREADY_EXISTS, `${volumeId} is staged with another volume capability`);
          }
          return {};
        }
        this.#options.logger.warn({ volumeId }, 'stale stage record: tearing down what is left before staging again');
        await this.#teardown(existing);
      }
      const size = await this.#volumeSize(volumeId);
      const record: VolumeRecord = {
        version: 1,
        volumeId,
        stagingTargetPath: stagingPath,
        accessType: capability.accessType,
        fsType: capability.fsType,
        mountFlags: capability.mountFlags,
        attachment: { kind: 'fuse', bootId: await currentBootId(), ...fileAttachmentPaths(this.#store, volumeId) },
        publications: {},
      };
      try {
        await this.#attach(record, size);
        if (record.accessType === 'mount') await this.#mountStaged(record);
      } catch (error) {
        await this.#teardown(record).catch((cleanup: unknown) =>
          this.#options.logger.error({ volumeId, err: cleanup }, 'could not undo a failed stage'),
        );
        throw error;
      }
      return {};
    });
  }

  /** Attaches the export, recording each step before it is taken; sets `record.device`. */
  async #attach(record: VolumeRecord, size: number): Promise<void> {
    const { nbdSocket } = this.#options;
    const volumeId = record.volumeId;
    const bootId = await currentBootId();
    if ((await kernelNbdDevices()).length > 0) {
      record.device = await attachKernelNbd(nbdSocket, volumeId, async (device) => {
        record.attachment = { kind: 'nbd', bootId, device };
        await this.#store.write(record);
      });
    } else {
      const paths = fileAttachmentPaths(this.#store, volumeId);
      record.attachment = { kind: 'fuse', bootId, ...paths };
      await this.#store.write(record);
      // Whatever a crash left under these paths without a record goes first.
      await detach(this.#store, volumeId, record.attachment);
      const served = await startFileServer(this.#store, nbdSocket, volumeId, size);
      record.attachment = { kind: 'fuse', bootId, ...paths, pid: served.pid, identity: served.identity };
      await this.#store.write(record);
      const loop = await attachLoop(paths.file);
      record.attachment.loopDevice = loop;
      record.device = loop;
    }
    await this.#store.write(record);
  }

  /**
   * Creates the filesystem on a blank device, or grows an existing one that is smaller than its
   * device (a clone larger than its source, a volume expanded while unstaged), then mounts it at
   * the staging path. ext4 grows before the mount, offline, which needs no CAP_SYS_RESOURCE; XFS
   * only grows mounted, and xfs_growfs is a no-op on a filesystem that fills its device.
   */
  async #mountStaged(record: VolumeRecord): Promise<void> {
    const device = record.device;
    const fsType = record.fsType ?? DEFAULT_FS_TYPE;
    if (device === undefined) throw new Error(`${record.volumeId} has no device to mount`);
    const log = this.#options.logger.child({ volumeId: record.volumeId, device, fsType });
    const content = await probeDevice(device);
    if (content.kind === 'blank') {
      log.info('creating a filesystem on a blank volume');
      await makeFilesystem(device, fsType);
    } else if (content.kind === 'other') {
      throw new CsiError(status.FAILED_PRECONDITION, `${record.volumeId} holds no filesystem but ${content.description}: not formatting it`);
    } else if (content.type !== fsType) {
      throw new CsiError(status.FAILED_PRECONDITION, `${record.volumeId} holds ${content.type}, the volume capability asks for ${fsType}`);
    } else if (fsType === 'ext4' && (await ext4CanGrow(device))) {
      log.info('growing the filesystem to its device');
      await growExt4Offline(device);
    }
    await mkdir(record.stagingTargetPath, { recursive: true });
    await mountFilesystem(device, record.stagingTargetPath, fsType, record.mountFlags);
    if (fsType === 'xfs') await growMounted(fsType, device, record.stagingTargetPath);
  }

  async #stagedIntact(record: VolumeRecord): Promise<boolean> {
    if (record.device === undefined || !(await attachmentIntact(record.attachment, record.device))) return false;
    if (record.accessType === 'block') return true;
    const top = (await mountsAt(record.stagingTargetPath)).at(-1);
    return top !== undefined && top.device === (await deviceNumber(record.device));
  }

  /** Undoes a stage, whatever state a record is in; removes the record last. */
  async #teardown(record: VolumeRecord): Promise<void> {
    if (record.accessType === 'mount') await unmountAll(record.stagingTargetPath);
    // Read-only loop devices of block publications sit on the staged device; while that device is
    // still ours, any loop device over it is ours too (one made just before a crash included).
    if (record.device !== undefined && (await attachmentIntact(record.attachment, record.device))) {
      await detachLoopsBackedBy(record.device);
    }
    await detach(this.#store, record.volumeId, record.attachment);
    await this.#store.remove(record.volumeId);
  }

  async #unstage(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = knownVolumeId(request);
    const stagingPath = requirePath(request, 'staging_target_path');
    if (volumeId === undefined) return {};
    return this.#locked(volumeId, async () => {
      const record = await this.#store.read(volumeId);
      if (record === undefined) return {};
      if (record.stagingTargetPath !== stagingPath) {
        this.#options.logger.warn({ volumeId, stagingPath, stagedAt: record.stagingTargetPath }, 'unstage of a path the volume is not staged at');
        return {};
      }
      for (const target of Object.keys(record.publications)) {
        if ((await mountsAt(target)).length > 0) {
          throw new CsiError(status.FAILED_PRECONDITION, `${volumeId} is still published at ${target}`);
        }
      }
      await this.#teardown(record);
      return {};
    });
  }

  // ---- publish / unpublish

  async #publish(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = knownVolumeId(request);
    const targetPath = requirePath(request, 'target_path');
    const stagingPath = requirePath(request, 'staging_target_path');
    const capability = parseCapability(request.volume_capability);
    const readonly = request.readonly === true;
    if (volumeId === undefined) throw new CsiError(status.NOT_FOUND, `no volume ${JSON.stringify(request.volume_id)}`);
    return this.#locked(volumeId, async () => {
      const record = await this.#store.read(volumeId);
      if (record === undefined || record.stagingTargetPath !== stagingPath || !(await this.#stagedIntact(record))) {
        throw new CsiError(status.FAILED_PRECONDITION, `${volumeId} is not staged at ${stagingPath}`);
      }
      if (record.accessType !== capability.accessType) {
        throw new CsiError(status.INVALID_ARGUMENT, `${volumeId} is staged as a ${record.accessType} volume, not ${capability.accessType}`);
      }
      if (targetPath === stagingPath) throw invalid('target_path and staging_target_path are the same');
      const existing = record.publications[targetPath];
      const mounted = (await mountsAt(targetPath)).length > 0;
      if (existing !== undefined && mounted) {
        if (existing.readonly !== readonly) {
          throw new CsiError(status.ALREADY_EXISTS, `${volumeId} is published at ${targetPath} ${existing.readonly ? 'read-only' : 'read-write'}`);
        }
        return {};
      }
      if (existing === undefined && mounted) {
        throw new CsiError(status.ALREADY_EXISTS, `${targetPath} already has a mount this driver did not make`);
      }
      await this.#bindPublication(record, targetPath, readonly);
      return {};
    });
  }

  async #bindPublication(record: VolumeRecord, targetPath: string, readonly: boolean): Promise<void> {
    const device = record.device;
    if (device === undefined) throw new Error(`${record.volumeId} is staged without a device`);
    record.publications[targetPath] = { readonly };
    await this.#store.write(record);
    if (record.accessType === 'mount') {
      await mkdir(targetPath, { recursive: true });
      await bindMount(record.stagingTargetPath, targetPath, readonly);
      return;
    }
    // The SP places the device at the target: a file to bind the device node onto.
    await (await open(targetPath, 'a')).close();
    let source = device;
    if (readonly) {
      // A read-only bind mount of a device node does not stop writes to the device (the mount's
      // flag covers the file system the node lives on); a read-only loop device over it does.
      source = await attachReadonlyLoop(device);
      record.publications[targetPath] = { readonly, readonlyLoopDevice: source };
      await this.#store.write(record);
    }
    await bindMount(source, targetPath, readonly);
  }

  async #unpublish(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = knownVolumeId(request);
    const targetPath = requirePath(request, 'target_path');
    if (volumeId === undefined) return {};
    return this.#locked(volumeId, async () => {
      const record = await this.#store.read(volumeId);
      const publication = record?.publications[targetPath];
      if (record === undefined || publication === undefined) return {};
      await unmountAll(targetPath);
      if (publication.readonlyLoopDevice !== undefined && record.device !== undefined) {
        await detachLoopIfBackedBy(publication.readonlyLoopDevice, record.device);
      }
      // The SP made the target, so the SP removes it.
      await (record.accessType === 'mount' ? rmdir(targetPath) : unlink(targetPath)).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') throw error;
      });
      delete record.publications[targetPath];
      await this.#store.write(record);
      return {};
    });
  }

  // ---- stats / expand

  /** The record of the volume that `volumePath` belongs to (its staging path or a publication); NOT_FOUND otherwise. */
  async #recordFor(volumeId: string | undefined, volumePath: string): Promise<VolumeRecord> {
    const record = volumeId === undefined ? undefined : await this.#store.read(volumeId);
    if (record === undefined) throw new CsiError(status.NOT_FOUND, `${volumeId ?? 'the volume'} is not staged on this node`);
    if (volumePath !== record.stagingTargetPath && record.publications[volumePath] === undefined) {
      throw new CsiError(status.NOT_FOUND, `${volumePath} is not a path of ${record.volumeId}`);
    }
    if (!(await pathExists(volumePath))) throw new CsiError(status.NOT_FOUND, `${volumePath} does not exist`);
    return record;
  }

  async #stats(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = knownVolumeId(request);
    const volumePath = requirePath(request, 'volume_path');
    await this.#init();
    const record = await this.#recordFor(volumeId, volumePath);
    if (record.accessType === 'block') {
      const publication = record.publications[volumePath];
      const device = publication === undefined ? record.device : volumePath;
      if (device === undefined) throw new CsiError(status.NOT_FOUND, `${record.volumeId} has no device`);
      return { usage: [{ unit: 'BYTES', total: await blockDeviceSize(device) }] };
    }
    const usage = await filesystemUsage(volumePath);
    return {
      usage: [
        { unit: 'BYTES', total: usage.totalBytes, available: usage.availableBytes, used: usage.usedBytes },
        { unit: 'INODES', total: usage.totalInodes, available: usage.freeInodes, used: usage.usedInodes },
      ],
    };
  }

  async #expand(request: CsiMessage): Promise<CsiMessage> {
    const volumeId = knownVolumeId(request);
    const volumePath = requirePath(request, 'volume_path');
    const range = request.capacity_range;
    const requiredBytes = isObject(range) && typeof range.required_bytes === 'number' ? range.required_bytes : 0;
    if (volumeId === undefined) throw new CsiError(status.NOT_FOUND, `no volume ${JSON.stringify(request.volume_id)}`);
    return this.#locked(volumeId, async () => {
      const record = await this.#recordFor(volumeId, volumePath);
      if (!(await this.#stagedIntact(record)) || record.device === undefined) {
        throw new CsiError(status.FAILED_PRECONDITION, `${volumeId} is not staged intact; stage it again`);
      }
      // The daemon's volume grows here when the controller has not grown it: with node-only
      // expansion (no controller EXPAND_VOLUME) the resizer leaves the whole job to the node.
      let exportSize = await this.#volumeSize(volumeId);
      if (exportSize < requiredBytes) {
        // Rounded up to the store's 4 KiB blocks, as the controller rounds.
        exportSize = (await this.#admin.grow(volumeId, Math.ceil(requiredBytes / 4096) * 4096)).size;
      }
      if ((await blockDeviceSize(record.device)) < exportSize) {
        if (record.attachment.kind === 'fuse') {
          await this.#growAttached(record, record.attachment, record.device, exportSize);
          if (record.accessType === 'mount') await this.#growStaged(record, record.device);
        } else {
          await this.#reattach(record, exportSize);
        }
      } else if (record.accessType === 'mount') {
        await this.#growStaged(record, record.device);
      }
      const device = record.device as string | undefined;
      if (device === undefined) throw new Error(`${volumeId} lost its device while expanding`);
      return { capacity_bytes: await blockDeviceSize(device) };
    });
  }

  /**
   * Grows the staged filesystem to its device. XFS grows mounted. ext4 grows mounted when the
   * driver holds CAP_SYS_RESOURCE, which resize2fs needs for a mounted filesystem; without it an
   * unpublished ext4 is unmounted and grown offline (by restaging), and a published one cannot grow.
   */
  async #growStaged(record: VolumeRecord, device: string): Promise<void> {
    const fsType = record.fsType ?? DEFAULT_FS_TYPE;
    if (fsType === 'xfs') {
      await growMounted(fsType, device, record.stagingTargetPath);
      return;
    }
    if (!(await ext4CanGrow(device))) return;
    if (await hasCapability(CAP_SYS_RESOURCE)) {
      await growMounted(fsType, device, record.stagingTargetPath);
    } else if (Object.keys(record.publications).length === 0) {
      await unmountAll(record.stagingTargetPath);
      await this.#mountStaged(record);
    } else {
      throw new CsiError(
        status.FAILED_PRECONDITION,
        `${record.volumeId}: its device has grown, but growing a mounted ext4 needs CAP_SYS_RESOURCE, which this driver lacks; ` +
          'run it with that capability (privileged), or unpublish the volume and expand it again',
      );
    }
  }

  /** Grows a user-space attachment in use, and the read-only loop devices of block publications over it. */
  async #growAttached(record: VolumeRecord, attachment: FileAttachment, device: string, size: number): Promise<void> {
    this.#options.logger.info({ volumeId: record.volumeId, device, size }, 'growing the attached device online');
    await growFileAttachment(this.#store, record.volumeId, attachment, size);
    for (const publication of Object.values(record.publications)) {
      if (publication.readonlyLoopDevice !== undefined) await refreshLoopIfBackedBy(publication.readonlyLoopDevice, device);
    }
  }

  /** Re-attaches a staged, unpublished volume so its device has the export's current size. */
  async #reattach(record: VolumeRecord, size: number): Promise<void> {
    const published = Object.keys(record.publications);
    if (published.length > 0) {
      const route =
        record.attachment.kind === 'nbd'
          ? `the kernel's nbd client learns a new size only through the NBD_SET_SIZE ioctl, which this driver cannot issue`
          : `${record.attachment.kind} cannot grow a device in use`;
      throw new CsiError(
        status.FAILED_PRECONDITION,
        `${record.volumeId} is published (${published.join(', ')}) and its device cannot grow online (${route}): ` +
          'it keeps the size it was attached with until it is unpublished and expanded again',
      );
    }
    this.#options.logger.info({ volumeId: record.volumeId, size }, 're-attaching to see the grown volume');
    if (record.accessType === 'mount') await unmountAll(record.stagingTargetPath);
    await detach(this.#store, record.volumeId, record.attachment);
    delete record.device;
    await this.#attach(record, size);
    if (record.accessType === 'mount') await this.#mountStaged(record);
  }
}

export function createNodeHandlers(options: NodeServiceOptions): CsiHandlers {
  return new NodeService(options).handlers();
}
