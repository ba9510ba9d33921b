/**
 * Mounts, filesystems and block device facts for the CSI node service.
 *
 * The mount table (/proc/self/mountinfo) is the truth about what is mounted: the node service asks
 * it before every mount and unmount, which is what makes stage and publish idempotent and lets a
 * restarted driver pick up where it stopped. A path may carry several mounts stacked on it;
 * `unmountAll` peels them until none is left.
 *
 * Filesystems are created only on a blank device: `blkid -p` (a low-level probe, no cache) must
 * find no signature at all, neither a filesystem nor a partition table. A clone or a restored
 * snapshot therefore keeps the filesystem of its source, and a device someone else wrote to is
 * never formatted.
 */
import { readFile, statfs } from 'node:fs/promises';
import { OperationError } from '../util/errors.js';
import { describeFailure, runChecked, runCommand } from './node-exec.js';
import type { FsType } from './node-state.js';

const MKFS_TIMEOUT_MS = 10 * 60_000;
const MAX_STACKED_MOUNTS = 16;

export interface MountEntry {
  mountPoint: string;
  /** major:minor of the mounted device. */
  device: string;
  /** The path inside the mounted filesystem that this mount shows (`/` for a whole filesystem). */
  root: string;
  fsType: string;
  source: string;
}

/** Decodes the octal escapes mountinfo uses for spaces, tabs, newlines and backslashes. */
function unescapeMountField(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

export function parseMountInfo(text: string): MountEntry[] {
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const separator = line.indexOf(' - ');
    if (separator < 0) continue;
    const before = line.slice(0, separator).split(' ');
    const after = line.slice(separator + 3).split(' ');
    const [, , device, root, mountPoint] = before;
    const [fsType, source] = after;
    if (device === undefined || root === undefined || mountPoint === undefined || fsType === undefined) continue;
    entries.push({
      mountPoint: unescapeMountField(mountPoint),
      device,
      root: unescapeMountField(root),
      fsType,
      source: unescapeMountField(source ?? ''),
    });
  }
  return entries;
}

async function readMounts(): Promise<MountEntry[]> {
  return parseMountInfo(await readFile('/proc/self/mountinfo', 'utf8'));
}

/** The mounts on `path`, bottom first (the last one is what the path shows). */
export async function mountsAt(path: string): Promise<MountEntry[]> {
  return (await readMounts()).filter((entry) => entry.mountPoint === path);
}

export async function isMountPoint(path: string): Promise<boolean> {
  return (await mountsAt(path)).length > 0;
}

/** Unmounts every mount stacked on `path`; EBUSY when one is in use. */
export async function unmountAll(path: string): Promise<void> {
  for (let round = 0; round < MAX_STACKED_MOUNTS; round += 1) {
    if (!(await isMountPoint(path))) return;
    const result = await runCommand('umount', [path]);
    if (result.code !== 0) {
      if (!(await isMountPoint(path))) return;
      const busy = /busy/i.test(result.stderr);
      throw new OperationError(busy ? 'EBUSY' : 'EIO', describeFailure(result));
    }
  }
  throw new OperationError('EIO', `${path} still has mounts after ${MAX_STACKED_MOUNTS} unmounts`);
}

/** Mount options for `fsType` beyond the caller's. */
function implicitOptions(fsType: FsType): string[] {
  // A clone carries its source's XFS UUID, and XFS refuses to mount a second filesystem with a
  // UUID already mounted on the node; nouuid lets a volume and its clones be mounted side by side.
  return fsType === 'xfs' ? ['nouuid'] : [];
}

export async function mountFilesystem(device: string, target: string, fsType: FsType, flags: readonly string[]): Promise<void> {
  const options = [...implicitOptions(fsType), ...flags];
  const args = ['-t', fsType, ...(options.length > 0 ? ['-o', options.join(',')] : []), device, target];
  await runChecked('mount', args);
}

/** A bind mount of `source` (a directory or a device node) on `target`, read-only if asked. */
export async function bindMount(source: string, target: string, readonly: boolean): Promise<void> {
  await runChecked('mount', ['--bind', source, target]);
  if (readonly) {
    // The read-only flag of a bind mount takes a remount of that mount alone.
    try {
      await runChecked('mount', ['-o', 'remount,bind,ro', target]);
    } catch (error) {
      await runCommand('umount', [target]);
      throw error;
    }
  }
}

export type DeviceContent =
  | { kind: 'blank' }
  | { kind: 'filesystem'; type: string }
  | { kind: 'other'; description: string };

/** What `blkid -p` finds on the device: nothing, a filesystem, or something else (a partition table, say). */
export async function probeDevice(device: string): Promise<DeviceContent> {
  const result = await runCommand('blkid', ['-p', '-o', 'export', device]);
  // blkid exits 2 when it finds no signature at all.
  if (result.code === 2) return { kind: 'blank' };
  if (result.code !== 0) throw new OperationError('EIO', describeFailure(result));
  const fields = new Map<string, string>();
  for (const line of result.stdout.split('\n')) {
    const equals = line.indexOf('=');
    if (equals > 0) fields.set(line.slice(0, equals), line.slice(equals + 1));
  }
  const type = fields.get('TYPE');
  if (type !== undefined && fields.get('USAGE') === 'filesystem') return { kind: 'filesystem', type };
  const description = [...fields].map(([key, value]) => `${key}=${value}`).join(' ');
  return { kind: 'other', description };
}

export async function makeFilesystem(device: string, fsType: FsType): Promise<void> {
  if (fsType === 'ext4') {
    // 4 KiB blocks match the store's granularity, so a block never straddles two of the store's;
    // no discard: a blank clonebd volume reads as zeros already.
    await runChecked('mkfs.ext4', ['-q', '-b', '4096', '-E', 'nodiscard', device], { timeoutMs: MKFS_TIMEOUT_MS });
  } else {
    await runChecked('mkfs.xfs', ['-q', '-K', device], { timeoutMs: MKFS_TIMEOUT_MS });
  }
}

/** Grows a mounted filesystem to fill its device (ext4 needs CAP_SYS_RESOURCE for this). */
export async function growMounted(fsType: FsType, device: string, mountPoint: string): Promise<void> {
  if (fsType === 'ext4') {
    await runChecked('resize2fs', [device], { timeoutMs: MKFS_TIMEOUT_MS });
  } else {
    await runChecked('xfs_growfs', ['-d', mountPoint], { timeoutMs: MKFS_TIMEOUT_MS });
  }
}

/** Whether an ext4 filesystem is smaller than its device by a block or more (reads the superblock; mounted or not). */
export async function ext4CanGrow(device: string): Promise<boolean> {
  const result = await runChecked('dumpe2fs', ['-h', device]);
  const field = (name: string): number => {
    const match = new RegExp(`^${name}:\\s*(\\d+)$`, 'm').exec(result.stdout);
    if (match === null) throw new OperationError('EIO', `dumpe2fs -h ${device} shows no ${name}`);
    return Number(match[1]);
  };
  const blockSize = field('Block size');
  return Math.floor((await blockDeviceSize(device)) / blockSize) > field('Block count');
}

/**
 * Grows an unmounted ext4 to fill its device. resize2fs insists on a forced check first; preen
 * mode (-p) also replays the journal of a clone taken while its source was mounted.
 */
export async function growExt4Offline(device: string): Promise<void> {
  const check = await runCommand('e2fsck', ['-f', '-p', device], { timeoutMs: MKFS_TIMEOUT_MS });
  // 0: clean; 1: errors corrected (a journal replay counts).
  if (check.code !== 0 && check.code !== 1) throw new OperationError('EIO', describeFailure(check));
  await runChecked('resize2fs', [device], { timeoutMs: MKFS_TIMEOUT_MS });
}

export async function blockDeviceSize(device: string): Promise<number> {
  const result = await runChecked('blockdev', ['--getsize64', device]);
  const size = Number(result.stdout.trim());
  if (!Number.isSafeInteger(size)) throw new OperationError('EIO', `blockdev --getsize64 ${device} printed ${result.stdout.trim()}`);
  return size;
}

export interface FilesystemUsage {
  totalBytes: number;
  availableBytes: number;
  usedBytes: number;
  totalInodes: number;
  freeInodes: number;
  usedInodes: number;
}

export async function filesystemUsage(path: string): Promise<FilesystemUsage> {
  const info = await statfs(path);
  return {
    totalBytes: info.blocks * info.bsize,
    availableBytes: info.bavail * info.bsize,
    usedBytes: (info.blocks - info.bfree) * info.bsize,
    totalInodes: info.files,
    freeInodes: info.ffree,
    usedInodes: info.files - info.ffree,
  };
}
