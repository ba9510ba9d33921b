/**
 * A BackingFile over an NBD export, through the native-free client, that can grow while in use.
 *
 * An NBD connection learns the export's size once, at NBD_OPT_GO, and the server holds each
 * connection to it. To grow, `refresh` opens a second connection, which reads the export's current
 * size; if that is larger, new requests go to it from then on (`size` changes in the same step),
 * and the old connection is retired: once the requests it still carries are answered, it is
 * flushed and closed. A FLUSH waits for any retirement first, so it covers the writes answered on
 * the old connection too, whatever the server's multi-conn semantics; if the old connection's
 * FLUSH failed, so does the next FLUSH.
 *
 *   conn A (size S) ─── requests ───┐
 *   refresh: conn B (size S' > S) ──┼── new requests ──▶ B
 *                                   └── A: drain, FLUSH, DISC
 *
 * The size never shrinks: a smaller or equal size leaves everything as it was.
 *
 * A connection that breaks is not replaced: writes answered on it but not yet flushed may be lost
 * with the server, and a FLUSH answered by a fresh connection would wrongly vouch for them. Every
 * request then fails (EIO at the file), and so does `refresh`, until the file is attached afresh.
 */
import { NbdClient, NbdError, type NbdTarget } from '../../native-free/index.js';

/** NBD's default maximum request size, used when the server does not advertise one. */
const DEFAULT_MAX_REQUEST = 32 << 20;
/** TRIM and WRITE_ZEROES lengths are 32-bit; ask for at most this much per request. */
const MAX_ZERO_REQUEST = 1 << 30;

interface Connection {
  client: NbdClient;
  /** Requests sent on it and not yet settled. */
  active: number;
  /** Woken when `active` drops to 0. */
  idle: (() => void) | undefined;
}

export class NbdBackingFile {
  readonly #target: NbdTarget;
  readonly #exportName: string;
  #current: Connection;
  /** Settles (never rejects) once every retired connection is flushed and closed. */
  #retiring: Promise<void> = Promise.resolve();
  /** Why a retirement's FLUSH failed, reported by the next `flush`. */
  #retireFailure: unknown;
  #refreshing: Promise<{ previous: number; size: number }> | undefined;

  private constructor(target: NbdTarget, exportName: string, client: NbdClient) {
    this.#target = target;
    this.#exportName = exportName;
    this.#current = { client, active: 0, idle: undefined };
  }

  static async open(target: NbdTarget, exportName: string): Promise<NbdBackingFile> {
    return new NbdBackingFile(target, exportName, await NbdClient.connect(target, { exportName, metaContexts: [] }));
  }

  get size(): number {
    return this.#current.client.size;
  }

  get readOnly(): boolean {
    return !this.#current.client.canWrite;
  }

  get #maxRequest(): number {
    return Math.min(this.#current.client.blockSizes?.maximum ?? DEFAULT_MAX_REQUEST, DEFAULT_MAX_REQUEST);
  }

  /** Runs `work` on the current connection, counted so that a retirement can wait for it. */
  async #use<T>(work: (client: NbdClient) => Promise<T>): Promise<T> {
    const connection = this.#current;
    connection.active += 1;
    try {
      return await work(connection.client);
    } finally {
      connection.active -= 1;
      if (connection.active === 0) connection.idle?.();
    }
  }

  /** Runs `each` over [offset, offset+length) in pieces of at most `max` bytes, all in flight at once. */
  async #pieces(offset: number, length: number, max: number, each: (client: NbdClient, at: number, size: number) => Promise<void>): Promise<void> {
    await this.#use(async (client) => {
      const requests: Promise<void>[] = [];
      for (let at = offset; at < offset + length; at += max) requests.push(each(client, at, Math.min(max, offset + length - at)));
      // Settled, not raced: the connection counts as busy until every piece is answered.
      const failed = (await Promise.allSettled(requests)).find((result) => result.status === 'rejected');
      if (failed !== undefined) throw failed.reason;
    });
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (length <= this.#maxRequest) return this.#use((client) => client.read(offset, length));
    const data = Buffer.allocUnsafe(length);
    await this.#pieces(offset, length, this.#maxRequest, async (client, at, size) => {
      (await client.read(at, size)).copy(data, at - offset);
    });
    return data;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.#pieces(offset, data.length, this.#maxRequest, (client, at, size) => client.write(at, data.subarray(at - offset, at - offset + size)));
  }

  async flush(): Promise<void> {
    await this.#retiring;
    if (this.#retireFailure !== undefined) {
      const failure = this.#retireFailure;
      this.#retireFailure = undefined;
      throw failure;
    }
    await this.#use(async (client) => {
      if (client.canFlush) await client.flush();
    });
  }

  async zero(offset: number, length: number, options: { punch: boolean }): Promise<void> {
    if (!this.#current.client.canZero) throw new NbdError('ENOTSUP', 'the export does not support WRITE_ZEROES');
    await this.#pieces(offset, length, MAX_ZERO_REQUEST, (client, at, size) => client.zero(at, size, { noHole: !options.punch }));
  }

  /**
   * Learns the export's current size on a fresh connection and switches to it if the export grew.
   * Calls made while one runs share it.
   */
  refresh(): Promise<{ previous: number; size: number }> {
    this.#refreshing ??= this.#refresh().finally(() => {
      this.#refreshing = undefined;
    });
    return this.#refreshing;
  }

  async #refresh(): Promise<{ previous: number; size: number }> {
    const previous = this.size;
    if (this.#current.client.closed) throw new NbdError('ECONNRESET', 'the connection to the export is gone; attach it afresh');
    const client = await NbdClient.connect(this.#target, { exportName: this.#exportName, metaContexts: [] });
    if (client.size <= previous || client.canWrite !== this.#current.client.canWrite) {
      await client.disconnect();
      return { previous, size: previous };
    }
    const old = this.#current;
    this.#current = { client, active: 0, idle: undefined };
    // A failed retirement fails the next FLUSH: the writes answered on it may not be durable.
    this.#retiring = this.#retiring
      .then(() => this.#retire(old))
      .catch((error: unknown) => {
        this.#retireFailure ??= error;
      });
    return { previous, size: client.size };
  }

  async #retire(connection: Connection): Promise<void> {
    if (connection.active > 0) await new Promise<void>((resolve) => (connection.idle = resolve));
    try {
      if (connection.client.canFlush && connection.client.canWrite) await connection.client.flush();
    } finally {
      await connection.client.disconnect().catch(() => undefined);
    }
  }

  /** Flushes and disconnects; the file serves nothing afterwards. */
  async close(): Promise<void> {
    try {
      await this.flush();
    } finally {
      await this.#current.client.disconnect().catch(() => undefined);
    }
  }
}
