/** The pure-TypeScript NBD client: no native code, no libnbd, only node:net and src/nbd/. */
export { NbdClient } from './client.js';
export type { ConnectOptions, Extent, ExportListEntry, ReadChunk } from './client.js';
export type { ExportInfoResult } from './handshake.js';
export { NbdError } from './errors.js';
export { parseNbdUri, NBD_DEFAULT_PORT } from './uri.js';
export type { NbdTarget, NbdUri } from './uri.js';
export type { BlockSizeInfo } from '../src/nbd/client-codec.js';
