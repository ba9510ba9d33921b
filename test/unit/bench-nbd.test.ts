import { describe, expect, it } from 'vitest';
import { countDataRuns } from '../../scripts/bench-nbd.js';

const DATA = 0;
const HOLE = 1;
const ZERO_HOLE = 3;

describe('countDataRuns', () => {
  it('counts maximal runs of data, holes of any kind between them', () => {
    const state = { inData: false, runs: 0 };
    countDataRuns(
      [
        { length: 4096, flags: HOLE },
        { length: 4096, flags: DATA },
        { length: 8192, flags: ZERO_HOLE },
        { length: 4096, flags: DATA },
        { length: 4096, flags: 2 },
      ],
      state,
    );
    // flags 2 (zero, allocated) is data: it touches the previous data run
    expect(state).toEqual({ inData: true, runs: 2 });
  });

  it('counts a run split between two replies once', () => {
    const state = { inData: false, runs: 0 };
    countDataRuns([{ length: 4096, flags: HOLE }, { length: 4096, flags: DATA }], state);
    countDataRuns([{ length: 4096, flags: DATA }, { length: 4096, flags: HOLE }, { length: 4096, flags: DATA }], state);
    expect(state.runs).toBe(2);
  });

  it('ignores empty extents', () => {
    const state = { inData: false, runs: 0 };
    countDataRuns([{ length: 4096, flags: DATA }, { length: 0, flags: HOLE }, { length: 4096, flags: DATA }], state);
    expect(state.runs).toBe(1);
  });
});
