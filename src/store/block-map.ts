/**
 * BlockMap: which layer holds each 4 KiB block of a volume, as a persistent (immutable,
 * path-copying) B+tree of extents. Every change returns a new map that shares all untouched
 * nodes with the old one, so a snapshot or clone takes the map as it is, in O(1), and the two
 * then diverge by copying only the paths they change.
 *
 *                       Inner  keys: [0 | 900 | 5000]            keys[i] = first start in child i
 *                      /           |             \
 *   Leaf [0+16 -> L7, 40+8 -> Z] [900+1 -> L9] [5000+300 -> L7, 9000+1 -> L12]
 *         start+length -> value, packed three numbers per extent in one array
 *
 * Values: UNALLOCATED (0) is never stored (it is every gap between extents); ZERO (1) masks what
 * a parent holds; anything from FIRST_LAYER_ID up names a layer.
 *
 * Invariants: extents are sorted, do not overlap, have length > 0; two touching extents never
 * share a value (assign merges them); every node is non-empty and holds at most CAPACITY
 * entries; all leaves are at the same depth; keys are exact (the first start of the child).
 * Consequently an extent of child i ends at or before keys[i + 1].
 *
 * Deletion does not rebalance: a node may stay under-full. Height still only grows by splits
 * and shrinks when the root has one child, so depth stays logarithmic in the number of extents
 * ever stored. Memory per extent is 24 bytes in a full leaf, about 35 in a typical one; a
 * sequentially written run is one extent however long.
 */
export const UNALLOCATED = 0;
export const ZERO = 1;
export const FIRST_LAYER_ID = 16;

const CAPACITY = 64;

interface Leaf {
  readonly leaf: true;
  /** [start, length, value] per extent. */
  readonly ext: number[];
}

interface Inner {
  readonly leaf: false;
  readonly keys: number[];
  readonly children: readonly MapNode[];
}

export type MapNode = Leaf | Inner;

/** Called for consecutive runs; return true to stop early. */
export type RunVisitor = (start: number, end: number, value: number) => boolean | void;

function firstStart(node: MapNode): number {
  return node.leaf ? node.ext[0]! : node.keys[0]!;
}

function makeLeaf(ext: number[]): Leaf {
  return { leaf: true, ext };
}

function makeInner(children: MapNode[]): Inner {
  const keys = newArray(children.length);
  for (let i = 0; i < children.length; i++) keys[i] = firstStart(children[i]!);
  return { leaf: false, keys, children };
}

/** Leaves from a packed extent array, split in two when over capacity. */
function leavesOf(ext: number[]): MapNode[] {
  const count = ext.length / 3;
  if (count === 0) return [];
  if (count <= CAPACITY) return [makeLeaf(ext)];
  const half = count >> 1;
  return [makeLeaf(ext.slice(0, half * 3)), makeLeaf(ext.slice(half * 3))];
}

function innersOf(children: MapNode[]): MapNode[] {
  if (children.length === 0) return [];
  if (children.length <= CAPACITY) return [makeInner(children)];
  const half = children.length >> 1;
  return [makeInner(children.slice(0, half)), makeInner(children.slice(half))];
}

/**
 * Nodes hold plain number arrays, not typed arrays: V8 allocates a typed array of this size
 * outside the heap, which made every path copy several times slower; a packed array of numbers
 * costs the same 8 bytes per entry.
 */
function newArray(length: number): number[] {
  return new Array<number>(length).fill(0);
}

/** Copies ext[from, to) to out[at...]. */
function copy(ext: number[], from: number, to: number, out: number[], at: number): void {
  for (let i = from; i < to; i++) out[at++] = ext[i]!;
}

/** Index of the first extent of a leaf that ends after `block`. */
function firstEndingAfter(ext: number[], block: number): number {
  let lo = 0;
  let hi = ext.length / 3;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ext[mid * 3]! + ext[mid * 3 + 1]! > block) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/** Index of the child that may hold `block`: the last whose key is <= block, or 0. */
function childFor(keys: number[], block: number): number {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (keys[mid]! <= block) lo = mid + 1;
    else hi = mid;
  }
  return lo === 0 ? 0 : lo - 1;
}

/** Visits stored extents overlapping [lo, hi), clipped; returns true if the visitor stopped. */
function visitExtents(node: MapNode, lo: number, hi: number, visit: RunVisitor): boolean {
  if (node.leaf) {
    const ext = node.ext;
    const count = ext.length / 3;
    for (let i = firstEndingAfter(ext, lo); i < count; i++) {
      const start = ext[i * 3]!;
      if (start >= hi) break;
      const end = start + ext[i * 3 + 1]!;
      if (visit(Math.max(start, lo), Math.min(end, hi), ext[i * 3 + 2]!) === true) return true;
    }
    return false;
  }
  const { keys, children } = node;
  for (let i = childFor(keys, lo); i < children.length && keys[i]! < hi; i++) {
    if (visitExtents(children[i]!, lo, hi, visit)) return true;
  }
  return false;
}

/** Removes [lo, hi) from every extent; returns the replacement nodes (the same node if untouched). */
function clear(node: MapNode, lo: number, hi: number): MapNode[] {
  if (node.leaf) {
    const ext = node.ext;
    const count = ext.length / 3;
    const first = firstEndingAfter(ext, lo);
    let last = first;
    while (last < count && ext[last * 3]! < hi) last++;
    if (first === last) return [node];
    const leftCut = ext[first * 3]! < lo;
    const lastEnd = ext[(last - 1) * 3]! + ext[(last - 1) * 3 + 1]!;
    const rightCut = lastEnd > hi;
    const out = newArray((first + (leftCut ? 1 : 0) + (rightCut ? 1 : 0) + count - last) * 3);
    copy(ext, 0, first * 3, out, 0);
    let at = first * 3;
    if (leftCut) {
      out[at] = ext[first * 3]!;
      out[at + 1] = lo - ext[first * 3]!;
      out[at + 2] = ext[first * 3 + 2]!;
      at += 3;
    }
    if (rightCut) {
      out[at] = hi;
      out[at + 1] = lastEnd - hi;
      out[at + 2] = ext[(last - 1) * 3 + 2]!;
      at += 3;
    }
    copy(ext, last * 3, ext.length, out, at);
    return leavesOf(out);
  }
  const { keys, children } = node;
  const from = childFor(keys, lo);
  // Built only once a child changes: most clears (a first write) change nothing.
  let replaced: MapNode[] | undefined;
  let i = from;
  for (; i < children.length && keys[i]! < hi; i++) {
    const child = children[i]!;
    const nextKey = i + 1 < children.length ? keys[i + 1]! : Infinity;
    const result = keys[i]! >= lo && nextKey <= hi ? [] : clear(child, lo, hi);
    if (replaced === undefined) {
      if (result.length === 1 && result[0] === child) continue;
      replaced = children.slice(0, i);
    }
    replaced.push(...result);
  }
  if (replaced === undefined) return [node];
  for (; i < children.length; i++) replaced.push(children[i]!);
  return innersOf(replaced);
}

/** Inserts an extent into a range that holds none; returns the replacement nodes. */
function insert(node: MapNode, start: number, length: number, value: number): MapNode[] {
  if (node.leaf) {
    const out = node.ext.slice();
    out.splice(firstEndingAfter(out, start) * 3, 0, start, length, value);
    return leavesOf(out);
  }
  const index = childFor(node.keys, start);
  const replacement = insert(node.children[index]!, start, length, value);
  if (replacement.length === 1) {
    // No split below: one child and its key change, the rest is copied as it is.
    const children = node.children.slice();
    children[index] = replacement[0]!;
    const keys = node.keys.slice();
    keys[index] = firstStart(replacement[0]!);
    return [{ leaf: false, keys, children }];
  }
  const children = node.children.slice(0, index);
  for (const child of replacement) children.push(child);
  for (let i = index + 1; i < node.children.length; i++) children.push(node.children[i]!);
  return innersOf(children);
}

/**
 * `node` with every extent of value `from` holding `to` instead, extents that come to touch with
 * equal values merged within a leaf. Starts never move, so keys stay exact; `memo` keeps a node
 * shared by several maps shared after the change.
 */
function replaceIn(node: MapNode, from: number, to: number, memo: Map<MapNode, MapNode>): MapNode {
  const known = memo.get(node);
  if (known !== undefined) return known;
  let result: MapNode = node;
  if (node.leaf) {
    const ext = node.ext;
    let found = false;
    for (let i = 2; i < ext.length && !found; i += 3) found = ext[i] === from;
    if (found) {
      const out: number[] = [];
      for (let i = 0; i < ext.length; i += 3) {
        const start = ext[i]!;
        const length = ext[i + 1]!;
        const value = ext[i + 2] === from ? to : ext[i + 2]!;
        const last = out.length - 3;
        if (last >= 0 && out[last + 2] === value && out[last]! + out[last + 1]! === start) out[last + 1]! += length;
        else out.push(start, length, value);
      }
      result = makeLeaf(out);
    }
  } else {
    let changed = false;
    const children = node.children.map((child) => {
      const replaced = replaceIn(child, from, to, memo);
      if (replaced !== child) changed = true;
      return replaced;
    });
    if (changed) result = makeInner(children);
  }
  memo.set(node, result);
  return result;
}

/**
 * Blocks under each node that name a layer. Nodes never change, so the count holds for good,
 * and a map that shares all but a changed path with one counted before is counted in
 * O(depth * CAPACITY): a clone's reply stays fast however fragmented its source is.
 */
const layerBlocksUnder = new WeakMap<MapNode, number>();

function layerBlocksIn(node: MapNode): number {
  const known = layerBlocksUnder.get(node);
  if (known !== undefined) return known;
  let total = 0;
  if (node.leaf) {
    const ext = node.ext;
    for (let i = 0; i < ext.length; i += 3) if (ext[i + 2]! >= FIRST_LAYER_ID) total += ext[i + 1]!;
  } else {
    for (const child of node.children) total += layerBlocksIn(child);
  }
  layerBlocksUnder.set(node, total);
  return total;
}

function rootOf(nodes: MapNode[]): MapNode | null {
  if (nodes.length === 0) return null;
  let root: MapNode = nodes.length === 1 ? nodes[0]! : makeInner(nodes);
  while (!root.leaf && root.children.length === 1) root = root.children[0]!;
  return root;
}

export class BlockMap {
  static readonly EMPTY = new BlockMap(null);

  readonly root: MapNode | null;

  constructor(root: MapNode | null) {
    this.root = root;
  }

  /** The value of one block. */
  get(block: number): number {
    let node = this.root;
    if (node === null) return UNALLOCATED;
    while (!node.leaf) node = node.children[childFor(node.keys, block)]!;
    const ext = node.ext;
    const i = firstEndingAfter(ext, block);
    return i < ext.length / 3 && ext[i * 3]! <= block ? ext[i * 3 + 2]! : UNALLOCATED;
  }

  /** The stored extent containing `block`, as [start, end, value], or undefined in a gap. */
  extentAt(block: number): [number, number, number] | undefined {
    let node = this.root;
    if (node === null || block < 0) return undefined;
    while (!node.leaf) node = node.children[childFor(node.keys, block)]!;
    const ext = node.ext;
    const i = firstEndingAfter(ext, block);
    if (i >= ext.length / 3 || ext[i * 3]! > block) return undefined;
    return [ext[i * 3]!, ext[i * 3]! + ext[i * 3 + 1]!, ext[i * 3 + 2]!];
  }

  /** Visits consecutive runs covering [lo, hi) exactly, gaps as UNALLOCATED. */
  runs(lo: number, hi: number, visit: RunVisitor): void {
    if (lo >= hi) return;
    let at = lo;
    const stopped =
      this.root !== null &&
      visitExtents(this.root, lo, hi, (start, end, value) => {
        if (start > at && visit(at, start, UNALLOCATED) === true) return true;
        at = end;
        return visit(start, end, value);
      });
    if (!stopped && at < hi) visit(at, hi, UNALLOCATED);
  }

  /** Visits stored extents only (no gaps) overlapping [lo, hi), clipped. */
  extents(lo: number, hi: number, visit: RunVisitor): void {
    if (this.root !== null && lo < hi) visitExtents(this.root, lo, hi, visit);
  }

  /** Blocks in [lo, hi) whose value is `value` (not UNALLOCATED). */
  count(lo: number, hi: number, value: number): number {
    let total = 0;
    this.extents(lo, hi, (start, end, v) => {
      if (v === value) total += end - start;
    });
    return total;
  }

  /** Blocks that name a layer (neither unallocated nor zero). */
  layerBlocks(): number {
    return this.root === null ? 0 : layerBlocksIn(this.root);
  }

  /**
   * A map where every block holding `from` holds `to`, in one pass over the tree rather than an
   * assign per extent. Pass the same `memo` for maps that share nodes, and they keep sharing them.
   */
  replaceValue(from: number, to: number, memo: Map<MapNode, MapNode> = new Map()): BlockMap {
    if (this.root === null || from === to) return this;
    let map = new BlockMap(replaceIn(this.root, from, to, memo));
    if (map.root === this.root) return this;
    // Extents that now touch with the same value across a leaf boundary are merged by assign.
    const joins: Array<[number, number]> = [];
    let previous: [number, number, number] | undefined;
    map.extents(0, Infinity, (start, end, value) => {
      if (previous !== undefined && previous[1] === start && previous[2] === value && value === to) joins.push([previous[0], end]);
      previous = [start, end, value];
    });
    for (const [start, end] of joins) map = map.assign(start, end, to);
    return map;
  }

  /** A map where [lo, hi) holds `value`; untouched nodes are shared with this one. */
  assign(lo: number, hi: number, value: number): BlockMap {
    if (lo >= hi) return this;
    if (value !== UNALLOCATED) {
      const left = this.extentAt(lo - 1);
      if (left !== undefined && left[2] === value) {
        lo = left[0];
        hi = Math.max(hi, left[1]);
      }
      const right = this.extentAt(hi);
      if (right !== undefined && right[2] === value) hi = right[1];
    }
    let root = this.root === null ? null : rootOf(clear(this.root, lo, hi));
    if (value !== UNALLOCATED) {
      root = root === null ? makeLeaf([lo, hi - lo, value]) : rootOf(insert(root, lo, hi - lo, value));
    }
    return root === this.root ? this : new BlockMap(root);
  }
}

/**
 * Serialises the node graph of several maps once, keeping sharing: each node is written once,
 * children before parents. Layout, little endian: per node a u8 kind (0 leaf, 1 inner), a u32
 * count, then a leaf's count*3 f64, or an inner's count f64 keys and count u32 child indexes.
 * Returns the bytes and, per map, the index of its root (-1 for an empty map).
 */
export function encodeMaps(maps: readonly BlockMap[]): { bytes: Buffer; roots: number[] } {
  const index = new Map<MapNode, number>();
  const order: MapNode[] = [];
  let size = 0;
  const visit = (root: MapNode): void => {
    const stack: Array<{ node: MapNode; next: number }> = [{ node: root, next: 0 }];
    while (stack.length > 0) {
      const top = stack[stack.length - 1]!;
      const { node } = top;
      if (!node.leaf && top.next < node.children.length) {
        const child = node.children[top.next++]!;
        if (!index.has(child)) stack.push({ node: child, next: 0 });
        continue;
      }
      stack.pop();
      if (index.has(node)) continue;
      index.set(node, order.length);
      order.push(node);
      size += 5 + (node.leaf ? node.ext.length * 8 : node.keys.length * 12);
    }
  };
  const roots = maps.map((map) => {
    if (map.root === null) return -1;
    if (!index.has(map.root)) visit(map.root);
    return index.get(map.root)!;
  });
  const bytes = Buffer.alloc(size);
  let at = 0;
  for (const node of order) {
    if (node.leaf) {
      bytes.writeUInt8(0, at);
      bytes.writeUInt32LE(node.ext.length / 3, at + 1);
      at += 5;
      for (const value of node.ext) at = bytes.writeDoubleLE(value, at);
    } else {
      bytes.writeUInt8(1, at);
      bytes.writeUInt32LE(node.keys.length, at + 1);
      at += 5;
      for (const key of node.keys) at = bytes.writeDoubleLE(key, at);
      for (const child of node.children) at = bytes.writeUInt32LE(index.get(child)!, at);
    }
  }
  return { bytes, roots };
}

/** The inverse of encodeMaps. Throws on malformed input. */
export function decodeMaps(bytes: Buffer, roots: readonly number[]): BlockMap[] {
  const nodes: MapNode[] = [];
  let at = 0;
  while (at < bytes.length) {
    const kind = bytes.readUInt8(at);
    const count = bytes.readUInt32LE(at + 1);
    at += 5;
    if (count === 0 || count > CAPACITY) throw new Error(`bad map node size ${count}`);
    if (kind === 0) {
      const ext = newArray(count * 3);
      for (let i = 0; i < ext.length; i++, at += 8) ext[i] = bytes.readDoubleLE(at);
      nodes.push(makeLeaf(ext));
    } else if (kind === 1) {
      at += count * 8;
      const children: MapNode[] = [];
      for (let i = 0; i < count; i++, at += 4) {
        const child = nodes[bytes.readUInt32LE(at)];
        if (child === undefined) throw new Error('map node refers forward');
        children.push(child);
      }
      nodes.push(makeInner(children));
    } else {
      throw new Error(`bad map node kind ${kind}`);
    }
  }
  return roots.map((root) => {
    if (root === -1) return BlockMap.EMPTY;
    const node = nodes[root];
    if (node === undefined) throw new Error(`bad map root ${root}`);
    return new BlockMap(node);
  });
}
