/**
 * One error class for everything the client reports. `code` is errno-style and stable:
 * compare it, never the message.
 *  - a server's error reply to a command: `errno` is the NBD error value, `code` its name
 *    ('EINVAL', 'EPERM', 'ENOSPC', ...); the connection stays usable;
 *  - a refused option during the handshake: `replyType` is the NBD_REP_ERR_* value;
 *  - a broken connection ('ECONNRESET') or a server that broke the protocol ('EPROTO'): every
 *    request in flight fails with it and the connection is gone.
 */
export class NbdError extends Error {
  readonly code: string;
  /** The NBD error value the server sent, for errors the server reported. */
  readonly errno: number | undefined;
  /** The NBD_REP_ERR_* value, for refused options. */
  readonly replyType: number | undefined;

  constructor(
    code: string,
    message: string,
    details: { errno?: number; replyType?: number; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'NbdError';
    this.code = code;
    this.errno = details.errno;
    this.replyType = details.replyType;
  }
}
