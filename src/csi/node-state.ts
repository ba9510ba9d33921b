/**
 * What the node service remembers about each staged volume: one small JSON file per volume in the
 * state directory, STATE/volumes/VOLUME.json, so that a restarted driver still finds the loop
 * device, the FUSE directory and the file server process it set up, and the targets it published to.
 *
 * Every write goes to a temporary file that is synced and renamed over the record, then the
 * directory is synced: a crash leaves the old record or the new one, never half of one. A record
 * is written *before* each step that creates something (an attachment, a mount), naming what that
 * step is about to create, so a crash between the step and the next write still leaves enough to
 * undo it. Readers therefore treat a record as what may exist, and check the system for what does.
 *
 * Volume ids reach the file system only after `isValidVolumeId` (the daemon's export-name rule),
 * so an id can never name a path outside the directory.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { OperationError } from '../util/errors.js';

export const FS_TYPES = ['ext4', 'xfs'] as const;
export type FsType = (typeof FS_TYPES)[number];

/** The daemon's rule for export names: 1-128 of A-Z a-z 0-9 . _ -, not starting with . or -. */
const VOLUME_ID = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

export function isValidVolumeId(id: string): boolean {
  return VOLUME_ID.test(id);
}

/** A backing file's identity as the kernel reports it for a loop device. */
export interface FileIdentity {
  major: number;
  minor: number;
  ino: number;
}

/**
 * The user-space attachment: a FUSE file server serving the export as a file, a loop device over
 * it. `fuse` is `clonebd attach-file`, which can grow the file while in use; `nbdfuse` is the
 * libnbd tool that earlier versions of the driver used, whose records are still torn down alike.
 */
export interface FileAttachment {
  kind: 'fuse' | 'nbdfuse';
  bootId: string;
  /** The FUSE mountpoint the file server serves, and the export as a file inside it. */
  fuseDir: string;
  file: string;
  /** Known once the file server serves the file. */
  pid?: number;
  identity?: FileIdentity;
  /** Known once losetup has attached it. */
  loopDevice?: string;
}

/**
 * How the export became a block device on this node. `bootId` is the kernel's boot id when it was
 * made: loop devices, nbd connections and device numbers do not outlive a reboot, and after one
 * the same names and numbers may belong to other volumes, so an attachment of an earlier boot is
 * never matched against the devices of this one.
 */
export type Attachment =
  | FileAttachment
  | {
      kind: 'nbd';
      bootId: string;
      /** The /dev/nbdN the kernel's client was (or is about to be) connected on. */
      device: string;
    };

export interface Publication {
  readonly: boolean;
  /** A block volume published read-only gets its own read-only loop device over the staged device. */
  readonlyLoopDevice?: string;
}

export interface VolumeRecord {
  version: 1;
  volumeId: string;
  stagingTargetPath: string;
  accessType: 'mount' | 'block';
  /** For mount volumes. */
  fsType?: FsType;
  mountFlags: string[];
  attachment: Attachment;
  /** The staged device once the attachment is complete: /dev/loopN or /dev/nbdN. */
  device?: string;
  /** Publications by target path, recorded before their mount is made. */
  publications: Record<string, Publication>;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isIdentity(value: unknown): value is FileIdentity {
  return isObject(value) && typeof value.major === 'number' && typeof value.minor === 'number' && typeof value.ino === 'number';
}

function isAttachment(value: unknown): value is Attachment {
  if (!isObject(value) || typeof value.bootId !== 'string') return false;
  if (value.kind === 'nbd') return typeof value.device === 'string';
  return (
    (value.kind === 'fuse' || value.kind === 'nbdfuse') &&
    typeof value.fuseDir === 'string' &&
    typeof value.file === 'string' &&
    (value.pid === undefined || typeof value.pid === 'number') &&
    (value.identity === undefined || isIdentity(value.identity)) &&
    (value.loopDevice === undefined || typeof value.loopDevice === 'string')
  );
}

function isPublication(value: unknown): value is Publication {
  return (
    isObject(value) &&
    typeof value.readonly === 'boolean' &&
    (value.readonlyLoopDevice === undefined || typeof value.readonlyLoopDevice === 'string')
  );
}

function isVolumeRecord(value: unknown): value is VolumeRecord {
  return (
    isObject(value) &&
    value.version === 1 &&
    typeof value.volumeId === 'string' &&
    typeof value.stagingTargetPath === 'string' &&
    (value.accessType === 'mount' || value.accessType === 'block') &&
    (value.fsType === undefined || FS_TYPES.includes(value.fsType as FsType)) &&
    Array.isArray(value.mountFlags) &&
    value.mountFlags.every((flag) => typeof flag === 'string') &&
    isAttachment(value.attachment) &&
    (value.device === undefined || typeof value.device === 'string') &&
    isObject(value.publications) &&
    Object.values(value.publications).every(isPublication)
  );
}

export class StateStore {
  readonly #dir: string;
  /** Where the file servers' FUSE directories live, one per volume. */
  readonly fuseRoot: string;
  /** Where the file servers' output goes, one log per volume, for error messages. */
  readonly logRoot: string;

  constructor(stateDir: string) {
    this.#dir = join(stateDir, 'volumes');
    this.fuseRoot = join(stateDir, 'fuse');
    this.logRoot = join(stateDir, 'logs');
  }

  async init(): Promise<void> {
    await mkdir(this.#dir, { recursive: true, mode: 0o700 });
    await mkdir(this.fuseRoot, { recursive: true, mode: 0o700 });
    await mkdir(this.logRoot, { recursive: true, mode: 0o700 });
  }

  #path(volumeId: string): string {
    if (!isValidVolumeId(volumeId)) throw new OperationError('EINVAL', `not a volume id: ${JSON.stringify(volumeId)}`);
    return join(this.#dir, `${volumeId}.json`);
  }

  async read(volumeId: string): Promise<VolumeRecord | undefined> {
    const path = this.#path(volumeId);
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new OperationError('EIO', `cannot read the record of ${volumeId}`, { cause: error });
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      throw new OperationError('EIO', `the record of ${volumeId} is not JSON`, { cause: error });
    }
    if (!isVolumeRecord(parsed) || parsed.volumeId !== volumeId) {
      throw new OperationError('EIO', `the record of ${volumeId} is malformed`);
    }
    return parsed;
  }

  async write(record: VolumeRecord): Promise<void> {
    const path = this.#path(record.volumeId);
    const temporary = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    const file = await open(temporary, 'wx', 0o600);
    try {
      await file.writeFile(`${JSON.stringify(record, null, 2)}\n`);
      await file.sync();
    } finally {
      await file.close();
    }
    try {
      await rename(temporary, path);
    } catch (error) {
      await unlink(temporary).catch(() => undefined);
      throw error;
    }
    await this.#syncDir();
  }

  async remove(volumeId: string): Promise<void> {
    try {
      await unlink(this.#path(volumeId));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    }
    await this.#syncDir();
  }

  async #syncDir(): Promise<void> {
    const dir = await open(this.#dir, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }
}
