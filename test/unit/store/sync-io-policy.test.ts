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
    expect(policy.attempt(1024 * 1024, () => 1)).toBe(1);
  });

  it('leaves large transfers to the thread pool', () => {
    const policy = new SyncIoPolicy();
    let ran = false;
    expect(policy.attempt(1024 * 1024 + 1, () => ((ran = true), 1))).toBeUndefined();
    expect(ran).toBe(false);
  });

  it('shrugs off a lone slow transfer among fast ones', () => {
    const policy = new SyncIoPolicy();
    for (let i = 0; i < 20; i++) policy.attempt(4096, () => 1);
    expect(policy.attempt(4096, () => busyFor(2))).toBe(7);
    expect(policy.attempt(4096, () => 1)).toBe(1);
  });

  it('allows a large transfer the time its copy takes: 1 MiB in 0.15 ms is fast, 4 KiB in 0.3 ms is slow', () => {
    const large = new SyncIoPolicy();
    for (let i = 0; i < 40; i++) expect(large.attempt(1024 * 1024, () => busyFor(0.15))).toBe(7);
    const small = new SyncIoPolicy();
    let synchronous = 0;
    while (synchronous < 40 && small.attempt(4096, () => busyFor(0.3)) !== undefined) synchronous++;
    expect(synchronous).toBeLessThan(40);
  });

  it('once slow transfers are frequent, sends the next ones to the thread pool', () => {
    const policy = new SyncIoPolicy();
    let synchronous = 0;
    while (policy.attempt(4096, () => busyFor(1)) !== undefined) synchronous++;
    expect(synchronous, 'slow transfers run on the event loop before it gives up').toBeLessThanOrEqual(4);
    let ran = false;
    expect(policy.attempt(4096, () => ((ran = true), 1))).toBeUndefined();
    expect(ran).toBe(false);
  });

  it('says the page cache is missing while slow transfers are frequent, and not while it serves them', () => {
    const policy = new SyncIoPolicy();
    expect(policy.missingCache()).toBe(false);
    for (let i = 0; i < 20; i++) policy.attempt(4096, () => 1);
    expect(policy.missingCache()).toBe(false);
    while (policy.attempt(4096, () => busyFor(1)) !== undefined);
    expect(policy.missingCache()).toBe(true);
  });

  it('runs a transfer of a caller with nothing else under way on the spot, even while backing off', () => {
    const policy = new SyncIoPolicy();
    while (policy.attempt(4096, () => busyFor(1)) !== undefined);
    expect(policy.attempt(4096, () => 1)).toBeUndefined();
    expect(policy.attempt(4096, () => 3, true)).toBe(3);
    expect(policy.attempt(2 * 1024 * 1024, () => 3, true)).toBeUndefined();
  });
});
