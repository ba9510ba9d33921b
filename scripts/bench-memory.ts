/**
 * Memory at scale (`npm run bench -- --memory`), each part in a fresh pool and server:
 *
 *   clones  a base written in full, N clones of it, RSS after creating them and after a restart
 *           (without the garbage of writing the base), then with one NBD connection per clone
 *           open (each having read 4 KiB), and after 4 KiB written into each;
 *   map     one 16 GiB volume with M distinct random 4 KiB blocks written (a FLUSH every 10,000):
 *           RSS after writing, RSS of
 *           the restarted server (maps loaded from checkpoint and journal), and the heap an idle
 *           process needs to open the stopped pool (bench-map-probe.ts).
 */
import { readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NbdClient } from '../native-free/index.js';
import { adminSocketPath, nbdSocketPath } from '../src/cli/serve.js';
import { AdminClient } from '../src/control/admin-client.js';
import { findFreePort, runTool } from './bench-child.js';
import { BLOCK, FILL_BYTE, randomBlocks } from './bench-layouts.js';
import { connect, countWrittenExtents, fillSequential, writeBlocks } from './bench-nbd.js';
import { countOpenFiles, openFilesLimit, readPeakRssBytes, readRssBytes } from './bench-procfs.js';
import type { CloneMemoryResult, MapMemoryResult } from './bench-scale-report.js';
import { startClonebd, type Logger } from './bench-targets.js';

const BASE_SIZE = 2 ** 30;
const MAP_VOLUME_SIZE = 16 * 2 ** 30;
const SEED = 0x3e3;
/** The scattered writes FLUSH this often, as a file system commits. */
const FLUSH_EVERY = 10_000;
/** Descriptors the server keeps for itself beyond one socket and one layer file per clone. */
const SPARE_DESCRIPTORS = 64;
const PROBE_PATH = fileURLToPath(new URL('./bench-map-probe.js', import.meta.url));
const PROBE_TIMEOUT_MS = 10 * 60_000;

export interface MemoryOptions {
  /** An empty directory for the pools. */
  dir: string;
  host: string;
  log: Logger;
}

async function inBatches<T>(count: number, batch: number, run: (index: number) => Promise<T>): Promise<T[]> {
  const results: T[] = [];
  for (let start = 0; start < count; start += batch) {
    const indexes = Array.from({ length: Math.min(batch, count - start) }, (_, offset) => start + offset);
    results.push(...(await Promise.all(indexes.map(run))));
  }
  return results;
}

export async function runCloneMemory(options: MemoryOptions & { clones: number }): Promise<CloneMemoryResult> {
  const pool = join(options.dir, 'clones');
  const clients: NbdClient[] = [];
  let port = await findFreePort(options.host);
  let server = await startClonebd(pool, options.host, port);
  try {
    const admin = new AdminClient(adminSocketPath(pool));
    const rssIdleBytes = await readRssBytes(server.pid);
    await admin.createVolume('base', BASE_SIZE);
    const base = await connect({ host: options.host, port }, 'base');
    await fillSequential(base);
    await base.disconnect();
    const rssBaseBytes = await readRssBytes(server.pid);
    options.log(`memory: creating ${options.clones} clones`);
    const started = performance.now();
    for (let i = 0; i < options.clones; i++) await admin.clone('base', `clone-${i}`);
    const createSeconds = (performance.now() - started) / 1000;
    const rssClonesBytes = await readRssBytes(server.pid);

    // A restarted server holds the clones without the garbage of writing the base.
    options.log('memory: restarting the server over the pool with the clones');
    await server.stop();
    port = await findFreePort(options.host);
    server = await startClonebd(pool, options.host, port);
    const pid = server.pid;
    const rssRestartedBytes = await readRssBytes(pid);

    const limit = await openFilesLimit(pid);
    const connections = limit === undefined ? options.clones : Math.max(0, Math.min(options.clones, Math.floor((limit - SPARE_DESCRIPTORS) / 2)));
    if (connections < options.clones) options.log(`memory: the server may open ${limit} files; connecting to ${connections} clones only`);
    options.log(`memory: opening ${connections} connections`);
    const blocks = BASE_SIZE / BLOCK;
    // Through the pool's Unix socket: the server caps connections per remote IP address, not these.
    const socket = { path: nbdSocketPath(pool) };
    await inBatches(connections, 50, async (i) => {
      const client = await connect(socket, `clone-${i}`);
      clients.push(client);
      await client.read((i % blocks) * BLOCK, BLOCK);
    });
    const rssConnectedBytes = await readRssBytes(pid);
    const data = Buffer.alloc(BLOCK, FILL_BYTE ^ 0xff);
    await inBatches(clients.length, 50, (i) => clients[i]!.write((i % blocks) * BLOCK, data));
    if (clients[0] !== undefined) await clients[0].flush();
    const rssWrittenBytes = await readRssBytes(pid);
    return {
      clones: options.clones,
      baseSize: BASE_SIZE,
      rssIdleBytes,
      rssBaseBytes,
      rssClonesBytes,
      createSeconds,
      rssRestartedBytes,
      connections: clients.length,
      rssConnectedBytes,
      rssWrittenBytes,
      openFiles: await countOpenFiles(pid),
      peakRssBytes: await readPeakRssBytes(pid),
    };
  } finally {
    await inBatches(clients.length, 100, (i) => clients[i]!.disconnect().catch(() => undefined));
    await server.stop();
    await rm(pool, { recursive: true, force: true });
  }
}

async function fileSize(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch {
    return undefined;
  }
}

interface ProbeOutput {
  heapBeforeBytes: number;
  heapAfterBytes: number;
  openMs: number;
}

export async function runMapMemory(options: MemoryOptions & { blocks: number }): Promise<MapMemoryResult> {
  const pool = join(options.dir, 'map');
  const name = 'scattered';
  try {
    let port = await findFreePort(options.host);
    let server = await startClonebd(pool, options.host, port);
    let writeSeconds: number;
    let extents: number;
    let rssAfterWriteBytes: number | undefined;
    let peakAfterWriteBytes: number | undefined;
    try {
      const admin = new AdminClient(adminSocketPath(pool));
      await admin.createVolume(name, MAP_VOLUME_SIZE);
      const client = await connect({ host: options.host, port }, name);
      try {
        options.log(`memory: writing ${options.blocks} random 4 KiB blocks into a 16 GiB volume`);
        const blocks = randomBlocks(MAP_VOLUME_SIZE / BLOCK, options.blocks, SEED);
        const started = performance.now();
        await writeBlocks(client, blocks, FLUSH_EVERY);
        writeSeconds = (performance.now() - started) / 1000;
        extents = await countWrittenExtents(client);
      } finally {
        await client.disconnect();
      }
      rssAfterWriteBytes = await readRssBytes(server.pid);
      peakAfterWriteBytes = await readPeakRssBytes(server.pid);
    } finally {
      await server.stop();
    }

    options.log('memory: restarting the server over the written pool');
    port = await findFreePort(options.host);
    const started = performance.now();
    server = await startClonebd(pool, options.host, port);
    const restartSeconds = (performance.now() - started) / 1000;
    let rssAfterRestartBytes: number | undefined;
    try {
      rssAfterRestartBytes = await readRssBytes(server.pid);
    } finally {
      await server.stop();
    }
    const checkpointBytes = await fileSize(join(pool, 'checkpoint'));
    let journalBytes = 0;
    for (const entry of await readdir(pool)) if (entry.startsWith('journal.')) journalBytes += (await fileSize(join(pool, entry))) ?? 0;

    options.log('memory: opening the stopped pool in an idle process');
    const { stdout } = await runTool(process.execPath, ['--expose-gc', PROBE_PATH, pool], PROBE_TIMEOUT_MS);
    const probe = JSON.parse(stdout.trim().split('\n').at(-1)!) as ProbeOutput;
    return {
      volumeSize: MAP_VOLUME_SIZE,
      blocks: options.blocks,
      flushEvery: FLUSH_EVERY,
      extents,
      writeSeconds,
      rssAfterWriteBytes,
      peakAfterWriteBytes,
      rssAfterRestartBytes,
      restartSeconds,
      checkpointBytes,
      journalBytes,
      probeHeapBytes: probe.heapAfterBytes - probe.heapBeforeBytes,
      probeOpenMs: probe.openMs,
    };
  } finally {
    await rm(pool, { recursive: true, force: true });
  }
}
