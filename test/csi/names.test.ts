/**
 * CSI names to store names, ids and page tokens: any name maps to store names the daemon accepts,
 * distinct names and kinds never share a store name, and only tokens the driver made decode.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { csiNameProblem, decodePageToken, encodePageToken, isStoreName, storeNameCandidates } from '../../src/csi/names.js';

// The daemon's rule for names, written out here rather than imported.
const DAEMON_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const kind = fc.constantFrom('volume' as const, 'snapshot' as const);
const anyName = fc.string({ minLength: 1, maxLength: 200, unit: 'binary' });
const plainName = fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/);

describe('store name candidates', () => {
  it('are names the daemon accepts, whatever the CSI name', () => {
    fc.assert(
      fc.property(kind, fc.oneof(anyName, plainName), (k, name) => {
        for (const candidate of storeNameCandidates(k, name)) {
          expect(candidate).toMatch(DAEMON_NAME);
          expect(candidate.includes('..')).toBe(false);
          expect(isStoreName(candidate)).toBe(true);
        }
      }),
    );
  });

  it('keep a plain DNS label as it is, first, with a hashed fallback', () => {
    expect(storeNameCandidates('volume', 'pvc-0b6c9a52-3f1e-4c43-9a0e-0d1f2e3a4b5c')).toEqual([
      'pvc-0b6c9a52-3f1e-4c43-9a0e-0d1f2e3a4b5c',
      expect.stringMatching(/^csi_v_[0-9a-f]{32}$/),
    ]);
    expect(storeNameCandidates('snapshot', '../etc/passwd')).toEqual([expect.stringMatching(/^csi_s_[0-9a-f]{32}$/)]);
    expect(storeNameCandidates('volume', 'Upper')).toHaveLength(1);
  });

  it('differ between distinct (kind, name) pairs, except a plain name shared by both kinds', () => {
    fc.assert(
      fc.property(kind, fc.oneof(anyName, plainName), kind, fc.oneof(anyName, plainName), (k1, n1, k2, n2) => {
        fc.pre(k1 !== k2 || n1 !== n2);
        const first = storeNameCandidates(k1, n1);
        const second = storeNameCandidates(k2, n2);
        const shared = first.filter((candidate) => second.includes(candidate));
        expect(shared).toEqual(n1 === n2 && first.length === 2 ? [n1] : []);
      }),
    );
  });
});

describe('CSI names', () => {
  it('are refused when empty, too long, or with control characters', () => {
    expect(csiNameProblem('')).toBeDefined();
    expect(csiNameProblem('x'.repeat(1025))).toBeDefined();
    for (const bad of ['a\u0000b', 'a\u0008', '\u000b', '\u001f', '\u007f', '\u0085', '\u009f']) expect(csiNameProblem(bad)).toBeDefined();
    for (const good of ['pvc-1', 'with space', 'tab\tand\nnewline\r', 'ünïcødé ✓', 'x'.repeat(1024)]) expect(csiNameProblem(good)).toBeUndefined();
  });
});

describe('ids given back by the CO', () => {
  it('name something only when they follow the daemon rule', () => {
    for (const id of ['pvc-1', 'csi_v_0123', 'a.b_c-d', 'A'.repeat(128)]) expect(isStoreName(id)).toBe(true);
    for (const id of ['', '.hidden', '-x', 'a/b', '..', 'a..b', 'A'.repeat(129), 'ü', 'a b', 'a\u0000']) expect(isStoreName(id)).toBe(false);
  });
});

describe('page tokens', () => {
  it('round-trip every store name', () => {
    fc.assert(
      fc.property(fc.stringMatching(DAEMON_NAME), (name) => {
        fc.pre(!name.includes('..'));
        expect(decodePageToken(encodePageToken(name))).toBe(name);
      }),
    );
  });

  it('decode nothing they were not made from', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (token) => {
        const decoded = decodePageToken(token);
        if (decoded !== undefined) expect(encodePageToken(decoded)).toBe(token);
      }),
    );
    for (const token of ['', 'invalid-token', 'p1.', 'p1.Li4', 'p1.Li4vZXRj', `p1.${Buffer.from('a/b').toString('base64url')}`, 'p2.cHZj']) {
      expect(decodePageToken(token)).toBeUndefined();
    }
  });
});
