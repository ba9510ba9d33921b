import { describe, expect, it } from 'vitest';
import { SyncIoPolicy } from '../../../src/store/file-layer.js';

function busyFor(ms: number): number {
  const until = performance.now() + ms;
  while (performance.now() < until);
  return 7;
}

describe('synchronous small I/O', () => {
  it('runs small transfers on the spot and returns their result', () => {
    const policy = new SyncIoPolicy();
    expect(policy.attempt(4096, () => 4096)).toBe(4096);
    expect(policy.attempt(64 * 1024, () => 1)).toBe(1);
  });

  it('leaves large transfers to the thread pool', () => {
    const policy = new SyncIoPolicy();
    let ran = false;
    expect(policy.attempt(64 * 1024 + 1, () => ((ran = true), 1))).toBeUndefined();
    expect(ran).toBe(false);
  });

  it('after a slow transfer, sends the next ones to the thread pool', () => {
    const policy = new SyncIoPolicy();
    expect(policy.attempt(4096, () => busyFor(2))).toBe(7);
    let ran = false;
    expect(policy.attempt(4096, () => ((ran = true), 1))).toBeUndefined();
    expect(ran).toBe(false);
  });
});
