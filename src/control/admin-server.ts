/**
 * The daemon's admin API: the store's lifecycle operations over JSON/HTTP, on a Unix socket
 * inside the pool (mode 0600, so only the pool's owner can reach it).
 *
 *   GET    /v1/pool                         pool status and usage
 *   GET    /v1/volumes                      volumes and snapshots
 *   POST   /v1/volumes                      { name, size }            create
 *   GET    /v1/volumes/NAME                 one volume or snapshot
 *   POST   /v1/volumes/NAME/clone           { name, size? }           clone
 *   POST   /v1/volumes/NAME/snapshot        { name }                  snapshot
 *   POST   /v1/volumes/NAME/grow            { size }                  grow
 *   POST   /v1/volumes/NAME/flatten                                   NDJSON progress lines, then the result
 *   DELETE /v1/volumes/NAME?force=1                                   delete
 *
 * With `listenTcp` the same API is also served over TCP, where every request must carry
 * `Authorization: Bearer TOKEN`; anything else gets 401 and reaches no handler.
 *
 * Attached clients are the server's business, so they are reached through `Attachments`,
 * passed in: deleting an attached volume is refused (EBUSY) unless forced, and forcing
 * disconnects its clients first.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createHash, timingSafeEqual } from 'node:crypto';
import type { AddressInfo, Socket } from 'node:net';
import { chmod, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { Labels, Pool, VolumeInfo, VolumeUsage } from '../store/index.js';
import { OperationError } from '../util/errors.js';
import { readJsonBody, sendJson, statusFor, toWireError } from './http-json.js';

/** A volume or snapshot as the admin API shows it. */
export interface VolumeView extends VolumeInfo {
  exclusiveBytes: number;
  sharedBytes: number;
  /** NBD connections attached to it now. */
  clients: number;
}

/** What the admin API needs of the store. */
export type AdminStore = Pick<
  Pool,
  | 'createVolume'
  | 'snapshot'
  | 'clone'
  | 'grow'
  | 'flatten'
  | 'delete'
  | 'volumes'
  | 'info'
  | 'usage'
  | 'idle'
  | 'mappedBytes'
>;

export interface Attachments {
  clientsOf(name: string): number;
  disconnect(name: string): Promise<void>;
}

export interface AdminServerOptions {
  store: AdminStore;
  attachments: Attachments;
  logger: Logger;
}

type Route = (request: IncomingMessage, response: ServerResponse, name: string | undefined, url: URL) => Promise<unknown>;

export class AdminServer {
  readonly #options: AdminServerOptions;
  readonly #server: Server;
  #tcpServer: Server | undefined;
  #path: string | undefined;

  constructor(options: AdminServerOptions) {
    this.#options = options;
    this.#server = createServer((request, response) => void this.#handle(request, response));
  }

  async listen(path: string): Promise<void> {
    await unlink(path).catch(() => undefined);
    // Until the socket is owner-only, anyone could connect: such connections are dropped.
    let ownerOnly = false;
    this.#server.on('connection', (socket: Socket) => {
      if (!ownerOnly) socket.destroy();
    });
    await new Promise<void>((resolve, reject) => {
      this.#server.once('error', reject);
      this.#server.listen(path, () => {
        this.#server.off('error', reject);
        resolve();
      });
    });
    await chmod(path, 0o600);
    ownerOnly = true;
    this.#path = path;
  }

  /** Serves the API over TCP too, to requests that carry the token. */
  async listenTcp(host: string, port: number, token: string): Promise<AddressInfo> {
    if (token.length < 16) throw new OperationError('EINVAL', 'the admin token must be at least 16 characters');
    const expected = digest(`Bearer ${token}`);
    const server = createServer((request, response) => {
      if (!timingSafeEqual(digest(request.headers.authorization ?? ''), expected)) {
        this.#options.logger.warn({ remote: request.socket.remoteAddress }, 'admin request without a valid token');
        sendJson(response, 401, { error: { code: 'EPERM', message: 'a valid admin token is required' } });
        return;
      }
      void this.#handle(request, response);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.#tcpServer = server;
    return server.address() as AddressInfo;
  }

  async close(): Promise<void> {
    for (const server of [this.#server, this.#tcpServer]) {
      if (server === undefined) continue;
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
    if (this.#path !== undefined) await unlink(this.#path).catch(() => undefined);
  }

  async #handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const url = new URL(request.url ?? '/', 'http://admin');
    const log = this.#options.logger;
    const started = performance.now();
    try {
      const { route, name } = this.#route(request.method ?? 'GET', url.pathname);
      const result = await route(request, response, name, url);
      if (!response.headersSent) sendJson(response, request.method === 'POST' ? 201 : 200, result ?? {});
      if (request.method !== 'GET') {
        log.info({ method: request.method, path: url.pathname, ms: Math.round(performance.now() - started) }, 'admin operation');
      }
    } catch (error) {
      const wire = toWireError(error);
      log.info({ method: request.method, path: url.pathname, code: wire.code, reason: wire.message }, 'admin operation failed');
      if (!response.headersSent) sendJson(response, statusFor(wire.code), { error: wire });
      else response.end(`${JSON.stringify({ error: wire })}\n`);
    }
  }

  #route(method: string, path: string): { route: Route; name?: string } {
    const parts = path.split('/').filter((part) => part !== '');
    if (parts[0] !== 'v1') throw new OperationError('ENOENT', `no such endpoint ${path}`);
    const name = parts[2] === undefined ? undefined : decodeURIComponent(parts[2]);
    const key = `${method} ${parts[1] ?? ''}${name === undefined ? '' : '/:name'}${parts[3] === undefined ? '' : `/${parts[3]}`}`;
    const route = this.#routes[key];
    if (route === undefined || parts.length > 4) throw new OperationError('ENOENT', `no such endpoint ${method} ${path}`);
    return { route, name };
  }

  readonly #routes: Readonly<Record<string, Route>> = {
    'GET pool': async () => this.#options.store.usage(),
    // Background work (compaction, hole punching) done: what is on disk is what the pool says.
    'POST pool/:name': async (_request, _response, action) => {
      if (action !== 'idle') throw new OperationError('ENOENT', `no such endpoint POST /v1/pool/${action}`);
      await this.#options.store.idle();
      return this.#options.store.usage();
    },
    'GET volumes': async () => {
      const usage = await this.#options.store.usage();
      return this.#options.store.volumes().map((volume) => this.#view(volume, usage.volumes));
    },
    'POST volumes': async (request) => {
      const body = await readJsonBody(request);
      const labels = field(body, 'labels') as Labels | undefined;
      return this.#newView(await this.#options.store.createVolume(requireName(body, 'name'), requireSize(body, 'size'), { labels }));
    },
    'GET volumes/:name': async (_request, _response, name) => {
      const volume = this.#options.store.info(name!);
      if (volume === undefined) throw new OperationError('ENOENT', `no volume or snapshot named "${name}"`);
      return this.#viewOf(volume);
    },
    'POST volumes/:name/clone': async (request, _response, name) => {
      const body = await readJsonBody(request);
      const size = optionalSize(body, 'size');
      const labels = field(body, 'labels') as Labels | undefined;
      const clone = await this.#options.store.clone(name!, requireName(body, 'name'), { labels, ...(size === undefined ? {} : { size }) });
      return this.#newView(clone);
    },
    'POST volumes/:name/snapshot': async (request, _response, name) => {
      const body = await readJsonBody(request);
      const labels = field(body, 'labels') as Labels | undefined;
      return this.#newView(await this.#options.store.snapshot(name!, requireName(body, 'name'), { labels }));
    },
    'POST volumes/:name/grow': async (request, _response, name) => {
      const body = await readJsonBody(request);
      return this.#viewOf(await this.#options.store.grow(name!, requireSize(body, 'size')));
    },
    'POST volumes/:name/flatten': async (_request, response, name) => {
      response.writeHead(200, { 'content-type': 'application/x-ndjson' });
      let lastReport = 0;
      await this.#options.store.flatten(name!, (done, total) => {
        const now = performance.now();
        if (now - lastReport < 100 && done < total) return;
        lastReport = now;
        response.write(`${JSON.stringify({ progress: { done, total } })}\n`);
      });
      const volume = this.#options.store.info(name!);
      if (volume === undefined) throw new OperationError('ENOENT', `"${name}" was deleted while it was flattened`);
      response.end(`${JSON.stringify({ result: await this.#viewOf(volume) })}\n`);
      return undefined;
    },
    'DELETE volumes/:name': async (_request, _response, name, url) => {
      const force = url.searchParams.get('force') === '1';
      const clients = this.#options.attachments.clientsOf(name!);
      if (clients > 0 && !force) {
        throw new OperationError('EBUSY', `"${name}" has ${clients} connected client(s); delete with force to disconnect them`);
      }
      if (clients > 0) await this.#options.attachments.disconnect(name!);
      await this.#options.store.delete(name!);
      return { deleted: name };
    },
  };

  #view(volume: VolumeInfo, usage: readonly VolumeUsage[]): VolumeView {
    const own = usage.find((entry) => entry.name === volume.name);
    return {
      ...volume,
      exclusiveBytes: own?.exclusiveBytes ?? 0,
      sharedBytes: own?.sharedBytes ?? 0,
      clients: this.#options.attachments.clientsOf(volume.name),
    };
  }

  async #viewOf(volume: VolumeInfo): Promise<VolumeView> {
    return this.#view(volume, (await this.#options.store.usage()).volumes);
  }

  /**
   * A volume, clone or snapshot just made owns nothing yet and shares all it maps with its
   * source: no pool-wide sweep, so creation answers in the same time however big the pool is.
   */
  #newView(volume: VolumeInfo): VolumeView {
    return { ...volume, exclusiveBytes: 0, sharedBytes: this.#options.store.mappedBytes(volume.name), clients: 0 };
  }
}

function field(body: unknown, key: string): unknown {
  return typeof body === 'object' && body !== null ? (body as Record<string, unknown>)[key] : undefined;
}

function requireName(body: unknown, key: string): string {
  const value = field(body, key);
  if (typeof value !== 'string' || value === '') throw new OperationError('EINVAL', `"${key}" must be a non-empty string`);
  return value;
}

function optionalSize(body: unknown, key: string): number | undefined {
  const value = field(body, key);
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw new OperationError('EINVAL', `"${key}" must be a positive whole number of bytes`);
  }
  return value;
}

function requireSize(body: unknown, key: string): number {
  const size = optionalSize(body, key);
  if (size === undefined) throw new OperationError('EINVAL', `"${key}" is required`);
  return size;
}

/** Compared as fixed-length digests, so the comparison takes the same time whatever was sent. */
function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}
