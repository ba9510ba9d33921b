/**
 * Volume, snapshot and pool commands: parse, call the daemon's admin API, print. Every command
 * finds the daemon through the pool directory, whose admin socket lives inside it.
 */
import type { Argv, CommandModule } from 'yargs';
import { AdminClient } from '../control/admin-client.js';
import type { VolumeView } from '../control/admin-server.js';
import type { Labels } from '../store/index.js';
import { OperationError, isOperationError, type ErrorCode } from '../util/errors.js';
import { readFileSync } from 'node:fs';
import { parseListen, parseSize } from './parse.js';
import { adminSocketPath, defaultPoolDir, nbdSocketPath } from './serve.js';
import { exportVolume, importFile } from './transfer.js';
import { stat } from 'node:fs/promises';

/** Exit codes by error, documented in the README; usage errors exit 2, anything else 1. */
export const EXIT_CODES: Readonly<Partial<Record<ErrorCode, number>>> = {
  ENOTCONN: 3,
  EEXIST: 4,
  ENOENT: 5,
  ERANGE: 6,
  ENOSPC: 7,
  EINVAL: 8,
  EBUSY: 9,
};

/** Only our own errors carry meaning: a file system's EEXIST is not "the name is taken". */
export function exitCodeFor(error: unknown): number {
  return (isOperationError(error) ? EXIT_CODES[error.code] : undefined) ?? 1;
}

interface PoolArgs {
  pool: string;
  json: boolean;
  admin: string | undefined;
  'admin-token-file': string | undefined;
}

function withPool<T>(yargs: Argv<T>): Argv<T & PoolArgs> {
  return yargs
    .option('pool', { type: 'string', default: defaultPoolDir(), describe: 'Pool directory of the daemon; env CLONEBD_POOL' })
    .option('json', { type: 'boolean', default: false, describe: 'Print JSON for scripts' })
    .option('admin', {
      type: 'string',
      default: process.env.CLONEBD_ADMIN,
      describe: 'Reach the daemon over TCP at HOST:PORT instead of the pool\'s socket; env CLONEBD_ADMIN',
    })
    .option('admin-token-file', {
      type: 'string',
      describe: 'File holding the admin token for --admin (or env CLONEBD_ADMIN_TOKEN)',
    }) as Argv<T & PoolArgs>;
}

/** A command module whose handler sees the arguments its builder declared. */
function command<A>(
  name: string,
  describe: string,
  builder: (yargs: Argv) => Argv<A>,
  handler: (args: A) => Promise<void> | void,
): CommandModule {
  return { command: name, describe, builder: builder as CommandModule['builder'], handler: handler as CommandModule['handler'] };
}

function client(args: PoolArgs): AdminClient {
  if (args.admin === undefined) return new AdminClient(adminSocketPath(args.pool));
  return new AdminClient({ ...parseListen(args.admin), token: readAdminToken(args['admin-token-file']) });
}

/** The token from a file (trimmed) or CLONEBD_ADMIN_TOKEN; never from the command line, where ps shows it. */
export function readAdminToken(file: string | undefined): string {
  const token = file === undefined ? process.env.CLONEBD_ADMIN_TOKEN : readFileSync(file, 'utf8').trim();
  if (token === undefined || token === '') {
    throw new OperationError('EINVAL', 'an admin token is needed: put it in a file given with --admin-token-file, or in CLONEBD_ADMIN_TOKEN');
  }
  return token;
}

function print(args: PoolArgs, value: unknown, text: () => string): void {
  process.stdout.write(args.json ? `${JSON.stringify(value, null, 2)}\n` : `${text()}\n`);
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let unit = 0;
  // Pick the unit from the rounded value, so 1 MiB - 1 B reads 1.00 MiB and not 1024.0 KiB.
  const rounded = (value: number): number => Number(value.toFixed(value < 10 ? 2 : 1));
  while (unit < units.length - 1 && rounded(bytes / 1024 ** unit) >= 1024) unit++;
  const value = bytes / 1024 ** unit;
  return unit === 0 ? `${bytes} B` : `${value.toFixed(rounded(value) < 10 ? 2 : 1)} ${units[unit]}`;
}

export function formatTable(headers: string[], rows: string[][]): string {
  const widths = headers.map((header, column) => Math.max(header.length, ...rows.map((row) => (row[column] ?? '').length)));
  const line = (cells: string[]): string =>
    cells.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

function volumeTable(volumes: VolumeView[], none = 'no volumes'): string {
  if (volumes.length === 0) return none;
  return formatTable(
    ['NAME', 'KIND', 'SIZE', 'USED', 'EXCLUSIVE', 'SHARED', 'PARENT', 'RO', 'CLIENTS'],
    volumes.map((v) => [
      v.name,
      v.kind,
      formatBytes(v.size),
      formatBytes(v.exclusiveBytes + v.sharedBytes),
      formatBytes(v.exclusiveBytes),
      formatBytes(v.sharedBytes),
      v.parent ?? '-',
      v.readOnly ? 'yes' : 'no',
      String(v.clients),
    ]),
  );
}

function volumeDetails(v: VolumeView): string {
  return formatTable(
    ['FIELD', 'VALUE'],
    [
      ['name', v.name],
      ['kind', v.kind],
      ['size', `${formatBytes(v.size)} (${v.size} bytes)`],
      ['exclusive', `${formatBytes(v.exclusiveBytes)} (${v.exclusiveBytes} bytes)`],
      ['shared', `${formatBytes(v.sharedBytes)} (${v.sharedBytes} bytes)`],
      ['parent', v.parent ?? '-'],
      ['read-only', v.readOnly ? 'yes' : 'no'],
      ['snapshots', v.snapshots.length === 0 ? '-' : v.snapshots.join(', ')],
      ['clients', String(v.clients)],
      ['created', v.createdAt],
      ['labels', Object.entries(v.labels).map(([key, value]) => `${key}=${value}`).join(', ') || '-'],
    ],
  );
}

function sizeOption<T>(yargs: Argv<T>, demand: boolean): Argv<T & { size: number | undefined }> {
  return yargs.option('size', {
    type: 'string',
    demandOption: demand,
    describe: 'Size: bytes, or with a unit (10G = 10GiB, 10GB = 10^10)',
    coerce: (text: string) => parseSize(text),
  }) as unknown as Argv<T & { size: number | undefined }>;
}

function labelOption<T>(yargs: Argv<T>): Argv<T & { label: Labels }> {
  return yargs.option('label', {
    type: 'string',
    array: true,
    describe: 'A KEY=VALUE note kept with it (repeatable)',
    coerce: (texts: string[]) => parseLabels(texts),
  }) as unknown as Argv<T & { label: Labels }>;
}

function parseLabels(texts: readonly string[]): Labels {
  const labels: Record<string, string> = {};
  for (const text of texts) {
    const at = text.indexOf('=');
    if (at <= 0) throw new OperationError('EINVAL', `--label wants KEY=VALUE, got ${JSON.stringify(text)}`);
    labels[text.slice(0, at)] = text.slice(at + 1);
  }
  return labels;
}

/** A terminal progress bar with rate and time left; a line a second when not on a terminal. */
export function progressReporter(label: string): (done: number, total: number) => void {
  const started = performance.now();
  let lastLine = -Infinity;
  let finished = false;
  return (done, total) => {
    if (finished) return;
    finished = done >= total;
    const now = performance.now();
    if (!process.stderr.isTTY && !finished && now - lastLine < 1000) return;
    lastLine = now;
    const seconds = (now - started) / 1000;
    const rate = seconds > 0 ? done / seconds : 0;
    const eta = rate > 0 ? (total - done) / rate : 0;
    const fraction = total === 0 ? 1 : done / total;
    const bar = '#'.repeat(Math.round(fraction * 30)).padEnd(30, '.');
    const text = `${label} [${bar}] ${(fraction * 100).toFixed(1)}% ${formatBytes(done)}/${formatBytes(total)} ${formatBytes(rate)}/s ETA ${eta.toFixed(0)}s`;
    if (process.stderr.isTTY) process.stderr.write(`\r${text}${finished ? '\n' : ''}`);
    else process.stderr.write(`${text}\n`);
  };
}

const volumeCommands: CommandModule[] = [
  command(
    'create <name>',
    'Create an empty volume',
    (y) =>
      labelOption(sizeOption(withPool(y), true))
        .positional('name', { type: 'string', demandOption: true })
        .example('$0 volume create db --size 10GiB', '')
        .example('$0 volume create db --size 10GiB --label team=payments', ''),
    async (args) => {
      const a = args as PoolArgs & { name: string; size: number; label: Labels | undefined };
      const volume = await client(a).createVolume(a.name, a.size, a.label);
      print(a, volume, () => `created volume ${volume.name} (${formatBytes(volume.size)})`);
    },
  ),
  command(
    'list',
    'List volumes and snapshots with their space use',
    (y) => withPool(y).example('$0 volume list --json', ''),
    async (args) => {
      const volumes = await client(args).listVolumes();
      print(args, volumes, () => volumeTable(volumes));
    },
  ),
  command(
    'show <name>',
    'Show one volume or snapshot',
    (y) => withPool(y).positional('name', { type: 'string', demandOption: true }).example('$0 volume show db', ''),
    async (args) => {
      const volume = await client(args).showVolume(args.name);
      print(args, volume, () => volumeDetails(volume));
    },
  ),
  command(
    'clone <source> <name>',
    'Clone a volume or snapshot instantly (no data is copied)',
    (y) =>
      labelOption(sizeOption(withPool(y), false))
        .positional('source', { type: 'string', demandOption: true })
        .positional('name', { type: 'string', demandOption: true })
        .example('$0 volume clone db db-test', '')
        .example('$0 volume clone db db-big --size 20GiB', 'a clone larger than its source'),
    async (args) => {
      const a = args as PoolArgs & { source: string; name: string; size: number | undefined; label: Labels | undefined };
      const volume = await client(a).clone(a.source, a.name, a.size, a.label);
      print(a, volume, () => `cloned ${a.source} as ${volume.name} (${formatBytes(volume.size)})`);
    },
  ),
  command(
    'grow <name>',
    'Grow a volume online; clients see the new size when they reconnect',
    (y) => sizeOption(withPool(y), true).positional('name', { type: 'string', demandOption: true }).example('$0 volume grow db --size 20GiB', ''),
    async (args) => {
      const a = args as PoolArgs & { name: string; size: number };
      const volume = await client(a).grow(a.name, a.size);
      print(a, volume, () => `${volume.name} is now ${formatBytes(volume.size)}`);
    },
  ),
  command(
    'flatten <name>',
    'Copy what a clone shares so it stands alone (online)',
    (y) => withPool(y).positional('name', { type: 'string', demandOption: true }).example('$0 volume flatten db-test', ''),
    async (args) => {
      const a = args;
      const report = a.json ? undefined : progressReporter(`flatten ${a.name}`);
      const volume = await client(a).flatten(a.name, (progress) => report?.(progress.done, progress.total));
      print(a, volume, () => `${volume.name} is flat: it shares nothing`);
    },
  ),
  command(
    'delete <name>',
    'Delete a volume; its clones and snapshots stay intact',
    (y) =>
      withPool(y)
        .positional('name', { type: 'string', demandOption: true })
        .option('force', { type: 'boolean', default: false, describe: 'Disconnect attached clients first' })
        .example('$0 volume delete db-test --force', ''),
    async (args) => {
      const a = args as PoolArgs & { name: string; force: boolean };
      const result = await client(a).delete(a.name, a.force);
      print(a, result, () => `deleted ${a.name}`);
    },
  ),
  command(
    'import <name> <file>',
    'Copy a raw image file into a volume (created with the file\'s size if absent); zero runs stay holes',
    (y) =>
      withPool(y)
        .positional('name', { type: 'string', demandOption: true })
        .positional('file', { type: 'string', demandOption: true })
        .example('$0 volume import db disk.raw', ''),
    async (args) => {
      const admin = client(args);
      const existing = await admin.showVolume(args.name).catch((error: unknown) => {
        if (isOperationError(error, 'ENOENT')) return undefined;
        throw error;
      });
      if (existing === undefined) await admin.createVolume(args.name, (await stat(args.file)).size);
      await importFile(nbdSocketPath(args.pool), args.name, args.file, args.json ? undefined : progressReporter(`import ${args.name}`));
      const volume = await admin.showVolume(args.name);
      print(args, volume, () => `imported ${args.file} into ${volume.name}`);
    },
  ),
  command(
    'export <name> <file>',
    'Copy a volume or snapshot into a raw image file; holes stay holes',
    (y) =>
      withPool(y)
        .positional('name', { type: 'string', demandOption: true })
        .positional('file', { type: 'string', demandOption: true })
        .example('$0 volume export db-monday backup.raw', ''),
    async (args) => {
      await exportVolume(nbdSocketPath(args.pool), args.name, args.file, args.json ? undefined : progressReporter(`export ${args.name}`));
      print(args, { exported: args.name, file: args.file }, () => `exported ${args.name} to ${args.file}`);
    },
  ),
];

const snapshotCommands: CommandModule[] = [
  command(
    'create <volume> <name>',
    'Take a read-only, point-in-time snapshot of a volume',
    (y) =>
      labelOption(withPool(y))
        .positional('volume', { type: 'string', demandOption: true })
        .positional('name', { type: 'string', demandOption: true })
        .example('$0 snapshot create db db-monday', ''),
    async (args) => {
      const a = args as PoolArgs & { volume: string; name: string; label: Labels | undefined };
      const snapshot = await client(a).snapshot(a.volume, a.name, a.label);
      print(a, snapshot, () => `snapshot ${snapshot.name} of ${a.volume} taken`);
    },
  ),
  command(
    'list [volume]',
    'List snapshots, of one volume or all',
    (y) => withPool(y).positional('volume', { type: 'string' }).example('$0 snapshot list db', ''),
    async (args) => {
      const a = args;
      const snapshots = (await client(a).listVolumes()).filter(
        (v) => v.kind === 'snapshot' && (a.volume === undefined || v.parent === a.volume),
      );
      print(a, snapshots, () => volumeTable(snapshots, 'no snapshots'));
    },
  ),
  command(
    'delete <name>',
    'Delete a snapshot; clones made from it stay intact',
    (y) =>
      withPool(y)
        .positional('name', { type: 'string', demandOption: true })
        .option('force', { type: 'boolean', default: false, describe: 'Disconnect attached clients first' })
        .example('$0 snapshot delete db-monday', ''),
    async (args) => {
      const a = args as PoolArgs & { name: string; force: boolean };
      const snapshot = await client(a).showVolume(a.name);
      if (snapshot.kind !== 'snapshot') {
        throw new OperationError('EINVAL', `${a.name} is a volume; use 'clonebd volume delete'`);
      }
      const result = await client(a).delete(a.name, a.force);
      print(a, result, () => `deleted snapshot ${a.name}`);
    },
  ),
];

export const adminCommands: CommandModule[] = [
  command(
    'volume',
    'Create, list, clone, grow, flatten and delete volumes',
    (y) =>
      y
        .command(volumeCommands)
        .demandCommand(1, 'Name a volume command; see --help')
        .example('$0 volume create db --size 10GiB', 'an empty 10 GiB volume')
        .example('$0 volume clone db db-test', 'an instant writable copy'),
    () => undefined,
  ),
  command(
    'snapshot',
    'Create, list and delete snapshots',
    (y) =>
      y
        .command(snapshotCommands)
        .demandCommand(1, 'Name a snapshot command; see --help')
        .example('$0 snapshot create db db-monday', 'a read-only point in time of db'),
    () => undefined,
  ),
  command(
    'pool',
    'Pool status',
    (y) =>
      y
        .command(
          command(
            'status',
            'Capacity, use and layers of the pool',
            (yy) => withPool(yy).example('$0 pool status --json', ''),
            async (args) => {
              const status = await client(args).poolStatus();
              print(args, status, () =>
                formatTable(
                  ['CAPACITY', 'USED', 'FREE', 'LAYERS', 'VOLUMES'],
                  [
                    [
                      formatBytes(status.capacityBytes),
                      formatBytes(status.usedBytes),
                      formatBytes(status.freeBytes),
                      String(status.layers),
                      String(status.volumes.length),
                    ],
                  ],
                ),
              );
            },
          ),
        )
        .demandCommand(1, 'Name a pool command; see --help')
        .example('$0 pool status', 'capacity, use and layers'),
    () => undefined,
  ),
];
