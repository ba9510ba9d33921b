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
 * In-place edits: path copying allocates and copies a few hundred numbers per change, which a
 * volume's head pays on every first write though no one else can see its newest nodes. So a map
 * carries an edit token, and assignInPlace() changes nodes stamped with that token in place.
 * Nodes made since the map was last shared carry it; share() retires it before a second holder
 * keeps the map. An owned node's parent is owned by the same token (path copying stamps the
 * whole path), so shared nodes never reach an owned one.
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

/** Live while the map holding it is its only holder. */
interface EditToken {
  live: boolean;
}

interface Leaf {
  readonly leaf: true;
  /** [start, length, value] per extent. */
  readonly ext: number[];
  readonly owner: EditToken | null;
}

interface Inner {
  readonly leaf: false;
  readonly keys: number[];
  readonly children: MapNode[];
  readonly owner: EditToken | null;
}

export type MapNode = Leaf | Inner;

/** Called for consecutive runs; return true to stop early. */
export type RunVisitor = (start: number, end: number, value: number) => boolean | void;

function firstStart(node: MapNode): number {
  return node.leaf ? node.ext[0]! : node.keys[0]!;
}

function makeLeaf(ext: number[], owner: EditToken | null): Leaf {
  return { leaf: true, ext, owner };
}

function makeInner(children: MapNode[], owner: EditToken | null): Inner {
  const keys = newArray(children.length);
  for (let i = 0; i < children.length; i++) keys[i] = firstStart(children[i]!);
  return { leaf: false, keys, children, owner };
}

/** Leaves from a packed extent array, split in two when over capacity. */
function leavesOf(ext: number[], owner: EditToken | null): MapNode[] {
  const count = ext.length / 3;
  if (count === 0) return [];
  if (count <= CAPACITY) return [makeLeaf(ext, owner)];
  const half = count >> 1;
  return [makeLeaf(ext.slice(0, half * 3), owner), makeLeaf(ext.slice(half * 3), owner)];
}

function innersOf(children: MapNode[], owner: EditToken | null): MapNode[] {
  if (children.length === 0) return [];
  if (children.length <= CAPACITY) return [makeInner(children, owner)];
  const half = children.length >> 1;
  return [makeInner(children.slice(0, half), owner), makeInner(children.slice(half), owner)];
}

/** An owned node changed in place, as the list of nodes that replace it (split when over capacity). */
function refitLeaf(node: Leaf): MapNode[] {
  const count = node.ext.length / 3;
  if (count === 0) return [];
  if (count <= CAPACITY) return [node];
  const half = count >> 1;
  const tail = node.ext.slice(half * 3);
  node.ext.length = half * 3;
  return [node, makeLeaf(tail, node.owner)];
}

function refitInner(node: Inner): MapNode[] {
  const count = node.children.length;
  if (count === 0) return [];
  if (count <= CAPACITY) return [node];
  const half = count >> 1;
  const tail = node.children.slice(half);
  node.children.length = half;
  node.keys.length = half;
  return [node, makeInner(tail, node.owner)];
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

/**
 * Removes [lo, hi) from every extent; returns the replacement nodes, or null if nothing changed.
 * Nodes owned by `owner` change in place; new nodes are stamped with it.
 */
function clear(node: MapNode, lo: number, hi: number, owner: EditToken | null): MapNode[] | null {
  if (node.leaf) {
    const ext = node.ext;
    const count = ext.length / 3;
    const first = firstEndingAfter(ext, lo);
    let last = first;
    while (last < count && ext[last * 3]! < hi) last++;
    if (first === last) return null;
    const leftCut = ext[first * 3]! < lo;
    const lastEnd = ext[(last - 1) * 3]! + ext[(last - 1) * 3 + 1]!;
    const rightCut = lastEnd > hi;
    const kept = (leftCut ? 1 : 0) + (rightCut ? 1 : 0);
    const leftStart = ext[first * 3]!;
    const leftValue = ext[first * 3 + 2]!;
    const rightValue = ext[(last - 1) * 3 + 2]!;
    const inPlace = owner !== null && node.owner === owner;
    const out = inPlace ? ext : newArray((first + kept + count - last) * 3);
    if (inPlace) {
      // Leaves `kept` slots where the cleared extents were: one extent cut on both sides makes two.
      if (last - first >= kept) ext.splice(first * 3, (last - first - kept) * 3);
      else ext.splice(first * 3, 0, 0, 0, 0);
    } else {
      copy(ext, 0, first * 3, out, 0);
      copy(ext, last * 3, ext.length, out, (first + kept) * 3);
    }
    let at = first * 3;
    if (leftCut) {
      out[at] = leftStart;
      out[at + 1] = lo - leftStart;
      out[at + 2] = leftValue;
      at += 3;
    }
    if (rightCut) {
      out[at] = hi;
      out[at + 1] = lastEnd - hi;
      out[at + 2] = rightValue;
    }
    return inPlace ? refitLeaf(node) : leavesOf(out, owner);
  }
  const { keys, children } = node;
  const from = childFor(keys, lo);
  let to = from;
  // Built only once a child changes: most clears (a first write) change nothing.
  let replaced: MapNode[] | undefined;
  for (; to < children.length && keys[to]! < hi; to++) {
    const child = children[to]!;
    const nextKey = to + 1 < children.length ? keys[to + 1]! : Infinity;
    const result = keys[to]! >= lo && nextKey <= hi ? [] : clear(child, lo, hi, owner);
    if (result === null) {
      replaced?.push(child);
      continue;
    }
    replaced ??= children.slice(from, to);
    for (const piece of result) replaced.push(piece);
  }
  if (replaced === undefined) return null;
  if (owner !== null && node.owner === owner) {
    replaceChildren(node, from, to, replaced);
    return refitInner(node);
  }
  const rebuilt = children.slice(0, from);
  for (const piece of replaced) rebuilt.push(piece);
  for (let i = to; i < children.length; i++) rebuilt.push(children[i]!);
  return innersOf(rebuilt, owner);
}

/** Puts `replaced` where children [from, to) of an owned node were, keys included. */
function replaceChildren(node: Inner, from: number, to: number, replaced: MapNode[]): void {
  if (replaced.length === to - from) {
    for (let i = 0; i < replaced.length; i++) {
      node.children[from + i] = replaced[i]!;
      node.keys[from + i] = firstStart(replaced[i]!);
    }
    return;
  }
  node.children.splice(from, to - from, ...replaced);
  node.keys.splice(from, to - from, ...replaced.map(firstStart));
}

/** Inserts an extent into a range that holds none; returns the replacement nodes. Owned nodes change in place. */
function insert(node: MapNode, start: number, length: number, value: number, owner: EditToken | null): MapNode[] {
  const inPlace = owner !== null && node.owner === owner;
  if (node.leaf) {
    if (inPlace) {
      node.ext.splice(firstEndingAfter(node.ext, start) * 3, 0, start, length, value);
      return refitLeaf(node);
    }
    const out = node.ext.slice();
    out.splice(firstEndingAfter(out, start) * 3, 0, start, length, value);
    return leavesOf(out, owner);
  }
  const index = childFor(node.keys, start);
  const replacement = insert(node.children[index]!, start, length, value, owner);
  if (inPlace) {
    replaceChildren(node, index, index + 1, replacement);
    return refitInner(node);
  }
  if (replacement.length === 1) {
    // No split below: one child and its key change, the rest is copied as it is.
    const children = node.children.slice();
    children[index] = replacement[0]!;
    const keys = node.keys.slice();
    keys[index] = firstStart(replacement[0]!);
    return [{ leaf: false, keys, children, owner }];
  }
  const children = node.children.slice(0, index);
  for (const child of replacement) children.push(child);
  for (let i = index + 1; i < node.children.length; i++) children.push(node.children[i]!);
  return innersOf(children, owner);
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
      result = makeLeaf(out, null);
    }
  } else {
    let changed = false;
    const children = node.children.map((child) => {
      const replaced = replaceIn(child, from, to, memo);
      if (replaced !== child) changed = true;
      return replaced;
    });
    if (changed) result = makeInner(children, null);
  }
  memo.set(node, result);
  return result;
}

/**
 * Blocks under each node that name a layer. A shared node never changes again, so its count
 * holds for good, and a map that shares all but a changed path with one counted before is counted in
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
  // A node its map may still change in place is counted afresh each time.
  if (node.owner === null || !node.owner.live) layerBlocksUnder.set(node, total);
  return total;
}

function rootOf(nodes: MapNode[], owner: EditToken | null): MapNode | null {
  if (nodes.length === 0) return null;
  let root: MapNode = nodes.length === 1 ? nodes[0]! : makeInner(nodes, owner);
  while (!root.leaf && root.children.length === 1) root = root.children[0]!;
  return root;
}

export class BlockMap {
  static readonly EMPTY = new BlockMap(null);

  readonly root: MapNode | null;
  /** Stamps the nodes assignInPlace may change; retired by share(). */
  readonly #token: EditToken | null;

  constructor(root: MapNode | null, token: EditToken | null = null) {
    this.root = root;
    this.#token = token;
  }

  /**
   * Ends in-place changes to every node this map holds now, from this map or any it came from.
   * Call it before a second holder keeps the map.
   */
  share(): this {
    if (this.#token !== null) this.#token.live = false;
    return this;
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
    if (hi - lo === 1) return value !== UNALLOCATED && this.get(lo) === value ? 1 : 0;
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
    this.share();
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

  /** A map where [lo, hi) holds `value`; untouched nodes are shared with this one, which stays as it is. */
  assign(lo: number, hi: number, value: number): BlockMap {
    return assignWith(this.share(), lo, hi, value, null);
  }

  /**
   * assign() for the map's only holder, who keeps the result and drops this map: nodes made
   * since the map was last shared change in place rather than being copied.
   */
  assignInPlace(lo: number, hi: number, value: number): BlockMap {
    const token = this.#token !== null && this.#token.live ? this.#token : { live: true };
    if (value !== UNALLOCATED && lo < hi && this.root !== null && assignedInLeafInPlace(this.root, lo, hi, value, token)) {
      return new BlockMap(this.root, token);
    }
    return assignWith(this, lo, hi, value, token);
  }
}

/**
 * The common first writes in one descent, where one owned leaf alone changes, in place: [lo, hi)
 * fills a gap between two of its extents (a new volume), or lies inside one of its extents (a
 * clone writing over what it shares). False (nothing changed) where the general path is needed:
 * a neighbour that may sit in another leaf, a range over several extents, a full leaf.
 */
function assignedInLeafInPlace(root: MapNode, lo: number, hi: number, value: number, owner: EditToken): boolean {
  let node = root;
  while (!node.leaf) node = node.children[childFor(node.keys, lo)]!;
  if (node.owner !== owner) return false;
  const ext = node.ext;
  const count = ext.length / 3;
  const i = firstEndingAfter(ext, lo);
  if (i === 0 && ext[0]! >= lo) return false;
  if (i === count) return false;
  if (ext[i * 3]! >= hi) return filledGap(ext, i, lo, hi, value);
  if (ext[i * 3]! <= lo && ext[i * 3]! + ext[i * 3 + 1]! >= hi) return splitExtent(ext, i, lo, hi, value);
  return false;
}

/** [lo, hi) becomes `value` in the gap before extent `i` (> 0) of a leaf's extents. */
function filledGap(ext: number[], i: number, lo: number, hi: number, value: number): boolean {
  const nextStart = ext[i * 3]!;
  const joinsPrevious = ext[(i - 1) * 3]! + ext[(i - 1) * 3 + 1]! === lo && ext[(i - 1) * 3 + 2] === value;
  const joinsNext = nextStart === hi && ext[i * 3 + 2] === value;
  if (joinsPrevious && joinsNext) {
    ext[(i - 1) * 3 + 1]! += hi - lo + ext[i * 3 + 1]!;
    ext.splice(i * 3, 3);
  } else if (joinsPrevious) {
    ext[(i - 1) * 3 + 1]! += hi - lo;
  } else if (joinsNext) {
    ext[i * 3] = lo;
    ext[i * 3 + 1]! += hi - lo;
  } else {
    if (ext.length / 3 === CAPACITY) return false;
    ext.splice(i * 3, 0, lo, hi - lo, value);
  }
  return true;
}

/**
 * [lo, hi) becomes `value` inside extent `i` of a leaf's extents. An end of the range that meets
 * an end of the extent may join the neighbour there, which must then be in this leaf.
 */
function splitExtent(ext: number[], i: number, lo: number, hi: number, value: number): boolean {
  const count = ext.length / 3;
  const start = ext[i * 3]!;
  const end = start + ext[i * 3 + 1]!;
  const held = ext[i * 3 + 2]!;
  if (held === value) return true;
  if ((lo === start && i === 0) || (hi === end && i === count - 1)) return false;
  const joinsPrevious = lo === start && ext[(i - 1) * 3]! + ext[(i - 1) * 3 + 1]! === lo && ext[(i - 1) * 3 + 2] === value;
  const joinsNext = hi === end && ext[(i + 1) * 3] === hi && ext[(i + 1) * 3 + 2] === value;
  if (lo === start && hi === end) {
    if (joinsPrevious || joinsNext) return false;
    ext[i * 3 + 2] = value;
  } else if (lo === start) {
    if (joinsPrevious) {
      ext[(i - 1) * 3 + 1]! += hi - lo;
      ext[i * 3] = hi;
      ext[i * 3 + 1] = end - hi;
    } else {
      if (count === CAPACITY) return false;
      ext.splice(i * 3, 2, lo, hi - lo, value, hi, end - hi);
    }
  } else if (hi === end) {
    if (joinsNext) {
      ext[(i + 1) * 3] = lo;
      ext[(i + 1) * 3 + 1]! += hi - lo;
    } else {
      if (count === CAPACITY) return false;
      ext.splice((i + 1) * 3, 0, lo, hi - lo, value);
    }
    ext[i * 3 + 1] = lo - start;
  } else {
    if (count + 2 > CAPACITY) return false;
    ext.splice((i + 1) * 3, 0, lo, hi - lo, value, hi, end - hi, held);
    ext[i * 3 + 1] = lo - start;
  }
  return true;
}

/** assign() and assignInPlace(): new nodes are stamped with `owner`, nodes it owns change in place. */
function assignWith(map: BlockMap, lo: number, hi: number, value: number, owner: EditToken | null): BlockMap {
  if (lo >= hi) return map;
  if (value !== UNALLOCATED) {
    const left = map.extentAt(lo - 1);
    if (left !== undefined && left[2] === value) {
      lo = left[0];
      hi = Math.max(hi, left[1]);
    }
    const right = map.extentAt(hi);
    if (right !== undefined && right[2] === value) hi = right[1];
  }
  const cleared = map.root === null ? null : clear(map.root, lo, hi, owner);
  if (cleared === null && value === UNALLOCATED) return map;
  let root = cleared === null ? map.root : rootOf(cleared, owner);
  if (value !== UNALLOCATED) {
    root = root === null ? makeLeaf([lo, hi - lo, value], owner) : rootOf(insert(root, lo, hi - lo, value, owner), owner);
  }
  return new BlockMap(root, owner);
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
      nodes.push(makeLeaf(ext, null));
    } else if (kind === 1) {
      at += count * 8;
      const children: MapNode[] = [];
      for (let i = 0; i < count; i++, at += 4) {
        const child = nodes[bytes.readUInt32LE(at)];
        if (child === undefined) throw new Error('map node refers forward');
        children.push(child);
      }
      nodes.push(makeInner(children, null));
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
