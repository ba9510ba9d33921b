/**
 * The admin API's client, used by the CLI and the CSI driver. Every failure is an
 * OperationError; a daemon that is not running is ENOTCONN.
 */
import { request as httpRequest } from 'node:http';
import { dirname } from 'node:path';
import { OperationError } from '../util/errors.js';
import { fromWireError, type WireError } from './http-json.js';
import type { Labels, PoolUsage } from '../store/index.js';
import type { VolumeView } from './admin-server.js';

export interface FlattenProgress {
  done: number;
  total: number;
}

/** The daemon's Unix socket, or its TCP admin address with the token it requires. */
export type AdminEndpoint = string | { host: string; port: number; token: string };

export class AdminClient {
  readonly #endpoint: AdminEndpoint;

  constructor(endpoint: AdminEndpoint) {
    this.#endpoint = endpoint;
  }

  poolStatus(): Promise<PoolUsage> {
    return this.#call('GET', '/v1/pool');
  }

  /** Waits until the pool's background work (compaction, hole punching) is done. */
  waitIdle(): Promise<PoolUsage> {
    return this.#call('POST', '/v1/pool/idle');
  }

  listVolumes(): Promise<VolumeView[]> {
    return this.#call('GET', '/v1/volumes');
  }

  showVolume(name: string): Promise<VolumeView> {
    return this.#call('GET', `/v1/volumes/${encodeURIComponent(name)}`);
  }

  createVolume(name: string, size: number, labels?: Labels): Promise<VolumeView> {
    return this.#call('POST', '/v1/volumes', { name, size, labels });
  }

  clone(source: string, name: string, size?: number, labels?: Labels): Promise<VolumeView> {
    return this.#call('POST', `/v1/volumes/${encodeURIComponent(source)}/clone`, { name, size, labels });
  }

  snapshot(source: string, name: string, labels?: Labels): Promise<VolumeView> {
    return this.#call('POST', `/v1/volumes/${encodeURIComponent(source)}/snapshot`, { name, labels });
  }

  grow(name: string, size: number): Promise<VolumeView> {
    return this.#call('POST', `/v1/volumes/${encodeURIComponent(name)}/grow`, { size });
  }

  delete(name: string, force = false): Promise<{ deleted: string }> {
    return this.#call('DELETE', `/v1/volumes/${encodeURIComponent(name)}${force ? '?force=1' : ''}`);
  }

  /** Flattens, reporting progress lines as the daemon sends them. */
  async flatten(name: string, onProgress?: (progress: FlattenProgress) => void): Promise<VolumeView> {
    let result: VolumeView | undefined;
    let failure: OperationError | undefined;
    await this.#stream('POST', `/v1/volumes/${encodeURIComponent(name)}/flatten`, (line) => {
      const message = JSON.parse(line) as { progress?: FlattenProgress; result?: VolumeView; error?: WireError };
      if (message.progress !== undefined) onProgress?.(message.progress);
      if (message.result !== undefined) result = message.result;
      if (message.error !== undefined) failure = fromWireError(message.error);
    });
    if (failure !== undefined) throw failure;
    if (result === undefined) throw new OperationError('EIO', 'flatten ended without a result');
    return result;
  }

  async #call<T>(method: string, path: string, body?: unknown): Promise<T> {
    let text = '';
    const status = await this.#stream(method, path, (line) => (text += line), body);
    const value: unknown = text === '' ? {} : JSON.parse(text);
    if (status >= 400) throw fromWireError((value as { error?: unknown }).error);
    return value as T;
  }

  /** Sends one request; hands the response body to `onLine` line by line; resolves to the status. */
  #stream(method: string, path: string, onLine: (line: string) => void, body?: unknown): Promise<number> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return new Promise((resolve, reject) => {
      const request = httpRequest(
        {
          ...(typeof this.#endpoint === 'string'
            ? { socketPath: this.#endpoint }
            : { host: this.#endpoint.host, port: this.#endpoint.port }),
          method,
          path,
          headers: {
            ...(payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }),
            ...(typeof this.#endpoint === 'string' ? {} : { authorization: `Bearer ${this.#endpoint.token}` }),
          },
        },
        (response) => {
          let pending = '';
          response.setEncoding('utf8');
          response.on('data', (chunk: string) => {
            pending += chunk;
            let newline = pending.indexOf('\n');
            while (newline >= 0) {
              onLine(pending.slice(0, newline));
              pending = pending.slice(newline + 1);
              newline = pending.indexOf('\n');
            }
          });
          response.on('end', () => {
            if (pending !== '') onLine(pending);
            resolve(response.statusCode ?? 500);
          });
          response.on('error', reject);
        },
      );
      request.on('error', (error: NodeJS.ErrnoException) => {
        if (error.code === 'ECONNREFUSED' || error.code === 'ENOENT') {
          const where =
            typeof this.#endpoint === 'string'
              ? `the pool ${dirname(this.#endpoint)}; start one with: clonebd serve --pool ${dirname(this.#endpoint)}`
              : `${this.#endpoint.host}:${this.#endpoint.port}`;
          reject(new OperationError('ENOTCONN', `no clonebd daemon is running on ${where}`, { cause: error }));
        } else {
          reject(new OperationError('EIO', `admin request failed: ${error.message}`, { cause: error }));
        }
      });
      request.end(payload);
    });
  }
}
