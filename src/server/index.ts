export { NbdServer, DEFAULT_LIMITS, BLOCK_SIZES } from './nbd-server.js';
export type { ServerOptions, ServerLimits, ListenTarget } from './nbd-server.js';
