/**
 * What every CSI service handler shares: a handler takes the decoded request (field names as in
 * the CSI spec, snake_case) and resolves to the response, or throws a CsiError carrying the gRPC
 * status code the spec names. The gRPC server turns anything else into INTERNAL.
 *
 * `toCsiError` is the one place an errno-style OperationError (from the admin API) becomes a
 * gRPC status; `loggedHandlers` converts and logs once per call, at the service's edge.
 */
import { status } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { isOperationError, type ErrorCode } from '../util/errors.js';

export type CsiStatus = (typeof status)[keyof typeof status];

export class CsiError extends Error {
  readonly code: CsiStatus;

  constructor(code: CsiStatus, message: string) {
    super(message);
    this.name = 'CsiError';
    this.code = code;
  }
}

// The decoded message shapes are checked by the handlers themselves: requests come off the wire.
export type CsiMessage = Record<string, unknown>;
export type CsiHandler = (request: CsiMessage) => Promise<CsiMessage>;
export type CsiHandlers = Record<string, CsiHandler>;

const STATUS_BY_CODE: Readonly<Partial<Record<ErrorCode, CsiStatus>>> = {
  ENOENT: status.NOT_FOUND,
  EEXIST: status.ALREADY_EXISTS,
  ERANGE: status.OUT_OF_RANGE,
  ENOSPC: status.RESOURCE_EXHAUSTED,
  EINVAL: status.INVALID_ARGUMENT,
  EBUSY: status.FAILED_PRECONDITION,
  ENOTCONN: status.UNAVAILABLE,
  ESHUTDOWN: status.UNAVAILABLE,
};

/** The gRPC status of an error; INTERNAL for anything that is neither a CsiError nor a mapped code. */
export function toCsiError(error: unknown): CsiError {
  if (error instanceof CsiError) return error;
  if (isOperationError(error)) return new CsiError(STATUS_BY_CODE[error.code] ?? status.INTERNAL, error.message);
  return new CsiError(status.INTERNAL, error instanceof Error ? error.message : String(error));
}

// Identifiers worth a log line; everything else (secrets, contexts, paths) stays out of the logs.
const LOGGED_FIELDS = ['name', 'volume_id', 'snapshot_id', 'source_volume_id'] as const;

function requestSummary(request: CsiMessage): Record<string, string> {
  const summary: Record<string, string> = {};
  for (const field of LOGGED_FIELDS) {
    const value = request[field];
    if (typeof value === 'string' && value !== '') summary[field] = value;
  }
  return summary;
}

/**
 * Wraps each handler so that every failure leaves as a CsiError and each call is logged once:
 * calls named in `quiet` (polled by the CO) at debug, others at info; refusals at warn; INTERNAL
 * and UNAVAILABLE at error, with the real cause.
 */
export function loggedHandlers(logger: Logger, handlers: CsiHandlers, quiet: ReadonlySet<string> = new Set()): CsiHandlers {
  const wrapped: CsiHandlers = {};
  for (const [rpc, handler] of Object.entries(handlers)) {
    wrapped[rpc] = async (request) => {
      const log = logger.child({ rpc, request: requestSummary(request) });
      try {
        const response = await handler(request);
        if (quiet.has(rpc)) log.debug('done');
        else log.info('done');
        return response;
      } catch (error) {
        const converted = toCsiError(error);
        if (converted.code === status.INTERNAL || converted.code === status.UNAVAILABLE) {
          log.error({ err: error, code: status[converted.code] }, 'failed');
        } else {
          log.warn({ code: status[converted.code], reason: converted.message }, 'refused');
        }
        throw converted;
      }
    };
  }
  return wrapped;
}
