/** A FUSE server of one file backed by an NBD export, which can grow while in use. */
export { attachFile, type AttachLog, type AttachOptions, type Attached } from './attach.js';
