/**
 * Operation errors carry an errno-style `code`; each edge (NBD, admin API, CSI) maps the code
 * once. Compare codes, never messages.
 */
export const ERROR_CODES = [
  'EIO',
  'ENOSPC',
  'EINVAL',
  'EPERM',
  'EOVERFLOW',
  'ENOTSUP',
  'ENOENT',
  'EEXIST',
  'EBUSY',
  /** A size outside what the operation allows, e.g. a clone smaller than its source. */
  'ERANGE',
  'ESHUTDOWN',
  /** The daemon is not running (its admin socket refuses or is absent). */
  'ENOTCONN',
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

export class OperationError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'OperationError';
    this.code = code;
  }
}

export function isOperationError(error: unknown, code?: ErrorCode): error is OperationError {
  return error instanceof OperationError && (code === undefined || error.code === code);
}
