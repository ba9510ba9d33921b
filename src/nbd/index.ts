export * from './constants.js';
export * from './byte-queue.js';
export * from './errno.js';
export * from './server-handshake.js';
export * from './server-transmission.js';
