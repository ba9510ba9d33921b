import { describe, expect, it } from 'vitest';
import { parseCpuModel, parseOpenFilesLimit, parseStatCpuTicks, parseStatusKilobytes } from '../../scripts/bench-procfs.js';

/** A /proc/PID/stat line: fields after the command name, utime (14) and stime (15) set. */
function statLine(comm: string, utime: number, stime: number): string {
  const after = ['S', '1', '100', '100', '0', '-1', '4194560', '1000', '0', '0', '0', String(utime), String(stime), '0', '0', '20', '0', '5'];
  return `4242 (${comm}) ${after.join(' ')}\n`;
}

describe('parseStatCpuTicks', () => {
  it('adds utime and stime', () => {
    expect(parseStatCpuTicks(statLine('nbdkit', 120, 45))).toBe(165);
  });

  it('counts fields from the last parenthesis, whatever the command name holds', () => {
    expect(parseStatCpuTicks(statLine('a) b (c', 7, 3))).toBe(10);
  });

  it('refuses a line it cannot read', () => {
    expect(() => parseStatCpuTicks('garbage')).toThrow(/no command name/);
    expect(() => parseStatCpuTicks('1 (x) S 1')).toThrow(/not integers/);
  });
});

describe('parseStatusKilobytes', () => {
  const status = 'Name:\tnode\nVmPeak:\t 1200 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40000 kB\n';

  it('reads a kB line as bytes', () => {
    expect(parseStatusKilobytes(status, 'VmHWM')).toBe(51200 * 1024);
    expect(parseStatusKilobytes(status, 'VmRSS')).toBe(40000 * 1024);
  });

  it('has no value for a missing line', () => {
    expect(parseStatusKilobytes(status, 'VmSwap')).toBeUndefined();
  });
});

describe('parseCpuModel', () => {
  it('takes the first model name', () => {
    const cpuinfo = 'processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n\nprocessor\t: 1\nmodel name\t: other\n';
    expect(parseCpuModel(cpuinfo)).toBe('AMD EPYC 7B13 64-Core Processor');
  });

  it('has no value where the kernel prints none (some ARM machines)', () => {
    expect(parseCpuModel('processor\t: 0\nBogoMIPS\t: 50.00\n')).toBeUndefined();
  });
});

describe('parseOpenFilesLimit', () => {
  const limits = [
    'Limit                     Soft Limit           Hard Limit           Units     ',
    'Max processes             95000                95000                processes ',
    'Max open files            1024                 524288               files     ',
    'Max locked memory         8388608              8388608              bytes     ',
    '',
  ].join('\n');

  it('reads the soft limit, the one that makes open() fail', () => {
    expect(parseOpenFilesLimit(limits)).toBe(1024);
  });

  it('has no value when the line is missing or unlimited', () => {
    expect(parseOpenFilesLimit('Limit Soft Hard Units\n')).toBeUndefined();
    expect(parseOpenFilesLimit('Max open files            unlimited            unlimited            files\n')).toBeUndefined();
  });
});
