/**
 * `volume import` and `volume export`: copy between a file and a volume through the daemon's
 * NBD socket in the pool, sparse-aware both ways. Export asks the server where the data is
 * (base:allocation) and leaves holes as holes in the file. Import cannot ask the file system
 * (Node has no SEEK_DATA), so it reads the whole file and sends runs of zeros as WRITE_ZEROES,
 * which the store records as holes.
 */
import { open } from 'node:fs/promises';
import { NbdClient } from '../../native-free/index.js';
import { NBD_STATE_ZERO } from '../nbd/constants.js';
import { errorCodeOf } from '../nbd/errno.js';
import { OperationError } from '../util/errors.js';

const PIECE = 4 * 1024 * 1024;
const ZERO_RUN = 64 * 1024;
const IN_FLIGHT = 8;
/** BLOCK_STATUS lengths are 32-bit: ask about at most this much at once. */
const STATUS_SPAN = 1024 * 1024 * 1024;

export type Progress = (done: number, total: number) => void;

/** Runs `tasks` with at most IN_FLIGHT of them pending; fails on the first failure. */
class Pipeline {
  readonly #pending = new Set<Promise<void>>();
  #failure: unknown;

  async add(task: () => Promise<void>): Promise<void> {
    if (this.#failure !== undefined) throw this.#failure;
    while (this.#pending.size >= IN_FLIGHT) await Promise.race(this.#pending);
    if (this.#failure !== undefined) throw this.#failure;
    const running = task().then(
      () => void this.#pending.delete(running),
      (error: unknown) => {
        this.#pending.delete(running);
        this.#failure ??= error;
      },
    );
    this.#pending.add(running);
  }

  async finish(): Promise<void> {
    await Promise.all(this.#pending);
    if (this.#failure !== undefined) throw this.#failure;
  }
}

export async function exportVolume(socketPath: string, name: string, file: string, progress?: Progress): Promise<void> {
  const client = await NbdClient.connect({ path: socketPath }, { exportName: name });
  const out = await open(file, 'w');
  try {
    await out.truncate(client.size);
    const pipeline = new Pipeline();
    let done = 0;
    for (let spanStart = 0; spanStart < client.size; spanStart += STATUS_SPAN) {
      const spanLength = Math.min(STATUS_SPAN, client.size - spanStart);
      let at = spanStart;
      for (const extent of await client.blockStatus(spanStart, spanLength)) {
        const extentEnd = Math.min(at + extent.length, spanStart + spanLength);
        for (let piece = at; piece < extentEnd; piece += PIECE) {
          const length = Math.min(PIECE, extentEnd - piece);
          if ((extent.flags & NBD_STATE_ZERO) !== 0) {
            done += length;
            continue;
          }
          await pipeline.add(async () => {
            const data = await client.read(piece, length);
            await out.write(data, 0, length, piece);
            done += length;
            progress?.(done, client.size);
          });
        }
        at = extentEnd;
      }
    }
    await pipeline.finish();
    await out.sync();
    progress?.(client.size, client.size);
  } finally {
    await out.close();
    await client.disconnect();
  }
}

/** Copies `file` into the volume from offset 0; the volume must be at least as large. */
export async function importFile(socketPath: string, name: string, file: string, progress?: Progress): Promise<void> {
  const input = await open(file, 'r');
  const client = await NbdClient.connect({ path: socketPath }, { exportName: name });
  try {
    const { size } = await input.stat();
    if (size > client.size) {
      throw new OperationError('ERANGE', `${file} (${size} bytes) does not fit in ${name} (${client.size} bytes)`);
    }
    const pipeline = new Pipeline();
    let done = 0;
    for (let offset = 0; offset < size; offset += PIECE) {
      const piece = Buffer.allocUnsafe(Math.min(PIECE, size - offset));
      const { bytesRead } = await input.read(piece, 0, piece.length, offset);
      if (bytesRead !== piece.length) throw new OperationError('EIO', `${file} changed size while it was imported`);
      for (let run = 0; run < piece.length; run += ZERO_RUN) {
        const bytes = piece.subarray(run, Math.min(run + ZERO_RUN, piece.length));
        const at = offset + run;
        await pipeline.add(async () => {
          if (isAllZero(bytes)) await client.zero(at, bytes.length);
          else await client.write(at, bytes);
          done += bytes.length;
          progress?.(done, size);
        });
      }
    }
    await pipeline.finish();
    await client.flush();
    progress?.(size, size);
  } catch (error) {
    if (errorCodeOf(error) === 'ENOSPC') {
      throw new OperationError('ENOSPC', `the pool is full: ${name} took part of ${file} before running out of space`, { cause: error });
    }
    throw error;
  } finally {
    await input.close();
    await client.disconnect();
  }
}

const ZEROES = Buffer.alloc(ZERO_RUN);

function isAllZero(bytes: Buffer): boolean {
  return bytes.equals(ZEROES.subarray(0, bytes.length));
}
