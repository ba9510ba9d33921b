/**
 * Per-volume request gate. I/O enters shared; snapshot, clone, grow, delete, flatten steps and
 * hole punching run exclusive. An exclusive section waits for the I/O in flight to finish and
 * holds new I/O until it is done, so a snapshot sees exactly the requests completed before it.
 * Exclusive requests are served in order and take precedence over new shared entries.
 */
export class Gate {
  #shared = 0;
  #exclusive = false;
  readonly #exclusiveQueue: Array<() => void> = [];
  #sharedQueue: Array<() => void> = [];

  enterShared(): Promise<void> | undefined {
    if (!this.#exclusive && this.#exclusiveQueue.length === 0) {
      this.#shared++;
      return undefined;
    }
    return new Promise((resolve) => this.#sharedQueue.push(resolve));
  }

  leaveShared(): void {
    this.#shared--;
    if (this.#shared === 0) this.#next();
  }

  async exclusive<T>(section: () => T | Promise<T>): Promise<T> {
    await new Promise<void>((resolve) => {
      this.#exclusiveQueue.push(resolve);
      this.#next();
    });
    try {
      return await section();
    } finally {
      this.#exclusive = false;
      this.#next();
    }
  }

  #next(): void {
    if (this.#exclusive || this.#shared > 0) return;
    const waiter = this.#exclusiveQueue.shift();
    if (waiter !== undefined) {
      this.#exclusive = true;
      waiter();
      return;
    }
    const shared = this.#sharedQueue;
    this.#sharedQueue = [];
    this.#shared += shared.length;
    for (const resolve of shared) resolve();
  }
}

/** Serialises read-modify-write of single blocks: copy-ups of one block never interleave. */
export class BlockLocks {
  readonly #held = new Map<number, Promise<void>>();

  async lock(block: number): Promise<() => void> {
    for (let held = this.#held.get(block); held !== undefined; held = this.#held.get(block)) await held;
    let release!: () => void;
    this.#held.set(block, new Promise<void>((resolve) => (release = resolve)));
    return () => {
      this.#held.delete(block);
      release();
    };
  }
}
