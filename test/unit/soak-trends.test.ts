import { describe, expect, it } from 'vitest';
import { trends, type Sample } from '../../scripts/soak.js';

const MiB = 2 ** 20;

function samples(
  rss: (i: number) => number,
  fds: (i: number) => number,
  journal: (i: number) => number,
  layers: (i: number) => number = () => 8,
): Sample[] {
  return Array.from({ length: 12 }, (_, i) => ({
    seconds: i * 10,
    rssBytes: rss(i),
    fds: fds(i),
    journalBytes: journal(i),
    volumes: 4,
    layers: layers(i),
  }));
}

describe('soak trends', () => {
  it('calls a warm-up followed by a plateau flat', () => {
    const result = trends(samples((i) => (i < 4 ? i * 40 * MiB : 150 * MiB + (i % 2) * MiB), () => 30, (i) => (i % 4) * MiB));
    expect(result.map((trend) => [trend.measure, trend.flat])).toEqual([
      ['rss', true],
      ['fds', true],
      ['journal', true],
      ['layers', true],
    ]);
  });

  it('calls steady growth after warm-up growth, measure by measure', () => {
    const result = trends(samples((i) => 100 * MiB + i * 20 * MiB, (i) => 30 + i * 3, () => MiB, (i) => 20 + 2 * i));
    expect(result.map((trend) => [trend.measure, trend.flat])).toEqual([
      ['rss', false],
      ['fds', false],
      ['journal', true],
      ['layers', false],
    ]);
    expect(result[1]).toMatchObject({ middle: 46.5, late: 58.5 });
  });
});
