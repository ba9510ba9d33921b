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

/** Reads every byte of `files` once, front to back. */
export async function preRead(files: readonly string[]): Promise<void> {
  const buffer = Buffer.allocUnsafe(READ_CHUNK);
  for (const file of files) {
    const handle = await open(file, 'r');
    try {
      let position = 0;
      for (;;) {
        const { bytesRead } = await handle.read(buffer, 0, buffer.length, position);
        if (bytesRead === 0) break;
        position += bytesRead;
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
