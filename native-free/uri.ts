/**
 * NBD URIs in the forms libnbd accepts for plain connections:
 * `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`. The export name is the
 * percent-decoded path after the first `/`, and may be empty.
 */
export type NbdTarget = { host: string; port: number } | { path: string };

export interface NbdUri {
  target: NbdTarget;
  exportName: string;
}

export const NBD_DEFAULT_PORT = 10809;

export function parseNbdUri(text: string): NbdUri {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Error(`invalid NBD URI "${text}": expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  if (url.protocol === 'nbd:') {
    if (url.hostname === '') throw new Error(`invalid NBD URI "${text}": no host`);
    if (url.search !== '') throw new Error(`invalid NBD URI "${text}": nbd:// takes no query`);
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
    return { target: { host, port }, exportName };
  }
  if (url.protocol === 'nbd+unix:') {
    if (url.host !== '') throw new Error(`invalid NBD URI "${text}": nbd+unix:// takes no host`);
    const path = url.searchParams.get('socket');
    if (path === null || path === '') throw new Error(`invalid NBD URI "${text}": missing ?socket=PATH`);
    return { target: { path }, exportName };
  }
  throw new Error(`unsupported NBD URI scheme "${url.protocol}" (TLS schemes are not supported)`);
}
