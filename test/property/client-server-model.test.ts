/**
 * Random sequences of write / trim / zero / flush / read / block-status sent through NbdClient
 * over a real socket to the real server and store, checked byte for byte against a Uint8Array.
 *
 * The spec lets a TRIMmed range read as anything; clonebd promises zeros (the store records
 * explicit zero state), so the model zeroes trimmed bytes. A range that BLOCK_STATUS reports
 * with NBD_STATE_ZERO must be zeros in the model. Some steps are batches of non-overlapping
 * requests sent concurrently on the one connection, so replies come back pipelined.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient, NbdError } from '../../native-free/index.js';
import { NbdServer } from '../../src/server/index.js';
import { Pool } from '../../src/store/index.js';

const SIZE = 256 * 1024;
const BLOCK = 4096;
const STATE_ZERO = 2;

type Range = { offset: number; length: number };
type Op =
  | ({ kind: 'write'; seed: number; fua: boolean } & Range)
  | ({ kind: 'trim'; fua: boolean } & Range)
  | ({ kind: 'zero'; noHole: boolean; fastZero: boolean; fua: boolean } & Range)
  | { kind: 'flush' }
  | ({ kind: 'read'; df: boolean } & Range)
  | ({ kind: 'blockStatus'; reqOne: boolean } & Range)
  | ({ kind: 'readPastEnd' } & Range)
  | ({ kind: 'writePastEnd' } & Range);
type Step = { kind: 'one'; op: Op } | { kind: 'batch'; ops: Op[] };

/** Ranges on 4 KiB boundaries (whole blocks) or anywhere (partial blocks, copy-up). */
const rangeArb: fc.Arbitrary<Range> = fc.oneof(
  fc
    .tuple(fc.integer({ min: 0, max: SIZE / BLOCK - 1 }), fc.integer({ min: 1, max: 16 }))
    .map(([block, blocks]) => ({ offset: block * BLOCK, length: Math.min(blocks, SIZE / BLOCK - block) * BLOCK })),
  fc
    .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * BLOCK }))
    .map(([offset, length]) => ({ offset, length: Math.min(length, SIZE - offset) })),
);

const dataOpArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('write' as const), seed: fc.integer({ min: 0, max: 255 }), fua: fc.boolean() }).chain((op) => rangeArb.map((r) => ({ ...op, ...r }))) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('trim' as const), fua: fc.boolean() }).chain((op) => rangeArb.map((r) => ({ ...op, ...r }))) },
  {
    weight: 2,
    arbitrary: fc
      .record({ kind: fc.constant('zero' as const), noHole: fc.boolean(), fastZero: fc.boolean(), fua: fc.boolean() })
      .chain((op) => rangeArb.map((r) => ({ ...op, ...r }))),
  },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('read' as const), df: fc.boolean() }).chain((op) => rangeArb.map((r) => ({ ...op, ...r }))) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('blockStatus' as const), reqOne: fc.boolean() }).chain((op) => rangeArb.map((r) => ({ ...op, ...r }))) },
);

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 16, arbitrary: dataOpArb },
  { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.constantFrom('readPastEnd' as const, 'writePastEnd' as const), fc.integer({ min: 0, max: 100 }), fc.integer({ min: 1, max: 200 }))
      .map(([kind, back, extra]) => ({ kind, offset: SIZE - Math.min(back, SIZE), length: back + extra })),
  },
);

function overlaps(a: Range, b: Range): boolean {
  return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
}

/** Up to five data operations whose ranges are pairwise disjoint, so their order is irrelevant. */
const batchArb: fc.Arbitrary<Op[]> = fc.array(dataOpArb, { minLength: 2, maxLength: 5 }).map((ops) => {
  const kept: (Op & Range)[] = [];
  for (const op of ops as (Op & Range)[]) if (kept.every((other) => !overlaps(op, other))) kept.push(op);
  return kept;
});

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { weight: 3, arbitrary: opArb.map((op) => ({ kind: 'one' as const, op })) },
  { weight: 1, arbitrary: batchArb.map((ops) => ({ kind: 'batch' as const, ops })) },
);

function pattern(seed: number, length: number): Buffer {
  const data = Buffer.allocUnsafe(length);
  for (let k = 0; k < length; k++) data[k] = (seed + k * 7 + (k >> 9)) & 0xff;
  return data;
}

function isZero(model: Uint8Array, offset: number, length: number): boolean {
  for (let k = offset; k < offset + length; k++) if (model[k] !== 0) return false;
  return true;
}

async function expectCode(promise: Promise<unknown>, code: string): Promise<void> {
  const error = await promise.then(
    () => new Error(`expected ${code}, got success`),
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(NbdError);
  expect((error as NbdError).code).toBe(code);
}

/**
 * Sends one operation and checks its result against `model`, which it then updates. In a batch
 * (`concurrent`), a final extent reaching past the request may describe bytes a sibling request
 * is changing, so only the requested range is checked there.
 */
async function run(client: NbdClient, model: Uint8Array, op: Op, concurrent = false): Promise<void> {
  switch (op.kind) {
    case 'write': {
      const data = pattern(op.seed, op.length);
      await client.write(op.offset, data, { fua: op.fua });
      model.set(data, op.offset);
      return;
    }
    case 'trim':
      await client.trim(op.offset, op.length, { fua: op.fua });
      model.fill(0, op.offset, op.offset + op.length);
      return;
    case 'zero':
      try {
        await client.zero(op.offset, op.length, { noHole: op.noHole, fastZero: op.fastZero, fua: op.fua });
      } catch (error) {
        // FAST_ZERO may be refused when zeroing would be no faster than writing; nothing changes.
        if (op.fastZero && error instanceof NbdError && error.code === 'ENOTSUP') return;
        throw error;
      }
      model.fill(0, op.offset, op.offset + op.length);
      return;
    case 'flush':
      await client.flush();
      return;
    case 'read': {
      const expected = Buffer.from(model.subarray(op.offset, op.offset + op.length));
      if (op.df) {
        const chunks = await client.readChunks(op.offset, op.length, { df: true });
        expect(chunks.length).toBe(1);
      }
      const data = await client.read(op.offset, op.length);
      if (!data.equals(expected)) {
        const at = data.findIndex((byte, k) => byte !== expected[k]);
        expect.fail(`read [${op.offset}, +${op.length}) differs from the model at byte ${op.offset + at}`);
      }
      return;
    }
    case 'blockStatus': {
      const extents = await client.blockStatus(op.offset, op.length, { reqOne: op.reqOne });
      expect(extents.length).toBeGreaterThan(0);
      if (op.reqOne) {
        expect(extents.length).toBe(1);
        expect(extents[0]!.length).toBeLessThanOrEqual(op.length);
      }
      let at = op.offset;
      for (const [k, extent] of extents.entries()) {
        expect(extent.length).toBeGreaterThan(0);
        if (k < extents.length - 1) expect(at + extent.length).toBeLessThan(op.offset + op.length);
        const end = Math.min(at + extent.length, concurrent ? op.offset + op.length : SIZE);
        if ((extent.flags & STATE_ZERO) !== 0 && end > at && !isZero(model, at, end - at)) {
          expect.fail(`block status says [${at}, ${end}) reads as zeros (flags ${extent.flags}) but the model has data`);
        }
        at += extent.length;
      }
      return;
    }
    case 'readPastEnd':
      await expectCode(client.read(op.offset, op.length), 'EINVAL');
      return;
    case 'writePastEnd':
      await expectCode(client.write(op.offset, pattern(1, op.length)), 'ENOSPC');
      return;
  }
}

describe('NbdClient against the real server matches an in-memory model', () => {
  let dir: string;
  let pool: Pool;
  let server: NbdServer;
  let port: number;
  let volumes = 0;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'clonebd-model-'));
    pool = await Pool.open(dir);
    server = new NbdServer({ catalog: pool, logger: pino({ level: 'silent' }) });
    port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as AddressInfo).port;
  });

  afterAll(async () => {
    await server?.close();
    await pool?.close();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it('random write/trim/zero/flush/read/block-status sequences, some pipelined, read back as the model', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(stepArb, { minLength: 1, maxLength: 40 }), async (steps) => {
        const name = `v${volumes++}`;
        await pool.createVolume(name, SIZE);
        const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: name });
        try {
          expect(client.size).toBe(SIZE);
          expect(client.metaContexts.has('base:allocation')).toBe(true);
          const model = new Uint8Array(SIZE);
          for (const step of steps) {
            if (step.kind === 'one') await run(client, model, step.op);
            else await Promise.all(step.ops.map((op) => run(client, model, op, true)));
          }
          await run(client, model, { kind: 'read', df: false, offset: 0, length: SIZE });
          await client.flush();
        } finally {
          await client.disconnect();
        }
      }),
      { numRuns: 100 },
    );
  });
});
