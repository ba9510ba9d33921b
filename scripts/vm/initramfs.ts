/**
 * The guest's root filesystem as an uncompressed initramfs: a cpio archive in the "newc" format
 * the kernel unpacks (Documentation/driver-api/early-userspace/buffer-format.rst):
 *
 *   "070701" + 13 fields of 8 hex digits (ino mode uid gid nlink mtime filesize devmajor devminor
 *   rdevmajor rdevminor namesize check), the name with its NUL, padding to 4 bytes, the data,
 *   padding to 4 bytes; the archive ends with an entry named "TRAILER!!!".
 *
 * Uncompressed, because the libraries fio pulls in make it ~90 MB and inflating that in an
 * emulated CPU costs more than the kernel copying it. Parents are written before their
 * children: the kernel does not create missing directories.
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { posix } from 'node:path';

export type CpioEntry =
  | { kind: 'dir'; path: string }
  | { kind: 'file'; path: string; source: string | Buffer; mode?: number }
  | { kind: 'symlink'; path: string; target: string }
  | { kind: 'chardev'; path: string; major: number; minor: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function pad4(length: number): number {
  return (4 - (length % 4)) % 4;
}

/** One newc header with its name and padding. */
export function newcHeader(fields: {
  ino: number;
  mode: number;
  nlink: number;
  fileSize: number;
  rdevMajor?: number;
  rdevMinor?: number;
  name: string;
}): Buffer {
  const name = Buffer.from(`${fields.name}\0`, 'utf8');
  const numbers = [
    fields.ino,
    fields.mode,
    0, // uid
    0, // gid
    fields.nlink,
    0, // mtime
    fields.fileSize,
    0, // devmajor
    0, // devminor
    fields.rdevMajor ?? 0,
    fields.rdevMinor ?? 0,
    name.length,
    0, // check
  ];
  const header = `070701${numbers.map((value) => value.toString(16).padStart(8, '0')).join('')}`;
  const out = Buffer.alloc(header.length + name.length + pad4(header.length + name.length));
  out.write(header, 0, 'latin1');
  name.copy(out, header.length);
  return out;
}

/** Adds the directories every entry's path needs, sorted so parents come first. */
export function withParents(entries: readonly CpioEntry[]): CpioEntry[] {
  const dirs = new Set<string>();
  for (const entry of entries) {
    let dir = posix.dirname(entry.path);
    while (dir !== '/' && dir !== '.') {
      dirs.add(dir);
      dir = posix.dirname(dir);
    }
    if (entry.kind === 'dir') dirs.add(entry.path);
  }
  const dirEntries: CpioEntry[] = [...dirs].sort().map((path) => ({ kind: 'dir', path }));
  return [...dirEntries, ...entries.filter((entry) => entry.kind !== 'dir')];
}

async function writeAll(handle: FileHandle, buffer: Buffer): Promise<void> {
  let written = 0;
  while (written < buffer.length) {
    const { bytesWritten } = await handle.write(buffer, written, buffer.length - written);
    written += bytesWritten;
  }
}

/** Writes the archive to `outPath`; returns its size in bytes. Paths are absolute guest paths. */
export async function writeCpio(outPath: string, entries: readonly CpioEntry[]): Promise<number> {
  const handle = await open(outPath, 'w');
  let size = 0;
  const put = async (buffer: Buffer): Promise<void> => {
    await writeAll(handle, buffer);
    size += buffer.length;
  };
  try {
    let ino = 1;
    for (const entry of withParents(entries)) {
      const name = entry.path.replace(/^\/+/, '');
      let data: Buffer = Buffer.alloc(0);
      let mode: number;
      let nlink = 1;
      let rdev: { rdevMajor?: number; rdevMinor?: number } = {};
      switch (entry.kind) {
        case 'dir':
          mode = S_IFDIR | 0o755;
          nlink = 2;
          break;
        case 'file':
          data = typeof entry.source === 'string' ? await readFile(entry.source) : entry.source;
          mode = S_IFREG | (entry.mode ?? 0o755);
          break;
        case 'symlink':
          data = Buffer.from(entry.target, 'utf8');
          mode = S_IFLNK | 0o777;
          break;
        case 'chardev':
          mode = S_IFCHR | 0o600;
          rdev = { rdevMajor: entry.major, rdevMinor: entry.minor };
          break;
      }
      await put(newcHeader({ ino: ino++, mode, nlink, fileSize: data.length, ...rdev, name }));
      if (data.length > 0) {
        await put(data);
        await put(Buffer.alloc(pad4(data.length)));
      }
    }
    await put(newcHeader({ ino: 0, mode: 0, nlink: 1, fileSize: 0, name: 'TRAILER!!!' }));
  } finally {
    await handle.close();
  }
  return size;
}
