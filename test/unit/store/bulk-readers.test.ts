import { afterEach, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BulkReaders } from '../../../src/store/bulk-readers.js';

const MiB = 1024 * 1024;
/** The built module; `npm test` builds before vitest runs. */
const BUILT = fileURLToPath(new URL('../../../dist/src/store/bulk-readers.js', import.meta.url));
let dir: string | undefined;
let fd: number | undefined;

afterEach(async () => {
  if (fd !== undefined) closeSync(fd);
  fd = undefined;
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  dir = undefined;
});

/** A 4 MiB file whose every 4-byte word holds its own offset. */
async function numberedFile(): Promise<{ fd: number; content: Buffer }> {
  dir = await mkdtemp(join(tmpdir(), 'clonebd-readers-'));
  const content = Buffer.alloc(4 * MiB);
  for (let i = 0; i < content.length; i += 4) content.writeUInt32LE(i, i);
  const path = join(dir, 'data');
  await writeFile(path, content);
  fd = openSync(path, 'r');
  return { fd, content };
}

describe('reader threads', () => {
  it('fill the given part of shared memory with what the file holds, more reads at once than threads', async () => {
    const file = await numberedFile();
    const readers = new BulkReaders(3);
    const memory = Buffer.from(new SharedArrayBuffer(12 * 256 * 1024));
    const reads = Array.from({ length: 12 }, (_, i) => {
      const target = memory.subarray(i * 256 * 1024 + 4096, (i + 1) * 256 * 1024);
      return readers.read(file.fd, target, i * 300_000).then((done) => ({ i, target, done }));
    });
    for (const { i, target, done } of await Promise.all(reads)) {
      expect(done).toBe(target.length);
      expect(target.equals(file.content.subarray(i * 300_000, i * 300_000 + target.length))).toBe(true);
    }
    expect(memory.subarray(0, 4096).every((byte) => byte === 0), 'bytes outside the targets stay as they were').toBe(true);
  });

  it('read fewer bytes only at the end of the file', async () => {
    const file = await numberedFile();
    const readers = new BulkReaders(2);
    const target = Buffer.from(new SharedArrayBuffer(MiB));
    expect(await readers.read(file.fd, target, 4 * MiB - 1000)).toBe(1000);
    expect(target.subarray(0, 1000).equals(file.content.subarray(4 * MiB - 1000))).toBe(true);
  });

  it('report a failed read with its errno code and go on serving', async () => {
    const file = await numberedFile();
    const readers = new BulkReaders(1);
    const target = Buffer.from(new SharedArrayBuffer(8192));
    await expect(readers.read(1_000_000, target, 0)).rejects.toMatchObject({ code: 'EBADF' });
    expect(await readers.read(file.fd, target, 8192)).toBe(8192);
    expect(target.equals(file.content.subarray(8192, 16384))).toBe(true);
  });

  it('refuse private memory, which no other thread can write', async () => {
    const file = await numberedFile();
    expect(() => new BulkReaders(1).read(file.fd, Buffer.alloc(4096), 0)).toThrow(TypeError);
  });

  it('leave a process free to exit once its reads are done, so a stopped server does not linger', async () => {
    await numberedFile();
    const program = `
      import { openSync } from 'node:fs';
      import { BulkReaders } from ${JSON.stringify(BUILT)};
      const readers = new BulkReaders(4);
      const target = Buffer.from(new SharedArrayBuffer(4 * 65536));
      const reads = [0, 1, 2, 3].map((i) => readers.read(openSync(process.argv[1], 'r'), target.subarray(i * 65536, (i + 1) * 65536), i * 65536));
      console.log((await Promise.all(reads)).join(','));
    `;
    const output = await new Promise<string>((resolve, reject) => {
      const child = execFile(process.execPath, ['--input-type=module', '-e', program, join(dir!, 'data')], { timeout: 20_000 }, (error, stdout) =>
        error === null ? resolve(stdout) : reject(error),
      );
      child.stdin?.end();
    });
    expect(output.trim()).toBe('65536,65536,65536,65536');
  });
});
