/**
 * Runs the node's system tools (mount, losetup, mkfs, ...) for the CSI node service.
 *
 * Every command is an argument vector handed to execve: nothing a CSI caller sends is ever
 * interpreted by a shell. Tools are looked up on PATH and in the sbin directories, which a
 * container's or a service's PATH may lack. A command that exits non-zero becomes an
 * OperationError (EIO) carrying the command line and its stderr, so the failure says what the
 * tool said.
 */
import { spawn } from 'node:child_process';
import { accessSync, constants as fsConstants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { OperationError } from '../util/errors.js';

const SBIN_DIRS = ['/usr/local/sbin', '/usr/sbin', '/sbin'];
const DEFAULT_TIMEOUT_MS = 120_000;
/** Output kept per stream: enough for any error message, bounded against a chatty tool. */
const OUTPUT_LIMIT = 1 << 20;

const located = new Map<string, string>();

/** The absolute path of tool `name`, or `name` itself (spawn then fails with ENOENT). */
export function toolPath(name: string): string {
  const cached = located.get(name);
  if (cached !== undefined) return cached;
  const dirs = [...(process.env.PATH ?? '').split(delimiter).filter((dir) => dir !== ''), ...SBIN_DIRS];
  for (const dir of dirs) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, fsConstants.X_OK);
      located.set(name, candidate);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return name;
}

export interface CommandResult {
  command: string;
  /** Exit code; null when a signal (or the timeout) ended the command. */
  code: number | null;
  stdout: string;
  stderr: string;
}

export interface CommandOptions {
  timeoutMs?: number;
}

function describe(name: string, args: readonly string[]): string {
  return [name, ...args].join(' ');
}

/** Runs `name args`; resolves with the outcome whatever the exit code. */
export function runCommand(name: string, args: readonly string[], options: CommandOptions = {}): Promise<CommandResult> {
  const command = describe(name, args);
  return new Promise((resolve, reject) => {
    const child = spawn(toolPath(name), args, { stdio: ['ignore', 'pipe', 'pipe'], shell: false });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    let stdoutBytes = 0;
    let stderrBytes = 0;
    child.stdout.on('data', (chunk: Buffer) => {
      if (stdoutBytes < OUTPUT_LIMIT) stdout.push(chunk);
      stdoutBytes += chunk.length;
    });
    child.stderr.on('data', (chunk: Buffer) => {
      if (stderrBytes < OUTPUT_LIMIT) stderr.push(chunk);
      stderrBytes += chunk.length;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new OperationError('EIO', `cannot run ${command}: ${error.message}`, { cause: error }));
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({
        command,
        code,
        stdout: Buffer.concat(stdout).toString('utf8'),
        stderr: Buffer.concat(stderr).toString('utf8'),
      });
    });
  });
}

/** One line for an error message: the command, how it ended, and what it printed on stderr. */
export function describeFailure(result: CommandResult): string {
  const ending = result.code === null ? 'was killed' : `exited ${result.code}`;
  const said = result.stderr.trim() || result.stdout.trim();
  return `${result.command} ${ending}${said === '' ? '' : `: ${said}`}`;
}

/** Runs `name args` and throws an OperationError (EIO) unless it exits 0. */
export async function runChecked(name: string, args: readonly string[], options: CommandOptions = {}): Promise<CommandResult> {
  const result = await runCommand(name, args, options);
  if (result.code !== 0) throw new OperationError('EIO', describeFailure(result));
  return result;
}
