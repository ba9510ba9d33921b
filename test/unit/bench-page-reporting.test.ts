import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { holdPageReporting, orderCount } from '../../scripts/bench-page-reporting.js';

const BUDDYINFO = [
  'Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3 ',
  'Node 0, zone    DMA32     20     36     29     23     30     37     29     28     28     25    726 ',
  'Node 0, zone   Normal   1097    897    725    846    805    504    194    375    250    316   4844 ',
  '',
].join('\n');

describe('orderCount', () => {
  it('counts the block orders of /proc/buddyinfo', () => {
    expect(orderCount(BUDDYINFO)).toBe(11);
  });

  it('knows nothing from text that is not buddyinfo', () => {
    expect(orderCount('')).toBeUndefined();
    expect(orderCount('Node 0, zone Normal\n')).toBeUndefined();
  });
});

describe('holdPageReporting', () => {
  let dir: string;
  const messages: string[] = [];
  const log = (message: string): void => void messages.push(message);

  beforeEach(async () => {
    dir = await mkdtemp(join(os.tmpdir(), 'clonebd-reporting-'));
    messages.length = 0;
    await writeFile(join(dir, 'buddyinfo'), BUDDYINFO);
  });

  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const files = (): { order: string; buddyinfo: string } => ({ order: join(dir, 'order'), buddyinfo: join(dir, 'buddyinfo') });

  it('raises the reported order past the largest for the run and puts it back once', async () => {
    await writeFile(files().order, '9\n');
    const held = await holdPageReporting(log, files());
    expect(await readFile(files().order, 'utf8')).toBe('11');
    expect(held.warning).toBeUndefined();
    expect(held.note).toMatch(/paused/);
    expect(messages.join('\n')).toMatch(/page_reporting_order 9 -> 11/);
    await held.restore();
    expect(await readFile(files().order, 'utf8')).toBe('9');
    await writeFile(files().order, '5');
    await held.restore();
    expect(await readFile(files().order, 'utf8')).toBe('5');
  });

  it('leaves an order that reports nothing already as it is', async () => {
    await writeFile(files().order, '12\n');
    const held = await holdPageReporting(log, files());
    await held.restore();
    expect(await readFile(files().order, 'utf8')).toBe('12\n');
    expect(held.note).toMatch(/already off/);
  });

  it('says so when the kernel does not report free pages', async () => {
    const held = await holdPageReporting(log, files());
    expect(held.note).toMatch(/no free page reporting/);
    expect(held.warning).toBeUndefined();
  });

  it('warns, and goes on, when the setting cannot be written', async () => {
    // Readable and never writable, root or not.
    const held = await holdPageReporting(log, { order: '/proc/version', buddyinfo: files().buddyinfo });
    expect(held.note).toMatch(/left on/);
    expect(held.warning).toMatch(/could not be paused/);
  });

  it('refuses to guess when it cannot tell the allocator\'s orders', async () => {
    await writeFile(files().order, '9\n');
    await expect(holdPageReporting(log, { order: files().order, buddyinfo: join(dir, 'missing') })).rejects.toThrow(/buddyinfo/);
    expect(await readFile(files().order, 'utf8')).toBe('9\n');
  });
});
