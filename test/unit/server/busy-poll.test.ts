import { describe, expect, it } from 'vitest';
import { BusyPoll } from '../../../src/server/busy-poll.js';

/** Resolves after the event loop's check phase has run once more. */
const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('BusyPoll', () => {
  it('keeps the loop polling for its window after the last activity, then lets it sleep', async () => {
    let clock = 0;
    const poll = new BusyPoll(200, { now: () => clock });
    expect(poll.polling).toBe(false);
    poll.touch();
    expect(poll.polling).toBe(true);
    clock = 0.15;
    await nextTurn();
    await nextTurn();
    expect(poll.polling).toBe(true);
    poll.touch();
    clock = 0.3;
    await nextTurn();
    await nextTurn();
    expect(poll.polling).toBe(true);
    clock = 0.36;
    await nextTurn();
    await nextTurn();
    expect(poll.polling).toBe(false);
  });

  it('does not poll while a request is being served, and polls again once it is answered', async () => {
    let clock = 0;
    const poll = new BusyPoll(200, { now: () => clock });
    poll.touch();
    poll.begin();
    await nextTurn();
    await nextTurn();
    expect(poll.polling).toBe(false);
    poll.touch();
    expect(poll.polling).toBe(false);
    clock = 1;
    poll.end();
    expect(poll.polling).toBe(true);
    clock = 1.1;
    await nextTurn();
    expect(poll.polling).toBe(true);
    clock = 1.3;
    await nextTurn();
    await nextTurn();
    expect(poll.polling).toBe(false);
  });

  it('with io_uring, polls over one request being served but not over two', async () => {
    let clock = 0;
    const poll = new BusyPoll(200, { overLoneRequest: true, now: () => clock });
    poll.begin();
    poll.touch();
    expect(poll.polling).toBe(true);
    await nextTurn();
    expect(poll.polling).toBe(true);
    poll.begin();
    await nextTurn();
    await nextTurn();
    expect(poll.polling).toBe(false);
    poll.touch();
    expect(poll.polling).toBe(false);
    clock = 0.05;
    poll.end();
    expect(poll.polling).toBe(true);
    clock = 0.3;
    await nextTurn();
    await nextTurn();
    expect(poll.polling, 'the window still ends polling over a request that takes long').toBe(false);
  });

  it('does nothing with a window of 0, or once stopped', async () => {
    const off = new BusyPoll(0, { now: () => 0 });
    off.touch();
    expect(off.polling).toBe(false);
    const stopped = new BusyPoll(200, { now: () => 0 });
    stopped.touch();
    stopped.stop();
    await nextTurn();
    await nextTurn();
    expect(stopped.polling).toBe(false);
    stopped.touch();
    expect(stopped.polling).toBe(false);
  });
});
