/**
 * What the server (and anything else that moves blocks) needs of storage. The clone-aware pool
 * implements it; tests implement it in memory. Offsets and lengths are byte counts that callers
 * have already checked against `size`.
 */

/** A run of a volume as the store's maps know it. */
export interface Extent {
  length: number;
  /** No storage is allocated for the run in the volume (it may still inherit nothing). */
  hole: boolean;
  /** The run reads as zeros. */
  zero: boolean;
}

/** One piece of a read, in order; together the pieces cover the requested range exactly. */
export type ReadPiece =
  | { kind: 'data'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number };

export interface ZeroOptions {
  /** The caller allows the range to become a hole (NBD: NO_HOLE not set). */
  mayTrim: boolean;
  fua: boolean;
}

export interface BlockDevice {
  readonly name: string;
  /** Current virtual size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /**
   * When `into` (at least `length` bytes) is given, data pieces may be views of it, each at its
   * offset minus `offset`; its bytes under zero pieces are undefined. The caller owns it and may
   * reuse it once done with the pieces.
   */
  read(offset: number, length: number, into?: Buffer): Promise<ReadPiece[]>;
  write(offset: number, data: Uint8Array, fua: boolean): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  zero(offset: number, length: number, options: ZeroOptions): Promise<void>;
  /** Makes every write completed on any handle of this volume durable. */
  flush(): Promise<void>;
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** A hint to bring the range into memory; results never differ from not calling it. */
  cache(offset: number, length: number): Promise<void>;
  /** Releases this handle; the volume stays. */
  close(): Promise<void>;
}

export interface ExportDescription {
  name: string;
  size: number;
  readOnly: boolean;
  description: string;
}

/** The set of exports a server offers, looked up by name. */
export interface ExportCatalog {
  list(): ExportDescription[];
  describe(name: string): ExportDescription | undefined;
  /** Throws OperationError ENOENT when the export is gone. */
  open(name: string): Promise<BlockDevice>;
}
