/**
 * Per-export access: read-only, and an allow-list of client names.
 *
 * A peer is the set of names its TLS credentials proved: the common name and subject alternative
 * names of a client certificate that the configured CA verified, or the identity of a TLS-PSK key.
 * A peer without proven names (plain TCP, TLS without a client certificate) passes no allow-list.
 *
 * An export a peer may not use is hidden rather than forbidden: it is left out of NBD_OPT_LIST
 * and INFO/GO answer NBD_REP_ERR_UNKNOWN, exactly as for an export that does not exist, so a
 * client cannot probe which names exist. (ERR_POLICY would confirm the name.)
 *
 * Read-only from the policy adds to read-only from the store (snapshots); it never lifts it.
 *
 * The configuration, from `--access FILE` or the `access` key of the serve config:
 *   { "default": RULE, "exports": { "NAME": RULE, ... } }     RULE = { "readOnly"?, "allow"? }
 * An export named in `exports` takes that rule, any other export takes `default`, and without a
 * `default` it is open and writable. `allow` absent: anyone; `allow: []`: no one.
 */
import { readFile } from 'node:fs/promises';
import type { HandshakeCatalog, HandshakeExport } from '../nbd/server-handshake.js';
import type { ExportCatalog } from '../store/types.js';
import { OperationError } from '../util/errors.js';

export interface ExportRule {
  readOnly: boolean;
  /** Client names that may use the export; absent means anyone. */
  allow?: readonly string[];
}

export interface Peer {
  /** Names the peer's credentials proved (certificate CN and SANs, or the PSK identity). */
  names: readonly string[];
}

export const ANONYMOUS: Peer = { names: [] };

const OPEN_RULE: ExportRule = { readOnly: false };

export class AccessPolicy {
  static readonly OPEN = new AccessPolicy(OPEN_RULE, new Map());

  readonly #defaultRule: ExportRule;
  readonly #rules: ReadonlyMap<string, ExportRule>;

  constructor(defaultRule: ExportRule, rules: ReadonlyMap<string, ExportRule>) {
    this.#defaultRule = defaultRule;
    this.#rules = rules;
  }

  /** True when some export admits only named peers, which needs TLS client identities. */
  get hasAllowLists(): boolean {
    return this.#defaultRule.allow !== undefined || [...this.#rules.values()].some((rule) => rule.allow !== undefined);
  }

  ruleFor(exportName: string): ExportRule {
    return this.#rules.get(exportName) ?? this.#defaultRule;
  }

  permits(exportName: string, peer: Peer): boolean {
    const allow = this.ruleFor(exportName).allow;
    return allow === undefined || peer.names.some((name) => allow.includes(name));
  }

  /** The exports as `peer` sees them: hidden when not allowed, read-only when the rule says so. */
  view(catalog: ExportCatalog, peer: Peer): HandshakeCatalog {
    const apply = (exp: HandshakeExport | undefined): HandshakeExport | undefined => {
      if (exp === undefined || !this.permits(exp.name, peer)) return undefined;
      return this.ruleFor(exp.name).readOnly && !exp.readOnly ? { ...exp, readOnly: true } : exp;
    };
    return {
      describe: (name) => apply(catalog.describe(name)),
      list: () => catalog.list().flatMap((exp) => apply(exp) ?? []),
    };
  }
}

/** Validates an access configuration (parsed JSON); `source` names it in error messages. */
export function parseAccessConfig(value: unknown, source: string): AccessPolicy {
  const fail = (message: string): never => {
    throw new OperationError('EINVAL', `${source}: ${message}`);
  };
  if (!isObject(value)) return fail('expected an object like {"exports": {"NAME": {"readOnly": true}}}');
  checkKeys(value, ['default', 'exports'], 'top level', fail);
  const defaultRule = value.default === undefined ? OPEN_RULE : parseRule(value.default, 'default', fail);
  const rules = new Map<string, ExportRule>();
  if (value.exports !== undefined) {
    if (!isObject(value.exports)) return fail('"exports" must be an object of export name → rule');
    for (const [name, rule] of Object.entries(value.exports)) {
      rules.set(name, parseRule(rule, `exports["${name}"]`, fail));
    }
  }
  return new AccessPolicy(defaultRule, rules);
}

export async function loadAccessFile(path: string): Promise<AccessPolicy> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw new OperationError('EINVAL', `cannot read the access file ${path}: ${(error as Error).message}`, { cause: error });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new OperationError('EINVAL', `${path}: not valid JSON: ${(error as Error).message}`, { cause: error });
  }
  return parseAccessConfig(value, path);
}

function parseRule(value: unknown, where: string, fail: (message: string) => never): ExportRule {
  if (!isObject(value)) return fail(`${where} must be an object like {"readOnly": true, "allow": ["client-cn"]}`);
  checkKeys(value, ['readOnly', 'allow'], where, fail);
  if (value.readOnly !== undefined && typeof value.readOnly !== 'boolean') fail(`${where}.readOnly must be true or false`);
  const rule: ExportRule = { readOnly: value.readOnly === true };
  if (value.allow !== undefined) {
    const allow = value.allow;
    if (!Array.isArray(allow) || !allow.every((name) => typeof name === 'string' && name !== '')) {
      return fail(`${where}.allow must be a list of client names (certificate CN or SAN, or PSK identity)`);
    }
    rule.allow = allow as string[];
  }
  return rule;
}

function checkKeys(value: Record<string, unknown>, known: readonly string[], where: string, fail: (message: string) => never): void {
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) fail(`unknown key "${key}" in ${where} (known: ${known.join(', ')})`);
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
