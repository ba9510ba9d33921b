/**
 * Real external tools for integration tests: finding them, running them with a deadline, and the
 * temp directories they work in.
 *
 * A missing tool skips the test with a printed reason on a developer's machine and fails it under
 * `CI=true`, where every tool is installed and a silent skip would hide a broken setup.
 */
import { spawn, type SpawnOptions } from 'node:child_process';
import { accessSync, constants as fsConstants } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import type { TestContext } from 'vitest';

// nbd-client lives in sbin, which a non-root PATH often lacks.
const EXTRA_DIRS = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

/** The absolute path of an executable named `name` on PATH (or in sbin), if there is one. */
export function findTool(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter).filter((dir) => dir !== ''), ...EXTRA_DIRS];
  for (const dir of dirs) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, fsConstants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

export function isCi(): boolean {
  return process.env.CI === 'true';
}

/**
 * Returns the path of each named tool, in order. When one is missing: under CI the test fails;
 * elsewhere the reason is printed and the test is skipped (`ctx.skip` throws, so nothing after the
 * call runs).
 */
export function requireTools<const Names extends readonly string[]>(
  ctx: TestContext,
  ...names: Names
): { [K in keyof Names]: string } {
  const missing = names.filter((name) => findTool(name) === undefined);
  if (missing.length > 0) {
    const reason = `missing tool${missing.length > 1 ? 's' : ''} on PATH: ${missing.join(', ')}`;
    if (isCi()) throw new Error(`${reason} (CI=true: CI must install every tool the tests use)`);
    console.warn(`skipping "${ctx.task.name}": ${reason}`);
    ctx.skip(reason);
  }
  return names.map((name) => findTool(name)!) as { [K in keyof Names]: string };
}

/** `requireTools` for one tool. */
export function requireTool(ctx: TestContext, name: string): string {
  return requireTools(ctx, name)[0]!;
}

export interface RunResult {
  command: string;
  /** Exit code, or null when a signal ended the process. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface RunOptions {
  /** Killed with SIGKILL after this long; the result then says `timedOut`. */
  timeoutMs?: number;
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
}

const DEFAULT_TIMEOUT_MS = 30_000;

function describeCommand(file: string, args: readonly string[]): string {
  return [file, ...args].map((word) => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word}'`)).join(' ');
}

/** Runs `file args`, capturing stdout and stderr as UTF-8; never rejects because of the exit code. */
export function run(file: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const command = describeCommand(file, args);
  const spawnOptions: SpawnOptions = { stdio: ['pipe', 'pipe', 'pipe'], cwd: options.cwd, env: options.env ?? process.env };
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, spawnOptions);
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    child.stdout!.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk));
    // A child that exits without reading its input makes the pipe fail; the exit code tells the story.
    child.stdin!.on('error', () => undefined);
    child.stdin!.end(options.input);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${command}: ${error.message}`, { cause: error }));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        command,
        code,
        signal,
        stdout: Buffer.concat(stdout).toString('utf8'),
        stderr: Buffer.concat(stderr).toString('utf8'),
        timedOut,
      });
    });
  });
}

/** A multi-line account of a finished command, for assertion messages. */
export function describeResult(result: RunResult): string {
  const status = result.timedOut
    ? 'timed out'
    : result.code === null
      ? `killed by ${result.signal}`
      : `exit ${result.code}`;
  return `$ ${result.command}\n(${status})\n--- stdout\n${result.stdout}--- stderr\n${result.stderr}`;
}

/** `run`, then throws with the command's output unless it exited 0. */
export async function runOk(file: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const result = await run(file, args, options);
  if (result.code !== 0) throw new Error(`command failed\n${describeResult(result)}`);
  return result;
}

const tempDirs = new Set<string>();

/** A fresh directory under the OS temp dir; `removeTempDirs` deletes it. */
export async function makeTempDir(prefix = 'clonebd-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

/** Deletes every directory `makeTempDir` made in this test file. */
export async function removeTempDirs(): Promise<void> {
  const dirs = [...tempDirs];
  tempDirs.clear();
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
}
