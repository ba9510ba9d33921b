/** The clone-aware store: its public surface. */
export { Pool, BLOCK_SIZE, MAX_VOLUME_SIZE } from './pool.js';
export type { PoolOptions, PoolUsage, VolumeInfo, VolumeUsage } from './pool.js';
export { nodeFileLayer, SyncIoPolicy } from './file-layer.js';
export type { FileHandle, FileLayer, OpenMode } from './file-layer.js';
export { validateLabels, validateName } from './names.js';
export type { Labels } from './names.js';
export type { BlockDevice, ExportCatalog, ExportDescription, Extent, ReadPiece, ZeroOptions } from './types.js';
