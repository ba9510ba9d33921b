/**
 * Puts backing files in a known page-cache state right before a job, so a server's figures do not
 * depend on which server ran before it (this machine's memory manager evicts idle file pages after
 * about 30 s).
 *
 *   cold: sync, then drop the page cache: the whole cache as root (/proc/sys/vm/drop_caches), or,
 *         without root, each backing file's pages via `dd iflag=nocache count=0`
 *         (POSIX_FADV_DONTNEED).
 *   warm: cold first, then one sequential read of the tested server's backing files, so every
 *         server starts its job with exactly its own files cached and nobody else's.
 *
 * The warm read skips holes: clonebd's layer files are as large as the volume and mostly holes, and
 * reading a hole fills the page cache with zero pages that evict the data the job reads (a depth-32
 * chain at 4 GiB would be 132 GiB of holes). Node has no SEEK_DATA, so the allocated extents come
 * from `filefrag -v` (the FIEMAP ioctl); where that fails, the whole file is read.
 */
import { open } from 'node:fs/promises';
import { runTool } from './bench-child.js';

export const CACHE_STATES = ['cold', 'warm'] as const;
export type CacheState = (typeof CACHE_STATES)[number];

const TOOL_TIMEOUT_MS = 10 * 60_000;
const READ_CHUNK = 8 * 1024 * 1024;

export type DropMethod = 'drop_caches' | 'fadvise';

export function dropMethod(): DropMethod {
  return process.getuid?.() === 0 ? 'drop_caches' : 'fadvise';
}

/** Writes back dirty pages, then evicts clean ones (of `files`, or all of them as root). */
export async function dropCache(files: readonly string[]): Promise<void> {
  await runTool('sync', [], TOOL_TIMEOUT_MS);
  if (dropMethod() === 'drop_caches') {
    const handle = await open('/proc/sys/vm/drop_caches', 'w');
    try {
      await handle.writeFile('3');
    } finally {
      await handle.close();
    }
    return;
  }
  for (const file of files) await runTool('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], TOOL_TIMEOUT_MS);
}

/**
 * The allocated byte ranges [offset, length] of a file from `filefrag -v` output, in file order;
 * unwritten (preallocated) extents read as zeros without I/O, so they count as holes. Undefined when
 * the output is not filefrag's extent table.
 */
export function parseFilefrag(text: string): Array<[number, number]> | undefined {
  const header = /is \d+ \(\d+ blocks? of (\d+) bytes\)\s*$/m.exec(text);
  if (header === null) return undefined;
  if (!/^\s*ext:\s+logical_offset:/m.test(text)) return /: 0 extents? found\s*$/m.test(text) ? [] : undefined;
  const unit = Number(header[1]);
  const ranges: Array<[number, number]> = [];
  for (const line of text.split('\n')) {
    const match = /^\s*\d+:\s*(\d+)\.\.\s*(\d+):.*?:\s*([\w,]*)\s*$/.exec(line);
    if (match === null) continue;
    if (match[3]!.split(',').includes('unwritten')) continue;
    const first = Number(match[1]);
    ranges.push([first * unit, (Number(match[2]) - first + 1) * unit]);
  }
  return ranges;
}

async function dataRanges(file: string): Promise<Array<[number, number]> | undefined> {
  try {
    return parseFilefrag((await runTool('filefrag', ['-v', file], TOOL_TIMEOUT_MS)).stdout);
  } catch {
    return undefined;
  }
}

/** Reads every allocated byte of `files` once, front to back; holes are skipped. */
export async function preRead(files: readonly string[]): Promise<void> {
  const buffer = Buffer.allocUnsafe(READ_CHUNK);
  for (const file of files) {
    const ranges = (await dataRanges(file)) ?? [[0, Number.MAX_SAFE_INTEGER]];
    const handle = await open(file, 'r');
    try {
      for (const [offset, length] of ranges) {
        let position = offset;
        while (position < offset + length) {
          const { bytesRead } = await handle.read(buffer, 0, Math.min(buffer.length, offset + length - position), position);
          if (bytesRead === 0) break;
          position += bytesRead;
        }
      }
    } finally {
      await handle.close();
    }
  }
}

/** Brings the cache to `state` for a job on the server that owns `own`; `all` is every target's files. */
export async function setCacheState(state: CacheState, own: readonly string[], all: readonly string[]): Promise<void> {
  await dropCache(all);
  if (state === 'warm') await preRead(own);
}
