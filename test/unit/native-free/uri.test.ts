import { describe, expect, it } from 'vitest';
import { parseNbdUri } from '../../../native-free/index.js';

describe('parseNbdUri', () => {
  it('parses nbd://HOST:PORT/EXPORT', () => {
    expect(parseNbdUri('nbd://127.0.0.1:10900/disk')).toEqual({ target: { host: '127.0.0.1', port: 10900 }, exportName: 'disk' });
  });

  it('defaults the port to 10809 and the export to the empty name', () => {
    expect(parseNbdUri('nbd://example.com')).toEqual({ target: { host: 'example.com', port: 10809 }, exportName: '' });
    expect(parseNbdUri('nbd://example.com/')).toEqual({ target: { host: 'example.com', port: 10809 }, exportName: '' });
  });

  it('parses IPv6 literals and percent-encoded export names', () => {
    expect(parseNbdUri('nbd://[::1]:7000/my%20vol')).toEqual({ target: { host: '::1', port: 7000 }, exportName: 'my vol' });
  });

  it('parses nbd+unix:///EXPORT?socket=PATH', () => {
    expect(parseNbdUri('nbd+unix:///vol?socket=/run/clonebd.sock')).toEqual({
      target: { path: '/run/clonebd.sock' },
      exportName: 'vol',
    });
  });

  it('refuses other schemes, a unix URI without socket, and garbage', () => {
    expect(() => parseNbdUri('nbds://host/x')).toThrow(/scheme/);
    expect(() => parseNbdUri('nbd+unix:///vol')).toThrow(/socket/);
    expect(() => parseNbdUri('not a uri')).toThrow(/invalid NBD URI/);
  });
});
