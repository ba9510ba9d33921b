/**
 * The one mapping from errno-style codes (ours and Node's fs errors) to NBD error values.
 * ENOTSUP goes on the wire only for FAST_ZERO requests, as the spec asks; a code we do not know
 * is EIO.
 */
import * as C from './constants.js';

const NBD_ERROR_BY_CODE: Readonly<Record<string, number>> = {
  EPERM: C.NBD_EPERM,
  EACCES: C.NBD_EPERM,
  EROFS: C.NBD_EPERM,
  EIO: C.NBD_EIO,
  ENOMEM: C.NBD_ENOMEM,
  EINVAL: C.NBD_EINVAL,
  ENOSPC: C.NBD_ENOSPC,
  EDQUOT: C.NBD_ENOSPC,
  EFBIG: C.NBD_ENOSPC,
  EOVERFLOW: C.NBD_EOVERFLOW,
  ENOTSUP: C.NBD_ENOTSUP,
  EOPNOTSUPP: C.NBD_ENOTSUP,
  ESHUTDOWN: C.NBD_ESHUTDOWN,
};

export function errorCodeOf(error: unknown): string | undefined {
  if (typeof error !== 'object' || error === null || !('code' in error)) return undefined;
  const code = (error as { code: unknown }).code;
  return typeof code === 'string' ? code : undefined;
}

export function nbdErrorFor(error: unknown, options: { fastZero: boolean }): number {
  const code = errorCodeOf(error);
  const value = (code === undefined ? undefined : NBD_ERROR_BY_CODE[code]) ?? C.NBD_EIO;
  if (value === C.NBD_ENOTSUP && !options.fastZero) return C.NBD_EINVAL;
  return value;
}
