/**
 * What the harness learns about servers and the machine from /proc: CPU time (all threads of a
 * process, user plus system), peak RSS, and the CPU model and kernel for the report.
 */
import { execFileSync } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';

/**
 * utime + stime, in clock ticks, from the text of /proc/PID/stat. The command name (field 2) may
 * hold spaces and parentheses, so fields are counted from the last ')'.
 */
export function parseStatCpuTicks(stat: string): number {
  const close = stat.lastIndexOf(')');
  if (close < 0) throw new Error('unreadable /proc/PID/stat: no command name');
  // After ") " come fields 3 (state), 4, ...; utime and stime are fields 14 and 15.
  const fields = stat.slice(close + 2).trim().split(/\s+/);
  const utime = Number(fields[11]);
  const stime = Number(fields[12]);
  if (!Number.isSafeInteger(utime) || !Number.isSafeInteger(stime)) {
    throw new Error('unreadable /proc/PID/stat: utime/stime are not integers');
  }
  return utime + stime;
}

/** A `Name:   N kB` line of /proc/PID/status, in bytes; undefined when absent. */
export function parseStatusKilobytes(status: string, name: string): number | undefined {
  for (const line of status.split('\n')) {
    if (!line.startsWith(`${name}:`)) continue;
    const match = /^\S+:\s*(\d+)\s*kB/.exec(line);
    return match === null ? undefined : Number(match[1]) * 1024;
  }
  return undefined;
}

export function parseCpuModel(cpuinfo: string): string | undefined {
  for (const line of cpuinfo.split('\n')) {
    const match = /^model name\s*:\s*(.+)$/.exec(line);
    if (match !== null) return match[1]!.trim();
  }
  return undefined;
}

export async function readCpuTicks(pid: number): Promise<number> {
  return parseStatCpuTicks(await readFile(`/proc/${pid}/stat`, 'utf8'));
}

export async function readPeakRssBytes(pid: number): Promise<number | undefined> {
  return parseStatusKilobytes(await readFile(`/proc/${pid}/status`, 'utf8'), 'VmHWM');
}

/**
 * Restarts VmHWM from the current RSS (clear_refs "5"), so the next reading is this run's peak.
 * Where the kernel refuses, VmHWM stays the peak since the server started: still an upper bound.
 */
export async function resetPeakRss(pid: number): Promise<void> {
  try {
    await writeFile(`/proc/${pid}/clear_refs`, '5');
  } catch {
    // an upper bound is all that is lost
  }
}

let ticksPerSecond: number | undefined;

/** USER_HZ, the unit of /proc/PID/stat times; Linux fixes it at 100 on every common architecture. */
export function clockTicksPerSecond(): number {
  if (ticksPerSecond !== undefined) return ticksPerSecond;
  try {
    const value = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
    ticksPerSecond = Number.isSafeInteger(value) && value > 0 ? value : 100;
  } catch {
    ticksPerSecond = 100;
  }
  return ticksPerSecond;
}

export interface MachineInfo {
  cpuModel: string;
  cores: number;
  kernel: string;
  memoryBytes: number;
  node: string;
}

export async function machineInfo(): Promise<MachineInfo> {
  let cpuModel: string | undefined;
  try {
    cpuModel = parseCpuModel(await readFile('/proc/cpuinfo', 'utf8'));
  } catch {
    cpuModel = undefined;
  }
  return {
    cpuModel: cpuModel ?? os.cpus()[0]?.model ?? 'unknown CPU',
    cores: os.availableParallelism(),
    kernel: `${os.type()} ${os.release()}`,
    memoryBytes: os.totalmem(),
    node: process.version,
  };
}

/** The process's resident set now (VmRSS), in bytes. */
export async function readRssBytes(pid: number): Promise<number | undefined> {
  return parseStatusKilobytes(await readFile(`/proc/${pid}/status`, 'utf8'), 'VmRSS');
}

/** Open descriptors of a process now. */
export async function countOpenFiles(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length;
}

/** The soft "Max open files" of a /proc/PID/limits text; undefined when absent or unlimited. */
export function parseOpenFilesLimit(limits: string): number | undefined {
  const match = /^Max open files\s+(\d+)\s/m.exec(limits);
  return match === null ? undefined : Number(match[1]);
}

export async function openFilesLimit(pid: number): Promise<number | undefined> {
  return parseOpenFilesLimit(await readFile(`/proc/${pid}/limits`, 'utf8'));
}
