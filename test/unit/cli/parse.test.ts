import { describe, expect, it } from 'vitest';
import { parseListen, parseSize } from '../../../src/cli/parse.js';

describe('parseSize', () => {
  it.each([
    ['10737418240', 10737418240],
    ['10G', 10 * 2 ** 30],
    ['10GiB', 10 * 2 ** 30],
    ['10gb', 10 * 10 ** 9],
    ['512MiB', 512 * 2 ** 20],
    ['1.5K', 1536],
    ['16TiB', 16 * 2 ** 40],
  ])('reads %s as %d bytes', (text, bytes) => {
    expect(parseSize(text)).toBe(bytes);
  });

  it.each(['', 'ten', '10X', '-1G', '1.1', '9999999P'])('refuses %j with a message', (text) => {
    expect(() => parseSize(text)).toThrow(/invalid size/);
  });
});

describe('parseListen', () => {
  it('reads host and port', () => {
    expect(parseListen('127.0.0.1:10809')).toEqual({ host: '127.0.0.1', port: 10809 });
    expect(parseListen('[::1]:0')).toEqual({ host: '::1', port: 0 });
    expect(parseListen(':7000')).toEqual({ host: '127.0.0.1', port: 7000 });
  });

  it.each(['nonsense', '127.0.0.1', '1.2.3.4:99999', 'host:port'])('refuses %j', (text) => {
    expect(() => parseListen(text)).toThrow(/invalid listen address/);
  });
});
