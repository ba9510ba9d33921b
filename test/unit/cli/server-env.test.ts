import { describe, expect, it } from 'vitest';
import { fileIoOnIoUring, serverEnvironment } from '../../../src/cli/server-env.js';

describe('serverEnvironment', () => {
  it('turns io_uring on and sizes the thread pool where the environment is silent', () => {
    const env = serverEnvironment({ PATH: '/bin' });
    expect(env).toEqual({ PATH: '/bin', UV_USE_IO_URING: '1', UV_THREADPOOL_SIZE: '16' });
  });

  it('keeps what the environment already says', () => {
    const env = serverEnvironment({ UV_USE_IO_URING: '0', UV_THREADPOOL_SIZE: '4' });
    expect(env).toEqual({ UV_USE_IO_URING: '0', UV_THREADPOOL_SIZE: '4' });
  });
});

describe('fileIoOnIoUring', () => {
  it('is true only where the environment turns io_uring on', () => {
    expect(fileIoOnIoUring(serverEnvironment({}))).toBe(true);
    expect(fileIoOnIoUring({ UV_USE_IO_URING: '0' })).toBe(false);
    expect(fileIoOnIoUring({})).toBe(false);
  });
});
