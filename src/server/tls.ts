/**
 * TLS for NBD_OPT_STARTTLS: credentials read once at start, and the upgrade of one accepted
 * socket to the server side of a TLS session.
 *
 * Node decides whether a client certificate verified (and drops a client whose certificate does
 * not) only inside tls.Server, so each upgrade hands the plain socket to a tls.Server that never
 * listens, with emit('connection'). One such server per upgrade also scopes the PSK callback to
 * its connection, which is how the PSK identity becomes the peer's name.
 *
 * Credentials: an X.509 certificate chain and key, optionally a CA whose signature every client
 * certificate must carry (a client without one fails the TLS handshake), and optionally TLS-PSK
 * keys in GnuTLS's `username:hexkey` file format (as psktool, nbdkit, qemu and libnbd use).
 * TLS 1.2 is the oldest version offered.
 */
import { readFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { DEFAULT_CIPHERS, createServer, type PeerCertificate, type TLSSocket, type TlsOptions } from 'node:tls';
import { OperationError } from '../util/errors.js';
import type { Peer } from './access.js';

export interface TlsFiles {
  /** PEM certificate chain of the server. */
  cert?: string;
  /** PEM private key of the server. */
  key?: string;
  /** PEM CA certificates; when given, clients must present a certificate they signed. */
  ca?: string;
  /** TLS-PSK keys, one `username:hexkey` per line. */
  psk?: string;
}

export interface TlsCredentials {
  cert?: Buffer;
  key?: Buffer;
  ca?: Buffer;
  psk?: ReadonlyMap<string, Buffer>;
}

export interface SecuredSocket {
  socket: TLSSocket;
  peer: Peer;
  protocol: string;
  cipher: string;
}

export async function loadTlsCredentials(files: TlsFiles): Promise<TlsCredentials> {
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new OperationError('EINVAL', 'give the TLS certificate and its key together (--tls-cert and --tls-key)');
  }
  if (files.cert === undefined && files.psk === undefined) {
    throw new OperationError('EINVAL', 'TLS needs a certificate and key (--tls-cert, --tls-key) or a PSK file (--tls-psk)');
  }
  const credentials: TlsCredentials = {};
  if (files.cert !== undefined) credentials.cert = await readCredential(files.cert, 'certificate');
  if (files.key !== undefined) credentials.key = await readCredential(files.key, 'key');
  if (files.ca !== undefined) credentials.ca = await readCredential(files.ca, 'CA certificate');
  if (files.psk !== undefined) credentials.psk = parsePskFile((await readCredential(files.psk, 'PSK file')).toString('utf8'), files.psk);
  return credentials;
}

/** GnuTLS's PSK file: `username:hexkey` lines. */
export function parsePskFile(text: string, source: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split(/\r?\n/).forEach((line, index) => {
    if (line.trim() === '') return;
    const match = /^([^:]+):([0-9a-fA-F]+)$/.exec(line.trim());
    if (match === null || match[2]!.length % 2 !== 0) {
      throw new OperationError('EINVAL', `${source}:${index + 1}: expected "username:hexkey"`);
    }
    keys.set(match[1]!, Buffer.from(match[2]!, 'hex'));
  });
  if (keys.size === 0) throw new OperationError('EINVAL', `${source}: no keys`);
  return keys;
}

/**
 * With PSK keys: Node's PSK callback binds a key to SHA-256, and OpenSSL drops the PSK (falling
 * back to the certificate, which a PSK client cannot check) when a TLS 1.3 suite with another
 * hash is chosen; so TLS 1.3 keeps its SHA-256 suites only. TLS 1.2 adds the (EC)DHE-PSK suites,
 * which Node's default list excludes.
 */
const PSK_CIPHERS = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  ...DEFAULT_CIPHERS.split(':').filter((suite) => !suite.startsWith('TLS_') && suite !== '!PSK'),
].join(':');

export class TlsUpgrader {
  readonly #options: TlsOptions;
  readonly #psk: ReadonlyMap<string, Buffer> | undefined;

  constructor(credentials: TlsCredentials, handshakeTimeoutMs: number) {
    this.#psk = credentials.psk;
    this.#options = {
      cert: credentials.cert,
      key: credentials.key,
      ca: credentials.ca,
      requestCert: credentials.ca !== undefined,
      rejectUnauthorized: true,
      minVersion: 'TLSv1.2',
      ciphers: credentials.psk === undefined ? DEFAULT_CIPHERS : PSK_CIPHERS,
      ...(handshakeTimeoutMs > 0 ? { handshakeTimeout: handshakeTimeoutMs } : {}),
    };
    // Fails now, at start, on a key that does not match its certificate or a bad PEM file.
    try {
      createServer(this.#options);
    } catch (error) {
      throw new OperationError('EINVAL', `TLS credentials rejected: ${(error as Error).message}`, { cause: error });
    }
  }

  /** Whether client certificates are required and verified. */
  get verifiesClients(): boolean {
    return this.#options.requestCert === true;
  }

  /** True when some client can prove a name (client certificates or PSK identities). */
  get provesIdentities(): boolean {
    return this.verifiesClients || this.#psk !== undefined;
  }

  /**
   * Runs the server side of the TLS handshake on `raw`, whose unread bytes (if any) are the
   * client's first TLS records. Rejects, with `raw` destroyed, when the handshake fails.
   */
  upgrade(raw: Socket): Promise<SecuredSocket> {
    return new Promise((resolve, reject) => {
      let pskIdentity: string | undefined;
      const psk = this.#psk;
      const server = createServer({
        ...this.#options,
        ...(psk === undefined
          ? {}
          : {
              pskCallback: (_socket: TLSSocket, identity: string) => {
                const key = psk.get(identity);
                if (key !== undefined) pskIdentity = identity;
                return key ?? null;
              },
            }),
      });
      const onClose = (): void => reject(new Error('connection closed during the TLS handshake (for instance a client certificate that is missing or not trusted)'));
      raw.once('close', onClose);
      server.once('tlsClientError', (error: Error, socket: TLSSocket) => {
        raw.off('close', onClose);
        socket.destroy();
        raw.destroy();
        reject(error);
      });
      server.once('secureConnection', (socket: TLSSocket) => {
        raw.off('close', onClose);
        const verified = this.verifiesClients && socket.authorized;
        if (this.verifiesClients && !socket.authorized && pskIdentity === undefined) {
          socket.destroy();
          reject(new Error(`client certificate not trusted: ${String(socket.authorizationError)}`));
          return;
        }
        const names = pskIdentity !== undefined ? [pskIdentity] : verified ? certificateNames(socket.getPeerCertificate()) : [];
        resolve({ socket, peer: { names }, protocol: socket.getProtocol() ?? 'unknown', cipher: socket.getCipher().name });
      });
      server.emit('connection', raw);
    });
  }
}

/** The common name(s) and subject alternative names of a certificate. */
export function certificateNames(cert: PeerCertificate): string[] {
  const names = new Set<string>();
  const cn: unknown = cert.subject?.CN;
  for (const name of Array.isArray(cn) ? cn : [cn]) if (typeof name === 'string' && name !== '') names.add(name);
  // Node lists SANs as `DNS:a, IP Address:1.2.3.4, email:x`, quoting values that hold a comma.
  const entry = /(?:^|, )[A-Za-z ]+:(?:"((?:[^"\\]|\\.)*)"|([^,]*))/g;
  for (const match of (cert.subjectaltname ?? '').matchAll(entry)) {
    const value = match[1] !== undefined ? (JSON.parse(`"${match[1]}"`) as string) : match[2]!;
    if (value !== '') names.add(value);
  }
  return [...names];
}

async function readCredential(path: string, what: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (error) {
    throw new OperationError('EINVAL', `cannot read the TLS ${what} ${path}: ${(error as Error).message}`, { cause: error });
  }
}
