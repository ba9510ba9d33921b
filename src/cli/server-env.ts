/**
 * The environment `clonebd serve` runs best with. Node reads both variables before any of
 * clonebd's code runs, so whoever starts the process sets them: `npm start`, the tests, the
 * benchmark and the crash harness do it through here.
 *   - UV_USE_IO_URING=1: libuv hands file reads, writes and syncs to io_uring. Node 20 leaves
 *     it off by default. Reads that miss the page cache then cost no thread hand-off: measured
 *     here, cold 4 KiB reads at QD32 went from 3.6 context switches each to 0.13, and from about
 *     15k to 22k IOPS. Where the kernel refuses io_uring (a seccomp profile, an old kernel) libuv
 *     falls back to its thread pool by itself.
 *   - UV_THREADPOOL_SIZE=16: that pool, for whatever io_uring does not take; the default 4
 *     threads keep only four reads at the disk.
 * Values the environment already has are kept.
 */
const SERVER_ENVIRONMENT_DEFAULTS = { UV_USE_IO_URING: '1', UV_THREADPOOL_SIZE: '16' } as const;

/** Whether libuv hands this process's file I/O to io_uring, as far as the environment says. */
export function fileIoOnIoUring(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.UV_USE_IO_URING === '1';
}

export function serverEnvironment(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  return { ...SERVER_ENVIRONMENT_DEFAULTS, ...env };
}
