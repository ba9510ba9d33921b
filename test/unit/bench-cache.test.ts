import { describe, expect, it } from 'vitest';
import { parseFilefrag } from '../../scripts/bench-cache.js';

const TWO_EXTENTS = `Filesystem type is: ef53
File size of s.raw is 1073741824 (262144 blocks of 4096 bytes)
 ext:     logical_offset:        physical_offset: length:   expected: flags:
   0:      100..     102:   16844900..  16844902:      3:        100:
   1:   128000..  128511:   16847872..  16848383:    512:   16972800:
   2:   230400..  230401:   16843266..  16843267:      2:   16950272: last,unwritten
s.raw: 3 extents found
`;

describe('parseFilefrag', () => {
  it('gives the byte ranges of written extents and leaves out unwritten ones', () => {
    expect(parseFilefrag(TWO_EXTENTS)).toEqual([
      [100 * 4096, 3 * 4096],
      [128000 * 4096, 512 * 4096],
    ]);
  });

  it('reads a file with no extents as all hole', () => {
    const empty = 'Filesystem type is: ef53\nFile size of e.raw is 1048576 (256 blocks of 4096 bytes)\ne.raw: 0 extents found\n';
    expect(parseFilefrag(empty)).toEqual([]);
  });

  it('has no ranges for output it does not know, so the caller reads the whole file', () => {
    expect(parseFilefrag('t.bin: FIBMAP/FIEMAP unsupported\n')).toBeUndefined();
    expect(parseFilefrag('File size of t.bin is 100000 (25 blocks of 4096 bytes)\nsomething else\n')).toBeUndefined();
  });
});
