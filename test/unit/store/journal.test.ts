import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Journal, type MetaRecord } from '../../../src/store/journal.js';
import { Pool } from '../../../src/store/index.js';
import { MemoryFiles, crashAndReopen } from '../../helpers/store-memfs.js';

const assign: fc.Arbitrary<MetaRecord> = fc.record({
  op: fc.constant('assign' as const),
  layer: fc.nat(0xffffffff),
  start: fc.nat(2 ** 40),
  end: fc.nat(2 ** 40),
  value: fc.nat(0xffffffff),
});
const named: fc.Arbitrary<MetaRecord> = fc.oneof(
  fc.record({ op: fc.constant('delete' as const), name: fc.string({ unit: 'grapheme', maxLength: 40 }) }),
  fc.record({ op: fc.constant('grow' as const), name: fc.string({ maxLength: 8 }), size: fc.nat(2 ** 52) }),
  fc.record({
    op: fc.constant('create' as const),
    name: fc.string({ maxLength: 8 }),
    size: fc.nat(2 ** 52),
    head: fc.nat(1000),
    createdAt: fc.constant('2026-11-23T00:00:00.000Z'),
    labels: fc.dictionary(fc.stringMatching(/^[a-z]{1,10}$/), fc.string({ unit: 'grapheme', maxLength: 3000 }), {
      maxKeys: 3,
    }),
  }),
);

type Action =
  | { kind: 'append'; record: MetaRecord }
  | { kind: 'commit' }
  | { kind: 'failedCommit' };

const action: fc.Arbitrary<Action> = fc.oneof(
  { arbitrary: assign.map((record) => ({ kind: 'append' as const, record })), weight: 12 },
  { arbitrary: named.map((record) => ({ kind: 'append' as const, record })), weight: 2 },
  { arbitrary: fc.constant({ kind: 'commit' as const }), weight: 1 },
  { arbitrary: fc.constant({ kind: 'failedCommit' as const }), weight: 1 },
);

describe('journal', () => {
  it('recovers every committed record in order, however appends, commits and put-backs interleave', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(action, { maxLength: 3000, size: 'large' }), async (actions) => {
        const files = new MemoryFiles();
        await files.mkdir('/pool');
        const journal = await Journal.create(files, '/pool', 7);
        const committed: MetaRecord[] = [];
        let pending: MetaRecord[] = [];
        for (const step of actions) {
          if (step.kind === 'append') {
            journal.append(step.record);
            pending.push(step.record);
          } else if (step.kind === 'failedCommit') {
            journal.putBack(journal.take());
          } else {
            await journal.write(journal.take());
            committed.push(...pending);
            pending = [];
          }
          expect(journal.pendingBytes > 0).toBe(pending.length > 0);
        }
        await journal.close();
        const { journal: reopened, records } = await Journal.recover(files, '/pool', 7);
        await reopened.close();
        expect(records).toEqual(committed);
      }),
      { numRuns: 150 },
    );
  });

  it('counts pending bytes as the frames it will write', async () => {
    const files = new MemoryFiles();
    await files.mkdir('/pool');
    const journal = await Journal.create(files, '/pool', 1);
    for (let i = 0; i < 5000; i++) journal.append({ op: 'assign', layer: 16, start: i, end: i + 1, value: 16 });
    expect(journal.pendingBytes).toBe(5000 * 33);
    const frames = journal.take();
    expect(frames.reduce((sum, run) => sum + run.length, 0)).toBe(5000 * 33);
    expect(journal.pendingBytes).toBe(0);
    await journal.close();
  });
});

describe('commits without a FLUSH', () => {
  it('makes older writes of a client that never flushes durable', async () => {
    const files = new MemoryFiles();
    const commitBytes = 10 * 33;
    const waitAfterRecords = 4 * 10;
    const pool = await Pool.open('/pool', { files, commitBytes });
    await pool.createVolume('a', 1024 * 4096);
    const device = await pool.open('a');
    const blocks = 400;
    for (let block = 0; block < blocks; block++) {
      await device.write(block * 4096, Buffer.alloc(4096, (block % 255) + 1), false);
    }
    const reopened = await crashAndReopen(files, pool, '/pool', 1);
    try {
      const survivor = await reopened.open('a');
      const kept = blocks - waitAfterRecords - 1;
      for (let block = 0; block < kept; block++) {
        const pieces = await survivor.read(block * 4096, 4096);
        expect(pieces, `block ${block}`).toHaveLength(1);
        const piece = pieces[0]!;
        expect(piece.kind, `block ${block}`).toBe('data');
        if (piece.kind === 'data') expect(piece.data.every((byte) => byte === (block % 255) + 1)).toBe(true);
      }
    } finally {
      await reopened.close();
    }
  });
});
