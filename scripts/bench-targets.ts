/**
 * Targets: ways to start a server over an export of one layout (bench-layouts.ts). Each export gets
 * a directory of its own (all on one filesystem), a server on 127.0.0.1 at a port chosen at run
 * time, and the layout's starting state:
 *
 *   layout    clonebd (own pool per layout)      qemu-nbd                         nbdkit
 *   plain     volume written in full             raw file written in full         same
 *   fresh     empty volume                       sparse raw file                  same
 *   clone     clone of a volume written in full  qcow2 overlay over a full raw    cow filter over a full raw
 *   depth32   32 clones, writes at each level    32 qcow2 overlays, same writes   —
 *
 * The full raw base and qcow2 levels 1..31 are built once per run and shared (read-only backing
 * files); each export's own top (overlay, fresh file, clone) is rebuilt after a job writes to it.
 * clonebd's copy-on-write exports live in pools of their own, each with its own base, so a
 * server's files, RSS and CPU are only its layout's.
 *
 * qemu-nbd runs with `-t` (persistent): without it, it exits when the first client disconnects,
 * and fio connects once per job. qemu-nbd and nbdkit serve one image per process, so rebuilding
 * their export restarts the server (at a new port).
 */
import { open, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { serverEnvironment } from '../src/cli/server-env.js';
import { adminSocketPath } from '../src/cli/serve.js';
import { AdminClient } from '../src/control/admin-client.js';
import { Pool } from '../src/store/index.js';
import { findFreePort, runTool, startServer, type ServerChild } from './bench-child.js';
import { parseFioReport, prefillJobArgs } from './bench-fio.js';
import { CHAIN_DEPTH, levelBlocks, levelVolumeName, qemuIoScript, type Layout } from './bench-layouts.js';
import { connect, writeBlocks } from './bench-nbd.js';

export const EXPORT_NAME = 'bench';
/** The fully written volume a clonebd copy-on-write layout is cloned from. */
const BASE_NAME = 'base';
const PREFILL_TIMEOUT_MS = 30 * 60_000;
const TOOL_TIMEOUT_MS = 10 * 60_000;

export type Logger = (message: string) => void;

/** Files built once per run and shared by every target that needs them; each is built on first use. */
export interface SharedFiles {
  /** A raw file of the export size, written in full. */
  rawBase(): Promise<string>;
  /** qcow2 chain levels 1..CHAIN_DEPTH-1 over rawBase, each with its level's writes, bottom first. */
  qcowChain(): Promise<string[]>;
}

export interface TargetContext {
  /** This export's own directory. */
  dir: string;
  exportSize: number;
  host: string;
  log: Logger;
  shared: SharedFiles;
}

export interface RunningExport {
  /** The name in tables; differs from the target's when the server had to fall back. */
  readonly name: string;
  readonly layout: Layout;
  /** How the server was first started. */
  readonly command: string;
  /** Where the export is now (a rebuild may move it to a new port). */
  readonly uri: string;
  /** The process serving it now. */
  readonly server: ServerChild;
  /** Facts a reader of the results must know (fallbacks, checks that failed). */
  readonly notes: readonly string[];
  /** Every file that holds the export's data or metadata, whole chain included, for cache control. */
  backingFiles(): Promise<string[]>;
  /** Brings the export back to its layout's starting state after a job wrote to it. */
  rebuild(): Promise<void>;
}

export interface Target {
  readonly name: string;
  readonly description: string;
  /** The target this one repeats as a fairness control; their ratio must be 1.0 ± 0.1. */
  readonly controlOf?: string;
  /** The layouts this server can serve, and how, for the report. */
  readonly layouts: Readonly<Partial<Record<Layout, string>>>;
  setup(context: TargetContext, layout: Layout): Promise<RunningExport>;
}

export function nbdUri(host: string, port: number, exportName = EXPORT_NAME): string {
  return `nbd://${host}:${port}/${exportName}`;
}

async function createSparseFile(path: string, size: number): Promise<void> {
  const handle = await open(path, 'wx');
  try {
    await handle.truncate(size);
  } finally {
    await handle.close();
  }
}

async function regularFilesUnder(dir: string): Promise<string[]> {
  const files: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...(await regularFilesUnder(path)));
    else if (entry.isFile()) files.push(path);
  }
  return files.sort();
}

/** Writes the whole export once through its server; throws unless fio wrote every byte. */
async function prefill(context: TargetContext, uri: string): Promise<void> {
  const output = join(context.dir, 'prefill.json');
  context.log(`prefilling ${uri}`);
  await runTool('fio', prefillJobArgs(uri, output), PREFILL_TIMEOUT_MS);
  const result = parseFioReport(await readFile(output, 'utf8'));
  if (result.ioBytes !== context.exportSize) {
    throw new Error(`prefill of ${uri} wrote ${result.ioBytes} bytes, expected ${context.exportSize}`);
  }
}

async function writeRawFile(path: string, size: number, outputDir: string): Promise<void> {
  await createSparseFile(path, size);
  const output = join(outputDir, 'raw-base.json');
  await runTool(
    'fio',
    [
      '--name=raw-base',
      `--filename=${path}`,
      '--ioengine=psync',
      '--rw=write',
      '--bs=1M',
      `--size=${size}`,
      '--fallocate=none',
      '--end_fsync=1',
      '--output-format=json',
      `--output=${output}`,
    ],
    PREFILL_TIMEOUT_MS,
  );
  const result = parseFioReport(await readFile(output, 'utf8'));
  if (result.ioBytes !== size) throw new Error(`writing ${path} wrote ${result.ioBytes} bytes, expected ${size}`);
}

/** A qcow2 overlay over `backing`, holding chain level `level`'s writes. */
async function qcowLevel(path: string, backing: string, backingFormat: 'raw' | 'qcow2', level: number, size: number): Promise<void> {
  await rm(path, { force: true });
  await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', backingFormat, path], TOOL_TIMEOUT_MS);
  await runTool('qemu-io', ['-f', 'qcow2', '-t', 'writeback', path], TOOL_TIMEOUT_MS, qemuIoScript(levelBlocks(size, level)));
}

async function qcowOverlay(path: string, backing: string): Promise<void> {
  await rm(path, { force: true });
  await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'raw', path], TOOL_TIMEOUT_MS);
}

function memo<T>(make: () => Promise<T>): () => Promise<T> {
  let made: Promise<T> | undefined;
  return () => (made ??= make());
}

export function sharedFiles(dir: string, exportSize: number, log: Logger): SharedFiles {
  const rawBase = memo(async () => {
    const path = join(dir, 'base.raw');
    log(`shared: writing the raw base ${path}`);
    await writeRawFile(path, exportSize, dir);
    return path;
  });
  const qcowChain = memo(async () => {
    const base = await rawBase();
    const levels: string[] = [];
    log(`shared: building qcow2 levels 1..${CHAIN_DEPTH - 1}`);
    for (let level = 1; level < CHAIN_DEPTH; level++) {
      const path = join(dir, `level-${String(level).padStart(2, '0')}.qcow2`);
      await qcowLevel(path, levels.at(-1) ?? base, level === 1 ? 'raw' : 'qcow2', level, exportSize);
      levels.push(path);
    }
    return levels;
  });
  return { rawBase, qcowChain };
}

/**
 * An export whose server serves one image: a rebuild stops the server, remakes the image and
 * starts a new server on a new port.
 */
class RestartingExport implements RunningExport {
  readonly name: string;
  readonly layout: Layout;
  readonly command: string;
  readonly #notes: string[];
  readonly #host: string;
  readonly #start: (port: number) => Promise<ServerChild>;
  readonly #remake: () => Promise<void>;
  readonly #files: () => Promise<string[]>;
  #server: ServerChild;
  #uri: string;

  private constructor(
    name: string,
    layout: Layout,
    notes: readonly string[],
    host: string,
    start: (port: number) => Promise<ServerChild>,
    remake: () => Promise<void>,
    files: () => Promise<string[]>,
    server: ServerChild,
    port: number,
  ) {
    this.name = name;
    this.layout = layout;
    this.#notes = [...notes];
    this.#host = host;
    this.#start = start;
    this.#remake = remake;
    this.#files = files;
    this.#server = server;
    this.command = server.command;
    this.#uri = nbdUri(host, port);
  }

  /** Makes the image, starts the server, and runs `ready` (a prefill) against it; stops it on failure. */
  static async start(options: {
    name: string;
    layout: Layout;
    notes?: readonly string[];
    host: string;
    make: () => Promise<void>;
    start: (port: number) => Promise<ServerChild>;
    files: () => Promise<string[]>;
    ready?: (uri: string) => Promise<void>;
  }): Promise<RestartingExport> {
    await options.make();
    const port = await findFreePort(options.host);
    const server = await options.start(port);
    try {
      await options.ready?.(nbdUri(options.host, port));
    } catch (error) {
      await server.stop();
      throw error;
    }
    return new RestartingExport(options.name, options.layout, options.notes ?? [], options.host, options.start, options.make, options.files, server, port);
  }

  get uri(): string {
    return this.#uri;
  }

  get server(): ServerChild {
    return this.#server;
  }

  get notes(): readonly string[] {
    return this.#notes;
  }

  note(text: string): void {
    this.#notes.push(text);
  }

  backingFiles(): Promise<string[]> {
    return this.#files();
  }

  async rebuild(): Promise<void> {
    if (this.layout === 'plain') return;
    await this.#server.stop();
    await this.#remake();
    const port = await findFreePort(this.#host);
    this.#server = await this.#start(port);
    this.#uri = nbdUri(this.#host, port);
  }
}

/** The built CLI: dist/scripts → dist/src. */
export const CLI_PATH = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

/** As `npm start` runs it: io_uring on and a 16-thread libuv pool, unless the environment says otherwise. */
export function startClonebd(pool: string, host: string, port: number): Promise<ServerChild> {
  return startServer(
    process.execPath,
    [CLI_PATH, 'serve', '--pool', pool, '--listen', `${host}:${port}`, '--no-default-volume', '--log-level', 'warn'],
    host,
    port,
    serverEnvironment(),
  );
}

/** A clonebd server over a pool of its own; rebuilds go through the admin API, the server stays. */
class ClonebdExport implements RunningExport {
  readonly name = 'clonebd';
  readonly layout: Layout;
  readonly command: string;
  readonly uri: string;
  readonly server: ServerChild;
  readonly notes: readonly string[] = [];
  readonly #context: TargetContext;
  readonly #pool: string;
  readonly #admin: AdminClient;
  readonly #port: number;

  private constructor(context: TargetContext, layout: Layout, pool: string, server: ServerChild, port: number) {
    this.#context = context;
    this.layout = layout;
    this.#pool = pool;
    this.server = server;
    this.command = server.command;
    this.#port = port;
    this.uri = nbdUri(context.host, port);
    this.#admin = new AdminClient(adminSocketPath(pool));
  }

  static async setup(context: TargetContext, layout: Layout): Promise<ClonebdExport> {
    const pool = join(context.dir, 'pool');
    const store = await Pool.open(pool);
    try {
      await store.createVolume(layout === 'clone' || layout === 'depth32' ? BASE_NAME : EXPORT_NAME, context.exportSize);
    } finally {
      await store.close();
    }
    const port = await findFreePort(context.host);
    const server = await startClonebd(pool, context.host, port);
    const running = new ClonebdExport(context, layout, pool, server, port);
    try {
      await running.#build();
    } catch (error) {
      await server.stop();
      throw error;
    }
    return running;
  }

  backingFiles(): Promise<string[]> {
    return regularFilesUnder(this.#pool);
  }

  async #build(): Promise<void> {
    const { host } = this.#context;
    switch (this.layout) {
      case 'plain':
        await prefill(this.#context, this.uri);
        return;
      case 'fresh':
        return;
      case 'clone':
        await prefill(this.#context, nbdUri(host, this.#port, BASE_NAME));
        await this.#admin.clone(BASE_NAME, EXPORT_NAME);
        return;
      case 'depth32':
        await prefill(this.#context, nbdUri(host, this.#port, BASE_NAME));
        this.#context.log(`clonebd: building ${CHAIN_DEPTH} clone levels`);
        for (let level = 1; level <= CHAIN_DEPTH; level++) {
          await this.#admin.clone(level === 1 ? BASE_NAME : levelVolumeName(level - 1, EXPORT_NAME), levelVolumeName(level, EXPORT_NAME));
          await this.#writeLevel(level);
        }
        return;
    }
  }

  async #writeLevel(level: number): Promise<void> {
    const client = await connect({ host: this.#context.host, port: this.#port }, levelVolumeName(level, EXPORT_NAME));
    try {
      await writeBlocks(client, levelBlocks(this.#context.exportSize, level));
    } finally {
      await client.disconnect();
    }
  }

  async rebuild(): Promise<void> {
    if (this.layout === 'plain') return;
    await this.#admin.delete(EXPORT_NAME, true);
    switch (this.layout) {
      case 'fresh':
        await this.#admin.createVolume(EXPORT_NAME, this.#context.exportSize);
        return;
      case 'clone':
        await this.#admin.clone(BASE_NAME, EXPORT_NAME);
        return;
      case 'depth32':
        await this.#admin.clone(levelVolumeName(CHAIN_DEPTH - 1, EXPORT_NAME), EXPORT_NAME);
        await this.#writeLevel(CHAIN_DEPTH);
        return;
    }
  }
}

const clonebd: Target = {
  name: 'clonebd',
  description: 'clonebd serve, one pool per layout',
  layouts: {
    plain: 'a volume written in full',
    fresh: 'an empty volume',
    clone: 'a clone of a volume written in full',
    depth32: `a clone ${CHAIN_DEPTH} levels deep over a volume written in full, each level with its own writes`,
  },
  setup: (context, layout) => ClonebdExport.setup(context, layout),
};

function nbdkitTarget(name: string, controlOf?: string): Target {
  return {
    name,
    description: 'nbdkit file plugin',
    ...(controlOf === undefined ? {} : { controlOf }),
    layouts: {
      plain: 'raw file written in full',
      fresh: 'sparse raw file',
      clone: 'cow filter (64 KiB blocks, overlay in a temporary file) over a raw file written in full',
    },
    async setup(context, layout) {
      const serve = (file: string, filters: readonly string[]) => (port: number) =>
        startServer(
          'nbdkit',
          ['--foreground', '--exit-with-parent', '-p', String(port), '-i', context.host, ...filters, 'file', file],
          context.host,
          port,
          // The cow filter's overlay lives in TMPDIR: keep it on the exports' filesystem.
          { ...process.env, TMPDIR: context.dir },
        );
      if (layout === 'clone') {
        const base = await context.shared.rawBase();
        return RestartingExport.start({
          name,
          layout,
          host: context.host,
          make: async () => undefined,
          start: serve(base, ['--filter=cow']),
          files: async () => [base],
        });
      }
      const file = join(context.dir, 'disk.raw');
      return RestartingExport.start({
        name,
        layout,
        host: context.host,
        make: async () => {
          await rm(file, { force: true });
          await createSparseFile(file, context.exportSize);
        },
        start: serve(file, []),
        files: async () => [file],
        ...(layout === 'plain' ? { ready: (uri: string) => prefill(context, uri) } : {}),
      });
    },
  };
}

async function hasIoUring(pid: number): Promise<boolean> {
  const dir = `/proc/${pid}/fd`;
  for (const fd of await readdir(dir)) {
    try {
      if ((await readlink(join(dir, fd))) === 'anon_inode:[io_uring]') return true;
    } catch {
      // the descriptor closed while we looked
    }
  }
  return false;
}

interface QemuImage {
  file: string;
  format: 'raw' | 'qcow2';
  make: () => Promise<void>;
  files: () => Promise<string[]>;
  prefilled: boolean;
}

async function qemuImage(context: TargetContext, layout: Layout): Promise<QemuImage> {
  const { dir, exportSize, shared } = context;
  switch (layout) {
    case 'plain':
    case 'fresh': {
      const file = join(dir, 'disk.raw');
      return {
        file,
        format: 'raw',
        make: async () => {
          await rm(file, { force: true });
          await createSparseFile(file, exportSize);
        },
        files: async () => [file],
        prefilled: layout === 'plain',
      };
    }
    case 'clone': {
      const base = await shared.rawBase();
      const file = join(dir, 'overlay.qcow2');
      return { file, format: 'qcow2', make: () => qcowOverlay(file, base), files: async () => [base, file], prefilled: false };
    }
    case 'depth32': {
      const base = await shared.rawBase();
      const chain = await shared.qcowChain();
      const file = join(dir, 'top.qcow2');
      return {
        file,
        format: 'qcow2',
        make: () => qcowLevel(file, chain.at(-1)!, 'qcow2', CHAIN_DEPTH, exportSize),
        files: async () => [base, ...chain, file],
        prefilled: false,
      };
    }
  }
}

const QEMU_LAYOUTS = {
  plain: 'raw file written in full',
  fresh: 'sparse raw file',
  clone: 'qcow2 overlay (64 KiB clusters) over a raw file written in full',
  depth32: `${CHAIN_DEPTH} qcow2 overlays over a raw file written in full, each level with the same writes as clonebd's`,
} as const;

function qemuArgs(context: TargetContext, image: QemuImage, port: number, cacheAndAio: readonly string[]): string[] {
  return ['-f', image.format, ...cacheAndAio, '-t', '-b', context.host, '-p', String(port), '-x', EXPORT_NAME, image.file];
}

/**
 * qemu-nbd with io_uring; where the kernel refuses io_uring it runs with the thread pool instead and
 * says so in its name, so no table claims io_uring figures it did not measure.
 */
const qemuNbdIoUring: Target = {
  name: 'qemu-nbd-io_uring',
  description: 'qemu-nbd --cache=writeback --aio=io_uring',
  layouts: QEMU_LAYOUTS,
  async setup(context, layout) {
    const image = await qemuImage(context, layout);
    const attempt = (name: string, aio: string, notes: readonly string[]) =>
      RestartingExport.start({
        name,
        layout,
        notes,
        host: context.host,
        make: image.make,
        start: (port) => startServer('qemu-nbd', qemuArgs(context, image, port, ['--cache=writeback', `--aio=${aio}`]), context.host, port),
        files: image.files,
        ...(image.prefilled ? { ready: (uri: string) => prefill(context, uri) } : {}),
      });
    let running: RestartingExport;
    try {
      running = await attempt('qemu-nbd-io_uring', 'io_uring', []);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      if (!/io_uring/i.test(message) || /prefill/.test(message)) throw error;
      context.log(`qemu-nbd-io_uring: io_uring refused, falling back to --aio=threads\n${message}`);
      return attempt('qemu-nbd-threads', 'threads', ['io_uring was refused here; this column is qemu-nbd --cache=writeback --aio=threads']);
    }
    if (image.prefilled && !(await hasIoUring(running.server.pid))) running.note('no io_uring instance found in /proc/PID/fd after prefill');
    return running;
  },
};

const qemuNbdNative: Target = {
  name: 'qemu-nbd-native',
  description: 'qemu-nbd --cache=none --aio=native (O_DIRECT, Linux AIO)',
  layouts: QEMU_LAYOUTS,
  async setup(context, layout) {
    const image = await qemuImage(context, layout);
    return RestartingExport.start({
      name: 'qemu-nbd-native',
      layout,
      host: context.host,
      make: image.make,
      start: (port) => startServer('qemu-nbd', qemuArgs(context, image, port, ['--cache=none', '--aio=native']), context.host, port),
      files: image.files,
      ...(image.prefilled ? { ready: (uri: string) => prefill(context, uri) } : {}),
    });
  },
};

/** Every target, in the default order of the first round. */
export const TARGETS: readonly Target[] = [
  clonebd,
  nbdkitTarget('nbdkit'),
  nbdkitTarget('nbdkit-2', 'nbdkit'),
  qemuNbdIoUring,
  qemuNbdNative,
];

/** The target the ratios are about. */
export const SUBJECT = 'clonebd';
