/**
 * Packages from a Debian suite this machine's apt does not list (sid, for a newer nbd-client than
 * bookworm's), fetched straight from the archive through the same chain of trust apt uses:
 *
 *   dists/SUITE/InRelease            signature checked by gpgv against debian-archive-keyring
 *     └ SHA256 of main/binary-amd64/Packages.gz
 *         └ SHA256 and Size of each .deb (the index's Filename, SHA256 and Size fields)
 *
 *   CACHE/suites/SUITE/InRelease, Packages.gz  the index, kept until a .deb it names is gone
 *   CACHE/suites/SUITE/debs/NAME_VERSION_ARCH.deb
 *   CACHE/suites/SUITE/unpacked/NAME_VERSION_ARCH/  (unpackPackage)
 *
 * Dependencies are followed through Pre-Depends and Depends, taking the first alternative the
 * index has as a real package; version constraints are not compared, because one suite's index
 * agrees with itself and the caller checks the result with the suite's own dynamic loader. The
 * archive drops superseded versions, so when a .deb the cached index names is gone (404), the
 * index is fetched again, once. Valid-Until is not checked: the cached index is used for as long
 * as the archive still has its packages, which is the point of caching it, and every byte is
 * still tied to an archive key through the signature and the checksums.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { runCommand, unpackPackage } from './assets.js';

export const DEBIAN_ARCHIVE = 'http://deb.debian.org/debian';
const ARCHIVE_KEYRING = '/usr/share/keyrings/debian-archive-keyring.gpg';
const INDEX_PATH = 'main/binary-amd64/Packages.gz';
const DOWNLOAD_TIMEOUT_MS = 120_000;

/** One stanza of a Packages index: field name → value, continuation lines joined by "\n". */
export type Stanza = ReadonlyMap<string, string>;

/** Parses deb822 text (Packages, the signed part of InRelease) into stanzas. */
export function parseStanzas(text: string): Stanza[] {
  const stanzas: Stanza[] = [];
  let current = new Map<string, string>();
  let field: string | undefined;
  for (const line of text.split('\n')) {
    if (line.trim() === '') {
      if (current.size > 0) stanzas.push(current);
      current = new Map();
      field = undefined;
    } else if (line.startsWith(' ') || line.startsWith('\t')) {
      if (field !== undefined) current.set(field, `${current.get(field)!}\n${line.slice(1)}`);
    } else {
      const colon = line.indexOf(':');
      if (colon <= 0) continue;
      field = line.slice(0, colon);
      current.set(field, line.slice(colon + 1).trim());
    }
  }
  if (current.size > 0) stanzas.push(current);
  return stanzas;
}

/** A file's SHA256 and size as a Release file's SHA256 list gives them. */
export function releaseChecksum(release: Stanza, path: string): { sha256: string; size: number } {
  for (const line of (release.get('SHA256') ?? '').split('\n')) {
    const [sha256, size, name] = line.trim().split(/\s+/);
    if (name === path && sha256 !== undefined && /^[0-9a-f]{64}$/.test(sha256)) return { sha256, size: Number(size) };
  }
  throw new Error(`the Release file lists no SHA256 for ${path}`);
}

export interface SuitePackage {
  name: string;
  version: string;
  /** Relative to the archive root. */
  filename: string;
  sha256: string;
  size: number;
}

function toSuitePackage(stanza: Stanza): SuitePackage {
  const name = stanza.get('Package')!;
  const [version, filename, sha256, size] = ['Version', 'Filename', 'SHA256', 'Size'].map((field) => stanza.get(field));
  if (version === undefined || filename === undefined || sha256 === undefined || size === undefined) {
    throw new Error(`the index's stanza for ${name} lacks Version, Filename, SHA256 or Size`);
  }
  return { name, version, filename, sha256, size: Number(size) };
}

/**
 * Package name → the text of its stanza, parsed only when asked for (the whole of sid's index
 * is some 65 MB); the first stanza of a name wins. A Packages stanza starts with its Package field.
 */
export function indexPackages(text: string): Map<string, string> {
  const index = new Map<string, string>();
  for (const block of text.split('\n\n')) {
    const match = /^\s*Package:[ \t]*(\S+)/.exec(block);
    if (match !== null && !index.has(match[1]!)) index.set(match[1]!, block);
  }
  return index;
}

/**
 * `roots` and everything they depend on, roots first, each once. A relation none of whose
 * alternatives is a real package in the index (a virtual one) is an error, unless one of them
 * is in `skip`, which also stops the walk there.
 */
export function dependencyClosure(index: ReadonlyMap<string, string>, roots: readonly string[], skip: readonly string[] = []): SuitePackage[] {
  const order: SuitePackage[] = [];
  const seen = new Set<string>();
  const queue = [...roots];
  for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
    if (seen.has(name)) continue;
    seen.add(name);
    const text = index.get(name);
    const stanza = text === undefined ? undefined : parseStanzas(text)[0];
    if (stanza === undefined) throw new Error(`the index has no package ${name}`);
    order.push(toSuitePackage(stanza));
    const relations = [stanza.get('Pre-Depends'), stanza.get('Depends')].filter((value) => value !== undefined).join(',');
    for (const relation of relations.split(',')) {
      if (relation.trim() === '') continue;
      // "libfoo1 (>= 1.2) | libbar:any" → ["libfoo1", "libbar"]
      const alternatives = relation.split('|').map((alternative) => alternative.trim().split(/[\s(:]/, 1)[0]!);
      if (alternatives.some((alternative) => skip.includes(alternative))) continue;
      const real = alternatives.find((alternative) => index.has(alternative));
      if (real === undefined) throw new Error(`${name} depends on ${relation.trim()}, which the index has no package for`);
      queue.push(real);
    }
  }
  return order;
}

/** The name apt-get download gives a package's file. */
export function debFileName(pkg: SuitePackage): string {
  const architecture = /_([a-z0-9]+)\.deb$/.exec(pkg.filename)?.[1] ?? 'all';
  return `${pkg.name}_${pkg.version.replace(/:/g, '%3a')}_${architecture}.deb`;
}

class NotFoundError extends Error {}

async function download(url: string): Promise<Buffer> {
  const response = await fetch(url, { signal: AbortSignal.timeout(DOWNLOAD_TIMEOUT_MS) });
  if (response.status === 404) throw new NotFoundError(`${url}: 404 Not Found`);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
  return Buffer.from(await response.arrayBuffer());
}

function checkContent(what: string, data: Buffer, want: { sha256: string; size: number }): void {
  const sha256 = createHash('sha256').update(data).digest('hex');
  if (data.length !== want.size || sha256 !== want.sha256) {
    throw new Error(`${what}: ${data.length} bytes with SHA256 ${sha256}, the index says ${want.size} bytes with ${want.sha256}`);
  }
}

/** Writes beside the target and renames, so a cached file is always complete. */
async function writeAtomically(path: string, data: Buffer): Promise<void> {
  const partial = `${path}.partial-${process.pid}`;
  await writeFile(partial, data);
  await rename(partial, path);
}

/**
 * Keeps an InRelease file in `dir` and returns its signed content, once gpgv has found at least
 * one good signature by a Debian archive key and no bad one (a suite is signed by the keys of
 * several releases, and this machine's keyring may know only some of them).
 */
async function keepVerifiedInRelease(dir: string, data: Buffer): Promise<string> {
  const path = join(dir, 'InRelease');
  const partial = `${path}.partial-${process.pid}`;
  const output = `${path}.signed-${process.pid}`;
  await writeFile(partial, data);
  try {
    const result = await runCommand('gpgv', ['--status-fd', '1', '--keyring', ARCHIVE_KEYRING, '--output', output, partial]);
    const status = result.stdout.split('\n');
    const good = status.some((line) => line.startsWith('[GNUPG:] VALIDSIG '));
    const bad = status.some((line) => line.startsWith('[GNUPG:] BADSIG '));
    if (!good || bad || !existsSync(output)) {
      throw new Error(`gpgv found no good signature by a key in ${ARCHIVE_KEYRING} on the InRelease file:\n${result.stderr.trim()}`);
    }
    const signed = await readFile(output, 'utf8');
    await rename(partial, path);
    return signed;
  } finally {
    await rm(partial, { force: true });
    await rm(output, { force: true });
  }
}

/** Fetches the suite's InRelease and Packages.gz, checking each; returns Packages.gz's path. */
async function refreshIndex(dir: string, suite: string, log: (message: string) => void): Promise<string> {
  log(`fetching the ${suite} package index from ${DEBIAN_ARCHIVE}`);
  const signed = await keepVerifiedInRelease(dir, await download(`${DEBIAN_ARCHIVE}/dists/${suite}/InRelease`));
  const [release] = parseStanzas(signed);
  if (release === undefined) throw new Error(`${suite}'s InRelease holds no Release stanza`);
  const packages = await download(`${DEBIAN_ARCHIVE}/dists/${suite}/${INDEX_PATH}`);
  checkContent(`${suite} ${INDEX_PATH}`, packages, releaseChecksum(release, INDEX_PATH));
  const path = join(dir, 'Packages.gz');
  await writeAtomically(path, packages);
  return path;
}

async function readIndex(path: string): Promise<Map<string, string>> {
  return indexPackages(gunzipSync(await readFile(path)).toString('utf8'));
}

/** The .deb in the cache, downloaded when absent; its content is checked against the index. */
async function fetchDeb(debsDir: string, pkg: SuitePackage, log: (message: string) => void): Promise<string> {
  const path = join(debsDir, debFileName(pkg));
  if (existsSync(path)) {
    try {
      checkContent(path, await readFile(path), pkg);
      return path;
    } catch (error) {
      log(`${error instanceof Error ? error.message : String(error)}: downloading it again`);
    }
  }
  log(`downloading ${pkg.name} ${pkg.version}`);
  const data = await download(`${DEBIAN_ARCHIVE}/${pkg.filename}`);
  checkContent(`${pkg.name} ${pkg.version}`, data, pkg);
  await writeAtomically(path, data);
  return path;
}

export interface FetchedPackage extends SuitePackage {
  deb: string;
  /** dpkg -x of the .deb. */
  root: string;
}

/**
 * `roots` from `suite` with their dependency closure (see dependencyClosure), downloaded,
 * checked and unpacked in the cache. The first of the result is the first root.
 */
export async function fetchSuitePackages(
  cacheDir: string,
  suite: string,
  roots: readonly string[],
  options: { skip?: readonly string[]; log?: (message: string) => void } = {},
): Promise<FetchedPackage[]> {
  const log = options.log ?? ((): void => undefined);
  const dir = join(cacheDir, 'suites', suite);
  const debsDir = join(dir, 'debs');
  await mkdir(debsDir, { recursive: true });
  let indexPath = join(dir, 'Packages.gz');
  let refreshed = false;
  if (!existsSync(indexPath)) {
    indexPath = await refreshIndex(dir, suite, log);
    refreshed = true;
  }
  for (;;) {
    const closure = dependencyClosure(await readIndex(indexPath), roots, options.skip);
    try {
      const fetched: FetchedPackage[] = [];
      for (const pkg of closure) {
        const deb = await fetchDeb(debsDir, pkg, log);
        fetched.push({ ...pkg, deb, root: await unpackPackage(dir, deb) });
      }
      return fetched;
    } catch (error) {
      if (!(error instanceof NotFoundError) || refreshed) throw error;
      log(`${error.message}: the cached ${suite} index is out of date`);
      indexPath = await refreshIndex(dir, suite, log);
      refreshed = true;
    }
  }
}
