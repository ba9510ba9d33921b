export { NbdServer, DEFAULT_LIMITS, BLOCK_SIZES, checkServerSettings } from './nbd-server.js';
export type { ServerOptions, ServerLimits, ServerTls, ListenTarget, ListenOptions } from './nbd-server.js';
export { AccessPolicy, loadAccessFile, parseAccessConfig } from './access.js';
export { loadTlsCredentials, type TlsFiles, type TlsCredentials } from './tls.js';
export type { TlsMode } from '../nbd/server-handshake.js';
