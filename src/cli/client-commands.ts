/**
 * Client subcommands built on the native-free NBD client: `info`, `read`, `write`, `map`.
 * Each takes an NBD URI (`nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`).
 *
 * `read` and `write` move data in pieces of at most PIECE bytes with up to IN_FLIGHT requests
 * pipelined on one connection; output is written in order and waits for the stream to drain.
 */
import { createReadStream, createWriteStream } from 'node:fs';
import { once } from 'node:events';
import type { Readable, Writable } from 'node:stream';
import type { Argv, CommandModule } from 'yargs';
import { NbdClient, parseNbdUri, type Extent } from '../../native-free/index.js';
import { parseSize } from './parse.js';

const PIECE = 1 << 20;
const IN_FLIGHT = 8;
/** BLOCK_STATUS lengths are 32-bit; ask for at most this much per request. */
const MAP_REQUEST = 1 << 30;

async function withClient<T>(uri: string, run: (client: NbdClient) => Promise<T>): Promise<T> {
  const { target, exportName } = parseNbdUri(uri);
  const client = await NbdClient.connect(target, { exportName });
  try {
    return await run(client);
  } finally {
    await client.disconnect();
  }
}

async function writeOut(out: Writable, data: Buffer): Promise<void> {
  if (!out.write(data)) await once(out, 'drain');
}

async function endOut(out: Writable): Promise<void> {
  if (out === process.stdout) return;
  out.end();
  await once(out, 'finish');
}

// ---------------------------------------------------------------------------------------------
// info

export interface InfoReport {
  export: string;
  description: string | undefined;
  size: number;
  flags: number;
  structuredReplies: boolean;
  metaContexts: string[];
  blockSizes: { minimum: number; preferred: number; maximum: number } | undefined;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  canDf: boolean;
  canMultiConn: boolean;
  canCache: boolean;
}

export async function exportInfo(uri: string): Promise<InfoReport> {
  return withClient(uri, async (client) => ({
    export: client.exportName,
    description: client.description,
    size: client.size,
    flags: client.flags,
    structuredReplies: client.structuredReplies,
    metaContexts: [...client.metaContexts.keys()],
    blockSizes: client.blockSizes,
    readOnly: !client.canWrite,
    canFlush: client.canFlush,
    canFua: client.canFua,
    canTrim: client.canTrim,
    canZero: client.canZero,
    canFastZero: client.canFastZero,
    canDf: client.canDf,
    canMultiConn: client.canMultiConn,
    canCache: client.canCache,
  }));
}

export function formatInfo(report: InfoReport): string {
  const yesNo = (value: boolean): string => (value ? 'yes' : 'no');
  const lines = [
    `export: ${JSON.stringify(report.export)}`,
    ...(report.description === undefined ? [] : [`description: ${report.description}`]),
    `size: ${report.size}`,
    `flags: 0x${report.flags.toString(16)}`,
    `structured replies: ${yesNo(report.structuredReplies)}`,
    `meta contexts: ${report.metaContexts.join(' ') || '(none)'}`,
    ...(report.blockSizes === undefined
      ? []
      : [
          `block sizes: minimum ${report.blockSizes.minimum}, preferred ${report.blockSizes.preferred}, maximum ${report.blockSizes.maximum}`,
        ]),
    `read-only: ${yesNo(report.readOnly)}`,
    `can_flush: ${yesNo(report.canFlush)}`,
    `can_fua: ${yesNo(report.canFua)}`,
    `can_trim: ${yesNo(report.canTrim)}`,
    `can_zero: ${yesNo(report.canZero)}`,
    `can_fast_zero: ${yesNo(report.canFastZero)}`,
    `can_df: ${yesNo(report.canDf)}`,
    `can_multi_conn: ${yesNo(report.canMultiConn)}`,
    `can_cache: ${yesNo(report.canCache)}`,
  ];
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------
// read / write

/** Reads [offset, offset+length) into `out` in order, IN_FLIGHT pieces at a time. */
export async function readRange(uri: string, offset: number, length: number, out: Writable): Promise<void> {
  await withClient(uri, async (client) => {
    const queue: Promise<Buffer>[] = [];
    let next = offset;
    const end = offset + length;
    while (next < end || queue.length > 0) {
      while (next < end && queue.length < IN_FLIGHT) {
        const size = Math.min(PIECE, end - next);
        const piece = client.read(next, size);
        // Rejections are observed in order below; keep an early one from going unhandled.
        piece.catch(() => undefined);
        queue.push(piece);
        next += size;
      }
      await writeOut(out, await queue.shift()!);
    }
  });
}

/** Writes all of `input` from `offset`, then flushes; returns the number of bytes written. */
export async function writeRange(uri: string, offset: number, input: Readable): Promise<number> {
  return withClient(uri, async (client) => {
    const inFlight = new Set<Promise<void>>();
    let at = offset;
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let failure: unknown;
    const send = async (data: Buffer): Promise<void> => {
      const write = client.write(at, data).catch((error: unknown) => {
        failure ??= error;
      });
      at += data.length;
      inFlight.add(write);
      void write.then(() => inFlight.delete(write));
      if (inFlight.size >= IN_FLIGHT) await Promise.race(inFlight);
    };
    for await (const chunk of input as AsyncIterable<Buffer>) {
      pending.push(chunk);
      pendingBytes += chunk.length;
      while (pendingBytes >= PIECE) {
        const whole = Buffer.concat(pending, pendingBytes);
        await send(whole.subarray(0, PIECE));
        pending = [whole.subarray(PIECE)];
        pendingBytes -= PIECE;
      }
      if (failure !== undefined) break;
    }
    if (failure === undefined && pendingBytes > 0) await send(Buffer.concat(pending, pendingBytes));
    await Promise.all(inFlight);
    if (failure !== undefined) throw failure;
    if (client.canFlush) await client.flush();
    return at - offset;
  });
}

// ---------------------------------------------------------------------------------------------
// map

export interface MapEntry {
  offset: number;
  length: number;
  flags: number;
  type: string;
}

export function extentType(flags: number): string {
  const hole = (flags & 1) !== 0;
  const zero = (flags & 2) !== 0;
  if (hole && zero) return 'hole,zero';
  if (hole) return 'hole';
  if (zero) return 'zero';
  return 'data';
}

/** The whole export's `base:allocation` map, adjacent runs of the same kind merged. */
export async function exportMap(uri: string): Promise<MapEntry[]> {
  return withClient(uri, async (client) => {
    const entries: MapEntry[] = [];
    let offset = 0;
    while (offset < client.size) {
      const extents: Extent[] = await client.blockStatus(offset, Math.min(MAP_REQUEST, client.size - offset));
      for (const extent of extents) {
        const length = Math.min(extent.length, client.size - offset);
        if (length <= 0) break;
        const last = entries.at(-1);
        if (last !== undefined && last.flags === extent.flags) last.length += length;
        else entries.push({ offset, length, flags: extent.flags, type: extentType(extent.flags) });
        offset += length;
      }
    }
    return entries;
  });
}

// ---------------------------------------------------------------------------------------------
// yargs command modules

interface UriArgs {
  uri: string;
}

const withUri = <T>(command: Argv<T>): Argv<T & UriArgs> =>
  command.positional('uri', {
    type: 'string',
    demandOption: true,
    describe: 'nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH',
  }) as Argv<T & UriArgs>;

const sizeOption = (describe: string, demandOption: boolean) =>
  ({ type: 'string', describe, demandOption, coerce: parseSize }) as const;

const infoCommand: CommandModule<object, UriArgs & { json: boolean }> = {
  command: 'info <uri>',
  describe: "Show an NBD export's size, flags and features",
  builder: (command) =>
    withUri(command).option('json', { type: 'boolean', default: false, describe: 'Print JSON' }),
  handler: async (args) => {
    const report = await exportInfo(args.uri);
    process.stdout.write(args.json ? JSON.stringify(report, null, 2) + '\n' : formatInfo(report));
  },
};

const readCommand: CommandModule<object, UriArgs & { offset: number; length: number; out: string | undefined }> = {
  command: 'read <uri>',
  describe: 'Read a byte range of an NBD export to a file or stdout',
  builder: (command) =>
    withUri(command)
      .option('offset', { ...sizeOption('Start, in bytes (units allowed: 4K, 1MiB)', false), default: 0 })
      .option('length', sizeOption('Bytes to read', true))
      .option('out', { type: 'string', describe: 'Output file (default: stdout)' }) as Argv<
      UriArgs & { offset: number; length: number; out: string | undefined }
    >,
  handler: async (args) => {
    const out = args.out === undefined ? process.stdout : createWriteStream(args.out);
    await readRange(args.uri, args.offset, args.length, out);
    await endOut(out);
  },
};

const writeCommand: CommandModule<object, UriArgs & { offset: number; in: string | undefined }> = {
  command: 'write <uri>',
  describe: 'Write a file or stdin into an NBD export at an offset, then flush',
  builder: (command) =>
    withUri(command)
      .option('offset', { ...sizeOption('Start, in bytes (units allowed: 4K, 1MiB)', false), default: 0 })
      .option('in', { type: 'string', describe: 'Input file (default: stdin)' }) as Argv<
      UriArgs & { offset: number; in: string | undefined }
    >,
  handler: async (args) => {
    const input = args.in === undefined ? process.stdin : createReadStream(args.in);
    const written = await writeRange(args.uri, args.offset, input);
    process.stderr.write(`wrote ${written} bytes at offset ${args.offset}\n`);
  },
};

const mapCommand: CommandModule<object, UriArgs & { json: boolean }> = {
  command: 'map <uri>',
  describe: 'Print the allocation map (base:allocation) as "offset length type" lines',
  builder: (command) =>
    withUri(command).option('json', { type: 'boolean', default: false, describe: 'Print JSON' }),
  handler: async (args) => {
    const entries = await exportMap(args.uri);
    process.stdout.write(
      args.json
        ? JSON.stringify(entries, null, 2) + '\n'
        : entries.map((e) => `${e.offset} ${e.length} ${e.type}\n`).join(''),
    );
  },
};

/**
 * For `yargs().command(clientCommands)`. Each module is typed precisely above; the array takes
 * yargs' own element type for command lists, whose argument type is open.
 */
export const clientCommands: CommandModule<object, any>[] = [infoCommand, readCommand, writeCommand, mapCommand];
