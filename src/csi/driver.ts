/**
 * The CSI driver's gRPC server: the Identity, Controller and Node services of csi.proto on one
 * Unix socket, each RPC served by a CsiHandler.
 *
 * A handler resolves the response or throws; a CsiError becomes its status and message, anything
 * else INTERNAL, logged here with its cause (handlers log their own refusals). An RPC of the proto
 * with no handler answers UNIMPLEMENTED, as does every RPC csi.proto leaves out.
 *
 * The socket. The endpoint is `unix:///absolute/path` (the form the CSI sidecars use). A socket
 * file left by a driver that died is removed before binding; one that still accepts connections
 * belongs to a live driver, and starting fails instead of stealing it. close() stops accepting,
 * lets calls in flight finish for a while, then cuts them, and removes the socket file.
 */
import { connect } from 'node:net';
import { lstat, mkdir, unlink } from 'node:fs/promises';
import { dirname, isAbsolute } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import type { Logger } from 'pino';
import { OperationError } from '../util/errors.js';
import { CsiError, type CsiHandler, type CsiHandlers, type CsiMessage } from './rpc.js';

/** The build copies csi.proto beside the compiled modules, so it is found the same way in src/ and dist/. */
export const CSI_PROTO_PATH = fileURLToPath(new URL('./csi.proto', import.meta.url));

export const CSI_LOADER_OPTIONS: protoLoader.Options = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

export const CSI_SERVICES = ['Identity', 'Controller', 'Node'] as const;
export type CsiServiceName = (typeof CSI_SERVICES)[number];

const SHUTDOWN_GRACE_MS = 5000;

export interface CsiDriverOptions {
  services: { Identity: CsiHandlers } & Partial<Record<CsiServiceName, CsiHandlers>>;
  logger: Logger;
}

let definitions: Record<CsiServiceName, grpc.ServiceDefinition> | undefined;

function serviceDefinitions(): Record<CsiServiceName, grpc.ServiceDefinition> {
  if (definitions === undefined) {
    const loaded = grpc.loadPackageDefinition(protoLoader.loadSync(CSI_PROTO_PATH, CSI_LOADER_OPTIONS)) as unknown as {
      csi: { v1: Record<CsiServiceName, grpc.ServiceClientConstructor> };
    };
    definitions = {
      Identity: loaded.csi.v1.Identity.service,
      Controller: loaded.csi.v1.Controller.service,
      Node: loaded.csi.v1.Node.service,
    };
  }
  return definitions;
}

/** The socket path of a `unix:///absolute/path` (or `unix:/absolute/path`) endpoint. */
export function socketPathOf(endpoint: string): string {
  const match = /^unix:(?:\/\/)?(\/.*)$/.exec(endpoint);
  const path = match?.[1];
  if (path === undefined || !isAbsolute(path) || path.includes('\0') || path.startsWith('//')) {
    throw new OperationError('EINVAL', `invalid CSI endpoint ${JSON.stringify(endpoint)}: expected unix:///absolute/path`);
  }
  return path;
}

/** Whether something accepts connections on the Unix socket at `path`. */
function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

async function removeStaleSocket(path: string): Promise<void> {
  const info = await lstat(path).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  });
  if (info === undefined) return;
  if (!info.isSocket()) throw new OperationError('EEXIST', `${path} exists and is not a socket`);
  if (await socketAnswers(path)) throw new OperationError('EEXIST', `another process serves ${path}`);
  await unlink(path);
}

export class CsiDriver {
  readonly #options: CsiDriverOptions;
  #server: grpc.Server | undefined;
  #socketPath: string | undefined;

  constructor(options: CsiDriverOptions) {
    this.#options = options;
  }

  /** Binds the endpoint and serves; resolves to the socket path. */
  async start(endpoint: string): Promise<string> {
    if (this.#server !== undefined) throw new OperationError('EINVAL', 'the CSI driver is already started');
    const path = socketPathOf(endpoint);
    await mkdir(dirname(path), { recursive: true });
    await removeStaleSocket(path);
    const server = new grpc.Server();
    const services = serviceDefinitions();
    for (const name of CSI_SERVICES) {
      const handlers = this.#options.services[name];
      if (handlers !== undefined) server.addService(services[name], this.#implementation(handlers));
    }
    await new Promise<void>((resolve, reject) => {
      server.bindAsync(`unix://${path}`, grpc.ServerCredentials.createInsecure(), (error) => (error ? reject(error) : resolve()));
    });
    this.#server = server;
    this.#socketPath = path;
    return path;
  }

  async close(): Promise<void> {
    const server = this.#server;
    const path = this.#socketPath;
    this.#server = undefined;
    this.#socketPath = undefined;
    if (server === undefined) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => server.forceShutdown(), SHUTDOWN_GRACE_MS);
      server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    if (path !== undefined) await unlink(path).catch(() => undefined);
  }

  #implementation(handlers: CsiHandlers): grpc.UntypedServiceImplementation {
    const implementation: grpc.UntypedServiceImplementation = {};
    for (const [rpc, handler] of Object.entries(handlers)) implementation[rpc] = this.#unary(rpc, handler);
    return implementation;
  }

  #unary(rpc: string, handler: CsiHandler): grpc.handleUnaryCall<CsiMessage, CsiMessage> {
    return (call, callback) => {
      Promise.resolve()
        .then(() => handler(call.request))
        .then(
          (response) => callback(null, response),
          (error: unknown) => {
            if (error instanceof CsiError) {
              callback({ code: error.code, details: error.message });
              return;
            }
            this.#options.logger.error({ rpc, err: error }, 'unexpected failure');
            callback({ code: grpc.status.INTERNAL, details: error instanceof Error ? error.message : String(error) });
          },
        );
    };
  }
}
