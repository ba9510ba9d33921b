/**
 * BlockMap against a naive Map<block, value>: random assigns over a small and a sparse domain,
 * every version kept and re-checked (persistence), in-place edits by two heads that share and
 * fork, structural invariants, and the checkpoint encoding round trip.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockMap, decodeMaps, encodeMaps, type MapNode } from '../../src/store/block-map.js';

type Assign = [lo: number, length: number, value: number];

/** The model: block -> value, absent meaning unallocated (0). */
function applyModel(model: Map<number, number>, [lo, length, value]: Assign): Map<number, number> {
  const next = new Map(model);
  for (let b = lo; b < lo + length; b++) {
    if (value === 0) next.delete(b);
    else next.set(b, value);
  }
  return next;
}

/** Runs of the model over [lo, hi), merged, gaps as 0. */
function modelRuns(model: Map<number, number>, lo: number, hi: number): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  for (let b = lo; b < hi; b++) {
    const value = model.get(b) ?? 0;
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === value && last[1] === b) last[1] = b + 1;
    else out.push([b, b + 1, value]);
  }
  return out;
}

function mapRuns(map: BlockMap, lo: number, hi: number): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  map.runs(lo, hi, (start, end, value) => {
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === value && last[1] === start) last[1] = end;
    else out.push([start, end, value]);
  });
  return out;
}

/** Checks the invariants of block-map.ts; returns the tree's height. */
function checkNode(node: MapNode, low: number, high: number): number {
  if (node.leaf) {
    const n = node.ext.length / 3;
    expect(n).toBeGreaterThan(0);
    expect(n).toBeLessThanOrEqual(64);
    let previousEnd = -Infinity;
    let previousValue = -1;
    for (let i = 0; i < n; i++) {
      const [start, length, value] = [node.ext[i * 3]!, node.ext[i * 3 + 1]!, node.ext[i * 3 + 2]!];
      expect(length).toBeGreaterThan(0);
      expect(value).not.toBe(0);
      expect(start).toBeGreaterThanOrEqual(Math.max(previousEnd, low));
      expect(start + length).toBeLessThanOrEqual(high);
      if (start === previousEnd) expect(value).not.toBe(previousValue);
      previousEnd = start + length;
      previousValue = value;
    }
    return 1;
  }
  expect(node.children.length).toBeGreaterThan(0);
  expect(node.children.length).toBeLessThanOrEqual(64);
  const heights = node.children.map((child, i) => {
    const first = child.leaf ? child.ext[0]! : child.keys[0]!;
    expect(node.keys[i]).toBe(first);
    return checkNode(child, node.keys[i]!, i + 1 < node.children.length ? node.keys[i + 1]! : high);
  });
  expect(new Set(heights).size).toBe(1);
  return heights[0]! + 1;
}

function check(map: BlockMap, model: Map<number, number>, domain: number): void {
  if (map.root !== null) checkNode(map.root, -Infinity, Infinity);
  expect(mapRuns(map, 0, domain)).toEqual(modelRuns(model, 0, domain));
  for (const [block, value] of model) expect(map.get(block)).toBe(value);
  expect(map.layerBlocks()).toBe([...model.values()].filter((value) => value >= 16).length);
}

function countNodes(maps: BlockMap[]): number {
  const seen = new Set<MapNode>();
  const walk = (node: MapNode): void => {
    if (seen.has(node)) return;
    seen.add(node);
    if (!node.leaf) node.children.forEach(walk);
  };
  for (const map of maps) if (map.root !== null) walk(map.root);
  return seen.size;
}

const values = fc.constantFrom(0, 1, 16, 17, 18);

function assigns(domain: number, maxLength: number): fc.Arbitrary<Assign[]> {
  return fc.array(fc.tuple(fc.nat(domain - 1), fc.integer({ min: 1, max: maxLength }), values), { maxLength: 300 });
}

describe('BlockMap', () => {
  it('matches a naive map, and every older version still matches its model', () => {
    fc.assert(
      fc.property(assigns(3000, 200), (ops) => {
        const versions: Array<[BlockMap, Map<number, number>]> = [[BlockMap.EMPTY, new Map()]];
        for (const op of ops) {
          const [map, model] = versions[versions.length - 1]!;
          versions.push([map.assign(op[0], op[0] + op[1], op[2]), applyModel(model, op)]);
        }
        for (const [map, model] of versions.filter((_, i) => i % 25 === 0 || i === versions.length - 1)) {
          check(map, model, 3200);
        }
        const [last, model] = versions[versions.length - 1]!;
        for (const value of [1, 16, 17]) {
          expect(last.count(100, 2100, value)).toBe([...model].filter(([b, v]) => b >= 100 && b < 2100 && v === value).length);
        }
      }),
      { numRuns: 120 },
    );
  });

  it('edits in place without changing any map shared before', () => {
    type Step =
      | { kind: 'write'; head: 0 | 1; op: Assign }
      | { kind: 'snapshot'; head: 0 | 1 }
      | { kind: 'fork'; from: 0 | 1 }
      | { kind: 'count'; head: 0 | 1 };
    const head = fc.constantFrom<0 | 1>(0, 1);
    const step: fc.Arbitrary<Step> = fc.oneof(
      { weight: 20, arbitrary: fc.record({ kind: fc.constant('write' as const), head, op: fc.tuple(fc.nat(2999), fc.integer({ min: 1, max: 120 }), values) }) },
      { weight: 2, arbitrary: fc.record({ kind: fc.constant('snapshot' as const), head }) },
      { weight: 1, arbitrary: fc.record({ kind: fc.constant('fork' as const), from: head }) },
      { weight: 2, arbitrary: fc.record({ kind: fc.constant('count' as const), head }) },
    );
    fc.assert(
      fc.property(fc.array(step, { maxLength: 400 }), (steps) => {
        const heads: Array<[BlockMap, Map<number, number>]> = [
          [BlockMap.EMPTY, new Map()],
          [BlockMap.EMPTY, new Map()],
        ];
        const shared: Array<[BlockMap, Map<number, number>]> = [];
        for (const s of steps) {
          if (s.kind === 'write') {
            const [map, model] = heads[s.head]!;
            heads[s.head] = [map.assignInPlace(s.op[0], s.op[0] + s.op[1], s.op[2]), applyModel(model, s.op)];
          } else if (s.kind === 'snapshot') {
            // What a snapshot does: the head's map goes to a second holder, and the head goes on writing.
            const [map, model] = heads[s.head]!;
            shared.push([map.share(), new Map(model)]);
          } else if (s.kind === 'fork') {
            const [map, model] = heads[s.from]!;
            heads[1 - s.from] = [map.share(), new Map(model)];
          } else {
            const [map, model] = heads[s.head]!;
            expect(map.layerBlocks()).toBe([...model.values()].filter((value) => value >= 16).length);
          }
        }
        for (const [map, model] of [...heads, ...shared]) check(map, model, 3200);
      }),
      { numRuns: 150 },
    );
  });

  it('grows deep trees with single blocks over a sparse domain', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(2 ** 32 - 1), values), { minLength: 500, maxLength: 3000 }), (points) => {
        // In place, with the map shared halfway: splits of owned and shared nodes at every level.
        let map = BlockMap.EMPTY;
        const model = new Map<number, number>();
        let halfway: [BlockMap, Map<number, number>] | undefined;
        for (const [i, [block, value]] of points.entries()) {
          if (i === points.length >> 1) halfway = [map.share(), new Map(model)];
          map = map.assignInPlace(block, block + 1, value);
          if (value === 0) model.delete(block);
          else model.set(block, value);
        }
        for (const [version, expected] of [[map, model], halfway!] as const) {
          if (version.root !== null) checkNode(version.root, -Infinity, Infinity);
          for (const [block, value] of expected) expect(version.get(block)).toBe(value);
          let stored = 0;
          version.extents(0, Infinity, (start, end) => {
            stored += end - start;
          });
          expect(stored).toBe(expected.size);
        }
      }),
      { numRuns: 20 },
    );
  });

  it('round-trips through the checkpoint encoding, keeping shared nodes shared', () => {
    fc.assert(
      fc.property(assigns(5000, 50), assigns(5000, 50), (base, divergence) => {
        let a = BlockMap.EMPTY;
        for (const [lo, length, value] of base) a = a.assign(lo, lo + length, value);
        let b = a;
        for (const [lo, length, value] of divergence) b = b.assign(lo, lo + length, value);
        const { bytes, roots } = encodeMaps([a, b, BlockMap.EMPTY]);
        const [a2, b2, empty] = decodeMaps(bytes, roots);
        expect(mapRuns(a2!, 0, 6000)).toEqual(mapRuns(a, 0, 6000));
        expect(mapRuns(b2!, 0, 6000)).toEqual(mapRuns(b, 0, 6000));
        expect(empty!.root).toBeNull();
        expect(countNodes([a2!, b2!])).toBe(countNodes([a, b]));
      }),
      { numRuns: 100 },
    );
  });

  it('replaces one value everywhere, in maps that share nodes, keeping them shared', () => {
    fc.assert(
      fc.property(assigns(3000, 200), assigns(3000, 50), fc.constantFrom(1, 16, 17), (base, diverge, to) => {
        let parent = BlockMap.EMPTY;
        let parentModel = new Map<number, number>();
        for (const op of base) {
          parent = parent.assign(op[0], op[0] + op[1], op[2]);
          parentModel = applyModel(parentModel, op);
        }
        let child = parent;
        let childModel = parentModel;
        for (const op of diverge) {
          child = child.assign(op[0], op[0] + op[1], op[2]);
          childModel = applyModel(childModel, op);
        }
        const replaced = (model: Map<number, number>): Map<number, number> =>
          new Map([...model].map(([block, value]) => [block, value === 18 ? to : value]));
        const memo = new Map<MapNode, MapNode>();
        const newParent = parent.replaceValue(18, to, memo);
        const newChild = child.replaceValue(18, to, memo);
        check(newParent, replaced(parentModel), 3200);
        check(newChild, replaced(childModel), 3200);
        check(parent, parentModel, 3200);
        check(child, childModel, 3200);
        // Replacing never adds nodes beyond those it rewrites, and shared ones are rewritten once.
        expect(countNodes([newParent, newChild])).toBeLessThanOrEqual(countNodes([parent, child]) + 2 * diverge.length + 2);
      }),
      { numRuns: 120 },
    );
  });
});
