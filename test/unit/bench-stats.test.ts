import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { median, percentile, ratio, summarise } from '../../scripts/bench-stats.js';

describe('median', () => {
  it('takes the middle of an odd count and the mean of the middle two of an even count', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
  });

  it('does not reorder its input', () => {
    const values = [3, 1, 2];
    median(values);
    expect(values).toEqual([3, 1, 2]);
  });

  it('refuses no values', () => {
    expect(() => median([])).toThrow(RangeError);
  });

  it('has as many values at or below it as at or above it', () => {
    fc.assert(
      fc.property(fc.array(fc.double({ noNaN: true, min: -1e9, max: 1e9 }), { minLength: 1, maxLength: 50 }), (values) => {
        const m = median(values);
        const below = values.filter((value) => value <= m).length;
        const above = values.filter((value) => value >= m).length;
        expect(below).toBeGreaterThanOrEqual(values.length / 2);
        expect(above).toBeGreaterThanOrEqual(values.length / 2);
      }),
    );
  });
});

describe('summarise', () => {
  it('reports median, min, max and count', () => {
    expect(summarise([10, 30, 20, 50])).toEqual({ median: 25, min: 10, max: 50, count: 4 });
  });

  it('keeps the median between min and max', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 0, max: 1e6 }), { minLength: 1, maxLength: 30 }), (values) => {
        const summary = summarise(values);
        expect(summary.min).toBeLessThanOrEqual(summary.median);
        expect(summary.median).toBeLessThanOrEqual(summary.max);
      }),
    );
  });
});

describe('ratio', () => {
  it('divides, and has no value for a zero or non-finite denominator', () => {
    expect(ratio(15, 10)).toBe(1.5);
    expect(ratio(1, 0)).toBeUndefined();
    expect(ratio(1, Number.NaN)).toBeUndefined();
    expect(ratio(Number.POSITIVE_INFINITY, 1)).toBeUndefined();
  });
});

describe('percentile', () => {
  it('takes the nearest rank: p90 of 1..10 is 9, of 1..50 is 45', () => {
    expect(percentile([3, 1, 2, 10, 9, 8, 7, 6, 5, 4], 90)).toBe(9);
    expect(percentile(Array.from({ length: 50 }, (_, i) => i + 1), 90)).toBe(45);
    expect(percentile([5, 1], 100)).toBe(5);
    expect(percentile([5, 1], 50)).toBe(1);
  });

  it('is a value of the input with at least p% of the values at or below it', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: -1e6, max: 1e6 }), { minLength: 1, maxLength: 60 }), fc.integer({ min: 1, max: 100 }), (values, p) => {
        const value = percentile(values, p);
        expect(values).toContain(value);
        expect(values.filter((other) => other <= value).length).toBeGreaterThanOrEqual((p / 100) * values.length);
        expect(values.filter((other) => other < value).length).toBeLessThan((p / 100) * values.length);
      }),
    );
  });

  it('refuses no values and percentiles outside (0, 100]', () => {
    expect(() => percentile([], 50)).toThrow(RangeError);
    expect(() => percentile([1], 0)).toThrow(RangeError);
    expect(() => percentile([1], 101)).toThrow(RangeError);
  });
});
