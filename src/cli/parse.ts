/** Parsers for command-line values; each throws an Error whose message is shown to the user. */

const SIZE_UNITS: Readonly<Record<string, number>> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1000 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1000 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tb: 1000 ** 4,
  tib: 1024 ** 4,
  p: 1024 ** 5,
  pb: 1000 ** 5,
  pib: 1024 ** 5,
};

/** `10737418240`, `10G`, `10GiB` (binary), `10GB` (decimal); whole bytes only. */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const multiplier = match === null ? undefined : SIZE_UNITS[match[2]!.toLowerCase()];
  if (match === null || multiplier === undefined) {
    throw new Error(`invalid size "${text}": use bytes or a unit, e.g. 10G, 10GiB, 512MiB, 10737418240`);
  }
  const bytes = Number(match[1]) * multiplier;
  if (!Number.isSafeInteger(bytes)) throw new Error(`invalid size "${text}": not a whole number of bytes below 8 PiB`);
  return bytes;
}

export interface HostPort {
  host: string;
  port: number;
}

/** `HOST:PORT`, `[IPV6]:PORT`, or `:PORT` (loopback). */
export function parseListen(text: string): HostPort {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s]*)):(\d{1,5})$/.exec(text);
  const port = match === null ? NaN : Number(match[3]);
  if (match === null || port > 65535) {
    throw new Error(`invalid listen address "${text}": expected HOST:PORT, e.g. 127.0.0.1:10809`);
  }
  const host = match[1] ?? match[2] ?? '';
  return { host: host === '' ? '127.0.0.1' : host, port };
}
