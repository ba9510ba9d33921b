/**
 * The admin API's transport: JSON over HTTP/1.1, on a Unix socket by default. Errors travel as
 * `{ error: { code, message } }` with an HTTP status derived from the errno-style code, so the
 * client can rebuild the same OperationError.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ERROR_CODES, OperationError, type ErrorCode } from '../util/errors.js';

export const MAX_BODY_BYTES = 64 * 1024;

const STATUS_BY_CODE: Readonly<Partial<Record<ErrorCode, number>>> = {
  EINVAL: 400,
  ERANGE: 400,
  EPERM: 403,
  ENOENT: 404,
  EEXIST: 409,
  EBUSY: 409,
  ENOSPC: 507,
  ESHUTDOWN: 503,
};

export function statusFor(code: ErrorCode): number {
  return STATUS_BY_CODE[code] ?? 500;
}

export interface WireError {
  code: ErrorCode;
  message: string;
}

export function toWireError(error: unknown): WireError {
  if (error instanceof OperationError) return { code: error.code, message: error.message };
  return { code: 'EIO', message: error instanceof Error ? error.message : String(error) };
}

export function fromWireError(value: unknown): OperationError {
  const wire = (value ?? {}) as Partial<WireError>;
  const code = ERROR_CODES.includes(wire.code as ErrorCode) ? (wire.code as ErrorCode) : 'EIO';
  return new OperationError(code, typeof wire.message === 'string' ? wire.message : 'unknown error');
}

export async function readJsonBody(request: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of request as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > MAX_BODY_BYTES) throw new OperationError('EINVAL', `request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk);
  }
  if (total === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (error) {
    throw new OperationError('EINVAL', 'request body is not valid JSON', { cause: error });
  }
}

export function sendJson(response: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  response.end(text);
}
