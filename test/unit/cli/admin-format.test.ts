/**
 * What the admin commands print and how they exit: byte counts for people, aligned tables, and the
 * documented exit code for each error.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { exitCodeFor, formatBytes, formatTable } from '../../../src/cli/admin-commands.js';
import { OperationError, ERROR_CODES } from '../../../src/util/errors.js';

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'] as const;

describe('formatBytes', () => {
  it('prints whole bytes below 1 KiB, then two significant decimals below 10 and one above', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(1)).toBe('1 B');
    expect(formatBytes(1023)).toBe('1023 B');
    expect(formatBytes(1024)).toBe('1.00 KiB');
    expect(formatBytes(1536)).toBe('1.50 KiB');
    expect(formatBytes(10 * 1024)).toBe('10.0 KiB');
    expect(formatBytes(2 ** 20)).toBe('1.00 MiB');
    expect(formatBytes(10 * 2 ** 20)).toBe('10.0 MiB');
    expect(formatBytes(10 * 2 ** 30)).toBe('10.0 GiB');
    expect(formatBytes(2 ** 40)).toBe('1.00 TiB');
    expect(formatBytes(3 * 2 ** 50)).toBe('3.00 PiB');
  });

  it('keeps PiB for anything larger', () => {
    expect(formatBytes(2048 * 2 ** 50)).toBe('2048.0 PiB');
  });

  it('reads back within half a percent of the bytes it was given', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }), (bytes) => {
        const match = /^(\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB|PiB)$/.exec(formatBytes(bytes));
        expect(match, formatBytes(bytes)).not.toBeNull();
        const unit = UNITS.indexOf(match![2] as (typeof UNITS)[number]);
        const shown = Number(match![1]) * 1024 ** unit;
        if (unit === 0) expect(shown).toBe(bytes);
        else expect(Math.abs(shown - bytes) / bytes).toBeLessThanOrEqual(0.005);
      }),
    );
  });

  it('never shows 1024 or more of a unit when a larger unit exists', () => {
    // 1 MiB - 1 B is 1023.999 KiB: rounded, it must read "1.00 MiB", not "1024.0 KiB".
    for (const bytes of [2 ** 20 - 1, 2 ** 30 - 1, 2 ** 20 - 50]) {
      const [number, unit] = formatBytes(bytes).split(' ');
      if (unit !== 'PiB') expect(Number(number), formatBytes(bytes)).toBeLessThan(1024);
    }
  });
});

/** The column starts a two-space-separated, left-aligned table has, computed here from the cells. */
function columnStarts(headers: string[], rows: string[][]): number[] {
  const starts: number[] = [];
  let at = 0;
  headers.forEach((header, column) => {
    starts.push(at);
    at += Math.max(header.length, ...rows.map((row) => (row[column] ?? '').length)) + 2;
  });
  return starts;
}

describe('formatTable', () => {
  it('aligns columns two spaces apart under their headers, without trailing spaces', () => {
    const table = formatTable(
      ['NAME', 'SIZE', 'PARENT'],
      [
        ['db', '10.0 GiB', '-'],
        ['db-test-clone', '1.00 MiB', 'db'],
      ],
    );
    expect(table.split('\n')).toEqual([
      'NAME           SIZE      PARENT',
      'db             10.0 GiB  -',
      'db-test-clone  1.00 MiB  db',
    ]);
  });

  it('prints only the header line when there are no rows', () => {
    expect(formatTable(['NAME', 'SIZE'], [])).toBe('NAME  SIZE');
  });

  it('treats a missing cell as empty', () => {
    expect(formatTable(['A', 'B', 'C'], [['x'], ['y', 'yy', 'z']]).split('\n')).toEqual(['A  B   C', 'x', 'y  yy  z']);
  });

  it('puts every cell at its column start, on one line per row', () => {
    const cell = fc
      .string({ minLength: 1, maxLength: 12, unit: fc.constantFrom('a', 'b', 'Z', '0', '.', '-', ' ') })
      .filter((text) => text.trim() !== '');
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 6 }).chain((width) =>
          fc.tuple(
            fc.array(cell, { minLength: width, maxLength: width }),
            fc.array(fc.array(cell, { minLength: width, maxLength: width }), { maxLength: 8 }),
          ),
        ),
        ([headers, rows]) => {
          const lines = formatTable(headers, rows).split('\n');
          expect(lines).toHaveLength(rows.length + 1);
          const starts = columnStarts(headers, rows);
          [headers, ...rows].forEach((cells, index) => {
            const line = lines[index]!;
            expect(line).toBe(line.trimEnd());
            cells.forEach((text, column) => {
              const start = starts[column]!;
              expect(line.slice(start, start + text.length).trimEnd()).toBe(text.trimEnd());
              if (column > 0) expect(line.slice(start - 2, start)).toBe('  ');
            });
          });
        },
      ),
    );
  });
});

describe('exitCodeFor', () => {
  /** The README's table, written out here rather than read from the code under test. */
  const documented: ReadonlyArray<[OperationError['code'], number]> = [
    ['ENOTCONN', 3],
    ['EEXIST', 4],
    ['ENOENT', 5],
    ['ERANGE', 6],
    ['ENOSPC', 7],
    ['EINVAL', 8],
    ['EBUSY', 9],
  ];

  it.each(documented)('%s exits %i', (code, exit) => {
    expect(exitCodeFor(new OperationError(code, 'message'))).toBe(exit);
  });

  it('gives every other operation error exit 1', () => {
    const mapped = new Set(documented.map(([code]) => code));
    for (const code of ERROR_CODES.filter((candidate) => !mapped.has(candidate))) {
      expect(exitCodeFor(new OperationError(code, 'message')), code).toBe(1);
    }
  });

  it('gives plain errors and thrown non-errors exit 1, even with an errno-like code', () => {
    expect(exitCodeFor(new Error('boom'))).toBe(1);
    expect(exitCodeFor(Object.assign(new Error('boom'), { code: 'EEXIST' }))).toBe(1);
    expect(exitCodeFor({ code: 'ENOENT' })).toBe(1);
    expect(exitCodeFor('ENOENT')).toBe(1);
    expect(exitCodeFor(undefined)).toBe(1);
  });

  it('never uses 0 (success) or 2 (usage errors) for an error, and no two errors share a code', () => {
    const codes = ERROR_CODES.map((code) => exitCodeFor(new OperationError(code, 'message'))).filter((exit) => exit !== 1);
    expect(codes).not.toContain(0);
    expect(codes).not.toContain(2);
    expect(new Set(codes).size).toBe(codes.length);
  });
});
