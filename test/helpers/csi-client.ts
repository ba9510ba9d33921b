/**
 * A small CSI client for tests: one gRPC channel to a driver's Unix socket, built from the
 * project's csi.proto with the decoding options the driver uses (snake_case fields, enums as
 * names, int64 as numbers, defaults filled, oneofs named). Any RPC of any service is
 * `call(service, method, request)`; a failed call rejects with grpc-js's ServiceError, whose
 * status `codeOf` reads.
 */
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const PROTO_PATH = fileURLToPath(new URL('../../src/csi/csi.proto', import.meta.url));
const READY_TIMEOUT_MS = 10_000;

export type CsiServiceName = 'Identity' | 'Controller' | 'Node';

// Replies are read by tests field by field; their shapes are the proto's, checked by assertions.
export type CsiReply = Record<string, any>;

type UnaryMethod = (
  request: object,
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: (error: grpc.ServiceError | null, response?: CsiReply) => void,
) => grpc.ClientUnaryCall;

type ServiceClient = grpc.Client & Record<string, UnaryMethod | undefined>;

let packageCache: Record<CsiServiceName, grpc.ServiceClientConstructor> | undefined;

function csiPackage(): Record<CsiServiceName, grpc.ServiceClientConstructor> {
  if (packageCache === undefined) {
    const definition = protoLoader.loadSync(PROTO_PATH, { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
    const root = grpc.loadPackageDefinition(definition) as unknown as { csi: { v1: Record<CsiServiceName, grpc.ServiceClientConstructor> } };
    packageCache = root.csi.v1;
  }
  return packageCache;
}

/** `unix:///abs/path`, `unix:/abs/path` or a bare socket path. */
function target(endpoint: string): string {
  return endpoint.startsWith('unix:') ? endpoint : `unix://${endpoint}`;
}

export class CsiClient {
  readonly #clients = new Map<CsiServiceName, ServiceClient>();
  readonly #target: string;

  constructor(endpoint: string) {
    this.#target = target(endpoint);
  }

  /** Resolves with the decoded response, or rejects with the ServiceError of the failed call. */
  call<T extends CsiReply = CsiReply>(service: CsiServiceName, method: string, request: object = {}, timeoutMs = 60_000): Promise<T> {
    const client = this.#client(service);
    const rpc = client[method];
    if (typeof rpc !== 'function') return Promise.reject(new Error(`${service} has no RPC ${method} in csi.proto`));
    return new Promise((resolve, reject) => {
      rpc.call(client, request, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (error, response) => {
        if (error) reject(error);
        else resolve((response ?? {}) as T);
      });
    });
  }

  /** Waits until the driver's socket accepts a connection. */
  waitForReady(timeoutMs = READY_TIMEOUT_MS): Promise<void> {
    const client = this.#client('Identity');
    return new Promise((resolve, reject) => {
      client.waitForReady(Date.now() + timeoutMs, (error) => (error ? reject(error) : resolve()));
    });
  }

  close(): void {
    for (const client of this.#clients.values()) client.close();
    this.#clients.clear();
  }

  #client(service: CsiServiceName): ServiceClient {
    let client = this.#clients.get(service);
    if (client === undefined) {
      const Constructor = csiPackage()[service];
      client = new Constructor(this.#target, grpc.credentials.createInsecure()) as ServiceClient;
      this.#clients.set(service, client);
    }
    return client;
  }
}

/** The gRPC status code of a failed call, or undefined for anything that is no gRPC error. */
export function codeOf(error: unknown): grpc.status | undefined {
  if (typeof error === 'object' && error !== null && typeof (error as { code?: unknown }).code === 'number') {
    return (error as grpc.ServiceError).code;
  }
  return undefined;
}

/** Resolves with the ServiceError when `promise` fails with `code`; rejects otherwise. */
export async function expectStatus(promise: Promise<unknown>, code: grpc.status): Promise<grpc.ServiceError> {
  let outcome: unknown;
  try {
    outcome = await promise;
  } catch (error) {
    if (codeOf(error) === code) return error as grpc.ServiceError;
    throw new Error(`expected gRPC status ${grpc.status[code]}, got ${describe(error)}`, { cause: error });
  }
  throw new Error(`expected gRPC status ${grpc.status[code]}, got a response: ${JSON.stringify(outcome)}`);
}

function describe(error: unknown): string {
  const code = codeOf(error);
  const message = error instanceof Error ? error.message : String(error);
  return code === undefined ? message : `${grpc.status[code]} (${message})`;
}

export { status } from '@grpc/grpc-js';
