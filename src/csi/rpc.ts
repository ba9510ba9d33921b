/**
 * What every CSI service handler shares: a handler takes the decoded request (field names as in
 * the CSI spec, snake_case) and resolves to the response, or throws a CsiError carrying the gRPC
 * status code the spec names. The gRPC server turns anything else into INTERNAL.
 */
import { status } from '@grpc/grpc-js';

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
