/**
 * Names and ids between the CO and the store.
 *
 * CSI names (CreateVolume.name, CreateSnapshot.name) are any Unicode string the CO likes;
 * store names are 1 to 128 of [A-Za-z0-9._-]. A CSI object of kind K named N may live under
 * one of two store names, tried in this order:
 *
 *   1. N itself, when N is a plain DNS label (Kubernetes' `pvc-<uuid>`, `snapshot-<uuid>`),
 *      so operators see the names the CO shows them;
 *   2. `csi_` + K's letter + `_` + 32 hex digits of SHA-256(K NUL N), for every other N, and for
 *      a plain N whose store name is already held by something else (a volume and a snapshot of
 *      the same CSI name, or a volume made by hand).
 *
 * The two forms never meet: a plain label has no `_`. Which candidate an object took is not
 * derived but recorded: the object carries labels with the driver's name and its CSI name, and a
 * lookup tries both candidates and takes the one whose labels claim (driver, kind, N). Nothing of
 * N ever reaches a file path or a URL unescaped: the store names files by layer id, and the admin
 * client escapes names in URLs.
 *
 * Ids the CO gives back (volume_id, snapshot_id) are store names; one that does not match the
 * store's rule names nothing, so it is NOT_FOUND (or OK for a delete) without asking the daemon.
 *
 * Page tokens are `p1.` + base64url(store name of the first entry of the next page). Listing in
 * name order from a name keeps pages consistent while objects come and go: nothing is listed twice
 * and nothing that existed throughout is skipped. A token that does not decode to a store name is
 * ABORTED, as the spec asks.
 */
import { createHash } from 'node:crypto';

export type ObjectKind = 'volume' | 'snapshot';

const PLAIN_NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const STORE_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
// Control characters other than the common whitespace: the spec's banned set for names.
const BANNED = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/;
/** Longest CSI name kept: it travels as a store label value. */
export const MAX_CSI_NAME_LENGTH = 1024;
const TOKEN_PREFIX = 'p1.';

/** Why a CSI name cannot be used, or undefined when it can. */
export function csiNameProblem(name: string): string | undefined {
  if (name === '') return 'is empty';
  if (name.length > MAX_CSI_NAME_LENGTH) return `is longer than ${MAX_CSI_NAME_LENGTH} characters`;
  if (BANNED.test(name)) return 'contains control characters';
  return undefined;
}

export function hashedStoreName(kind: ObjectKind, name: string): string {
  // UTF-16 code units, so that every JS string hashes apart (UTF-8 would merge lone surrogates).
  const digest = createHash('sha256').update(`${kind}\0${name}`, 'utf16le').digest('hex');
  return `csi_${kind === 'volume' ? 'v' : 's'}_${digest.slice(0, 32)}`;
}

/** The store names a CSI object may live under, most readable first. */
export function storeNameCandidates(kind: ObjectKind, name: string): string[] {
  const hashed = hashedStoreName(kind, name);
  return PLAIN_NAME.test(name) ? [name, hashed] : [hashed];
}

/** Whether an id the CO gave back can name anything in the store. */
export function isStoreName(id: string): boolean {
  return STORE_NAME.test(id) && !id.includes('..');
}

export function encodePageToken(storeName: string): string {
  return TOKEN_PREFIX + Buffer.from(storeName, 'utf8').toString('base64url');
}

/** The store name a page starts at, or undefined for a token this driver did not make. */
export function decodePageToken(token: string): string | undefined {
  if (!token.startsWith(TOKEN_PREFIX)) return undefined;
  const encoded = token.slice(TOKEN_PREFIX.length);
  const name = Buffer.from(encoded, 'base64url').toString('utf8');
  if (!isStoreName(name) || encodePageToken(name) !== token) return undefined;
  return name;
}
