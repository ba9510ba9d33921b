import { describe, expect, it } from 'vitest';
import { BLOCK_SIZE, CopyInProgress, VolumeModel, blockContent, observe } from '../../scripts/crash-model.js';

const zeros = new Set([0]);
const isZero = (id: number): boolean => zeros.has(id);
const sawWrite = (id: number) => ({ kind: 'write', id }) as const;

describe('crash model', () => {
  it('names the write a block came from and spots torn or misplaced blocks', () => {
    expect(observe(blockContent(7, 3), 3)).toEqual({ kind: 'write', id: 7 });
    expect(observe(Buffer.alloc(BLOCK_SIZE), 3)).toEqual({ kind: 'zero' });
    expect(observe(blockContent(7, 3), 4)).toMatchObject({ kind: 'garbage' });
    const torn = Buffer.concat([blockContent(7, 3).subarray(0, 2048), blockContent(8, 3).subarray(2048)]);
    expect(observe(torn, 3)).toMatchObject({ kind: 'garbage' });
  });

  it('after a flush, an older write reappearing is a violation; the flushed one or a later one is not', () => {
    const make = (): VolumeModel => {
      const model = VolumeModel.empty('v', 1);
      model.issue(1, 0, 1);
      model.acknowledge(1, 0, 1, false);
      model.issue(2, 0, 1);
      model.acknowledge(2, 0, 1, false);
      model.flushSent()();
      model.issue(3, 0, 1);
      model.acknowledge(3, 0, 1, false);
      return model;
    };
    expect(make().settle(0, sawWrite(1), isZero)).toMatch(/write 1, but allowed only \{2, 3\}/);
    expect(make().settle(0, { kind: 'zero' }, isZero)).toMatch(/zeros/);
    expect(make().settle(0, sawWrite(2), isZero)).toBeUndefined();
    expect(make().settle(0, sawWrite(3), isZero)).toBeUndefined();
  });

  it('a flush covers only what was acknowledged when it was sent', () => {
    const model = VolumeModel.empty('v', 1);
    model.issue(1, 0, 1);
    const flushed = model.flushSent();
    model.acknowledge(1, 0, 1, false);
    flushed();
    expect(model.settle(0, { kind: 'zero' }, isZero)).toBeUndefined();
  });

  it('an acknowledged FUA write is durable; an unacknowledged one may be lost', () => {
    const model = VolumeModel.empty('v', 2);
    model.issue(1, 0, 1);
    model.acknowledge(1, 0, 1, true);
    model.issue(2, 1, 1);
    model.abandon(1, 1);
    expect(model.settle(0, { kind: 'zero' }, isZero)).toMatch(/zeros, but allowed only \{1\}/);
    expect(model.settle(1, { kind: 'zero' }, isZero)).toBeUndefined();
  });

  it('a copy may hold what its source held when asked for, or writes issued until it was made, nothing older', () => {
    const source = VolumeModel.empty('s', 1);
    source.issue(1, 0, 1);
    source.acknowledge(1, 0, 1, false);
    const copy = new CopyInProgress(source);
    source.issue(2, 0, 1);
    copy.noteWrite(2, 0, 1);
    const made = (): VolumeModel => copy.model('c', 'volume');
    expect(made().settle(0, sawWrite(1), isZero)).toBeUndefined();
    expect(made().settle(0, sawWrite(2), isZero)).toBeUndefined();
    expect(made().settle(0, { kind: 'zero' }, isZero)).toMatch(/zeros, but allowed only \{1, 2\}/);
  });
});
