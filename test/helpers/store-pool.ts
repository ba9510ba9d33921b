/** Helpers for store tests: temp pool dirs and reading a device into one buffer. */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach } from 'vitest';
import { Pool, type PoolOptions } from '../../src/store/index.js';
import type { BlockDevice } from '../../src/store/types.js';

export async function tempDir(prefix = 'clonebd-store-'): Promise<{ path: string; remove: () => Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

export interface PoolFixture {
  /** This test's pool directory. */
  readonly dir: string;
  /** Opens a pool in this test's directory; it is closed after the test. */
  openPool(options?: PoolOptions): Promise<Pool>;
}

/** A fresh directory per test, and every pool opened in it closed and removed afterwards. */
export function usePoolFixture(): PoolFixture {
  let dir: { path: string; remove: () => Promise<void> } | undefined;
  const pools: Pool[] = [];
  beforeEach(async () => {
    dir = await tempDir();
  });
  afterEach(async () => {
    for (const pool of pools.splice(0)) await pool.close().catch(() => undefined);
    await dir?.remove();
  });
  return {
    get dir() {
      return dir!.path;
    },
    async openPool(options = {}) {
      const pool = await Pool.open(dir!.path, options);
      pools.push(pool);
      return pool;
    },
  };
}

/** Reads [offset, offset + length) and joins the pieces, checking they tile the range. */
export async function readBytes(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  let at = offset;
  for (const piece of await device.read(offset, length)) {
    if (piece.offset !== at) throw new Error(`piece at ${piece.offset}, expected ${at}`);
    if (piece.kind === 'data') {
      piece.data.copy(out, piece.offset - offset);
      at += piece.data.length;
    } else {
      at += piece.length;
    }
  }
  if (at !== offset + length) throw new Error(`pieces end at ${at}, expected ${offset + length}`);
  return out;
}

export function pattern(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Byte comparison that stays fast for large buffers and names the first difference. */
export function sameBytes(actual: Buffer, expected: Buffer): string {
  if (actual.equals(expected)) return 'same';
  const length = Math.min(actual.length, expected.length);
  let at = 0;
  while (at < length && actual[at] === expected[at]) at++;
  return `differ at ${at} (lengths ${actual.length}, ${expected.length})`;
}
