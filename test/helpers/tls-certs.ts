/**
 * Throwaway X.509 material for TLS tests, made with the openssl CLI in a temp dir: a CA, a server
 * certificate for 127.0.0.1 / localhost, and client certificates, shaped so that GnuTLS (libnbd,
 * qemu) accepts them: the CA has basicConstraints CA:TRUE and keyUsage keyCertSign, the server
 * certificate has the SANs and extendedKeyUsage serverAuth, client certificates clientAuth.
 *
 * `clientDir(name)` is a directory in the layout libnbd's `tls-certificates=DIR` and qemu's
 * `tls-creds-x509,dir=DIR` read: ca-cert.pem, plus client-cert.pem and client-key.pem when a
 * client name is given.
 */
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { findTool, runOk } from './tools.js';

export interface KeyPair {
  cert: string;
  key: string;
}

export interface ClientSpec {
  /** File name stem and the certificate's CN. */
  name: string;
  /** Extra subjectAltName entries, e.g. ['DNS:backup.example', 'email:ops@example']. */
  altNames?: readonly string[];
  /** Sign with the second, untrusted CA instead. */
  untrusted?: boolean;
}

export interface TlsFixture {
  dir: string;
  ca: KeyPair;
  /** A CA the server does not trust. */
  otherCa: KeyPair;
  server: KeyPair;
  clients: ReadonlyMap<string, KeyPair>;
  /** A client credentials directory for libnbd and qemu; with `client`, its certificate too. */
  clientDir(client?: string): Promise<string>;
}

const DAYS = '2';

function openssl(): string {
  const path = findTool('openssl');
  if (path === undefined) throw new Error('openssl is needed to make test certificates (Debian package "openssl")');
  return path;
}

async function makeCa(bin: string, dir: string, name: string): Promise<KeyPair> {
  const pair = { cert: join(dir, `${name}-cert.pem`), key: join(dir, `${name}-key.pem`) };
  await runOk(bin, [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', pair.key, '-out', pair.cert, '-days', DAYS, '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  return pair;
}

async function makeLeaf(bin: string, dir: string, name: string, ca: KeyPair, extensions: string[]): Promise<KeyPair> {
  const pair = { cert: join(dir, `${name}-cert.pem`), key: join(dir, `${name}-key.pem`) };
  const csr = join(dir, `${name}.csr`);
  const extFile = join(dir, `${name}.ext`);
  await runOk(bin, [
    'req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', pair.key, '-out', csr, '-subj', `/CN=${name}`,
  ]);
  await writeFile(extFile, `${extensions.join('\n')}\n`);
  await runOk(bin, [
    'x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-set_serial', `0x${randomBytes(8).toString('hex')}`,
    '-out', pair.cert, '-days', DAYS, '-extfile', extFile,
  ]);
  return pair;
}

const LEAF = ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment'];

export async function makeTlsFixture(dir: string, clients: readonly ClientSpec[] = []): Promise<TlsFixture> {
  const bin = openssl();
  await mkdir(dir, { recursive: true });
  const ca = await makeCa(bin, dir, 'ca');
  const otherCa = await makeCa(bin, dir, 'other-ca');
  const server = await makeLeaf(bin, dir, 'server', ca, [
    ...LEAF,
    'extendedKeyUsage=serverAuth',
    'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ]);
  const made = new Map<string, KeyPair>();
  for (const client of clients) {
    const sans = client.altNames ?? [];
    made.set(
      client.name,
      await makeLeaf(bin, dir, client.name, client.untrusted === true ? otherCa : ca, [
        ...LEAF,
        'extendedKeyUsage=clientAuth',
        ...(sans.length > 0 ? [`subjectAltName=${sans.join(',')}`] : []),
      ]),
    );
  }
  let dirs = 0;
  return {
    dir,
    ca,
    otherCa,
    server,
    clients: made,
    async clientDir(client) {
      const target = join(dir, `client-dir-${++dirs}`);
      await mkdir(target);
      await copyFile(ca.cert, join(target, 'ca-cert.pem'));
      if (client !== undefined) {
        const pair = made.get(client);
        if (pair === undefined) throw new Error(`no client certificate named ${client}`);
        await copyFile(pair.cert, join(target, 'client-cert.pem'));
        await copyFile(pair.key, join(target, 'client-key.pem'));
      }
      return target;
    },
  };
}
