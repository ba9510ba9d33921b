import { describe, expect, it } from 'vitest';
import { interleave, parseBenchOptions } from '../../scripts/bench-options.js';

const known = { servers: ['clonebd', 'nbdkit', 'nbdkit-2'], rows: ['randread-4k-qd1', 'write-1m-qd8'] };

describe('parseBenchOptions', () => {
  it('defaults to the matrix: every server, row and layout, both cache states, 3 rounds of 5 s over 4 GiB', () => {
    const options = parseBenchOptions([], known, '/tmp');
    expect(options).toMatchObject({
      parts: { matrix: true, cloneTiming: false, memory: false },
      layouts: ['plain', 'fresh', 'clone', 'depth32'],
      cloneRequests: 50,
      clones: 1000,
      mapBlocks: 1_000_000,
      rounds: 3,
      durationSeconds: 5,
      servers: known.servers,
      rows: known.rows,
      caches: ['cold', 'warm'],
      out: 'bench-results',
      workParent: '/tmp',
      exportSize: 4 * 2 ** 30,
      help: false,
    });
  });

  it('shortens runs and the memory part with --quick unless told otherwise', () => {
    expect(parseBenchOptions(['--quick'], known, '/tmp')).toMatchObject({ durationSeconds: 2, clones: 200, mapBlocks: 100_000 });
    expect(parseBenchOptions(['--quick', '--duration', '7', '--clones', '1000'], known, '/tmp')).toMatchObject({
      durationSeconds: 7,
      clones: 1000,
    });
  });

  it('runs clone timing or memory instead of the matrix, and all three with --matrix', () => {
    expect(parseBenchOptions(['--clone-timing'], known, '/tmp').parts).toEqual({ matrix: false, cloneTiming: true, memory: false });
    expect(parseBenchOptions(['--memory'], known, '/tmp').parts).toEqual({ matrix: false, cloneTiming: false, memory: true });
    expect(parseBenchOptions(['--memory', '--clone-timing', '--matrix'], known, '/tmp').parts).toEqual({
      matrix: true,
      cloneTiming: true,
      memory: true,
    });
  });

  it('takes layouts, and counts for the clone and memory parts', () => {
    const options = parseBenchOptions(['--layouts', 'depth32,plain', '--clone-requests', '60', '--map-blocks', '5000'], known, '/tmp');
    expect(options.layouts).toEqual(['depth32', 'plain']);
    expect(options.cloneRequests).toBe(60);
    expect(options.mapBlocks).toBe(5000);
    expect(() => parseBenchOptions(['--layouts', 'qcow2'], known, '/tmp')).toThrow(/unknown qcow2/);
    expect(() => parseBenchOptions(['--clones', '2.5'], known, '/tmp')).toThrow(/positive integer/);
  });

  it('takes lists of servers, rows and cache states in the order given', () => {
    const options = parseBenchOptions(
      ['--servers', 'nbdkit-2,nbdkit', '--rows', 'write-1m-qd8', '--cache', 'warm', '--rounds', '5', '--out', 'x'],
      known,
      '/tmp',
    );
    expect(options.servers).toEqual(['nbdkit-2', 'nbdkit']);
    expect(options.rows).toEqual(['write-1m-qd8']);
    expect(options.caches).toEqual(['warm']);
    expect(options.rounds).toBe(5);
    expect(options.out).toBe('x');
  });

  it('refuses unknown names, bad numbers and unknown flags', () => {
    expect(() => parseBenchOptions(['--servers', 'nbd-server'], known, '/tmp')).toThrow(/unknown nbd-server/);
    expect(() => parseBenchOptions(['--cache', 'lukewarm'], known, '/tmp')).toThrow(/unknown lukewarm/);
    expect(() => parseBenchOptions(['--rounds', '0'], known, '/tmp')).toThrow(/positive integer/);
    expect(() => parseBenchOptions(['--rounds', '1.5'], known, '/tmp')).toThrow(/positive integer/);
    expect(() => parseBenchOptions(['--duration', 'ten'], known, '/tmp')).toThrow(/positive number/);
    expect(() => parseBenchOptions(['--size-gib', '0.0000001'], known, '/tmp')).toThrow(/whole number of MiB/);
    expect(() => parseBenchOptions(['--fast'], known, '/tmp')).toThrow();
  });
});

describe('interleave', () => {
  it('alternates direction from round to round for the same group', () => {
    expect(interleave(['A', 'B', 'C', 'D'], 0, 0)).toEqual(['A', 'B', 'C', 'D']);
    expect(interleave(['A', 'B', 'C', 'D'], 1, 0)).toEqual(['D', 'C', 'B', 'A']);
    expect(interleave(['A', 'B', 'C', 'D'], 2, 0)).toEqual(['A', 'B', 'C', 'D']);
  });

  it('alternates between consecutive groups of a round', () => {
    expect(interleave(['A', 'B'], 0, 1)).toEqual(['B', 'A']);
    expect(interleave(['A', 'B'], 1, 1)).toEqual(['A', 'B']);
  });

  it('gives each target every position equally often over an even number of rounds', () => {
    const targets = ['A', 'B', 'C'];
    const positions = new Map(targets.map((target) => [target, 0]));
    for (let round = 0; round < 4; round++) {
      interleave(targets, round, 0).forEach((target, position) => positions.set(target, positions.get(target)! + position));
    }
    expect(new Set(positions.values()).size).toBe(1);
  });
});
