/**
 * `clonebd serve` as a user runs it: the pool directory and demo volume it creates, TCP and Unix
 * listeners, argument errors, and graceful shutdown on a signal with clients attached.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { CLI_PATH, startServerProcess, stopAllServerProcesses } from '../helpers/server-process.js';
import { describeResult, makeTempDir, removeTempDirs, requireTool, requireTools, run, runOk } from '../helpers/tools.js';

const MiB = 1 << 20;
const GiB = 1 << 30;

const children = new Set<ChildProcess>();

afterEach(async () => {
  for (const child of children) child.kill('SIGKILL');
  children.clear();
  await stopAllServerProcesses();
  await removeTempDirs();
});

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/**
 * An interactive qemu-io session: one command at a time, each answered by the next "qemu-io> "
 * prompt. qemu-io takes only one line per read of its stdin, and its stdout must be unbuffered
 * (stdbuf -o0) for the prompt to arrive at all.
 */
class QemuIoSession {
  readonly #child: ChildProcess;
  #output = '';
  #prompts = 0;
  #waiter: (() => void) | undefined;
  readonly #exited: Promise<void>;

  constructor(stdbuf: string, qemuIo: string, uri: string) {
    this.#child = track(spawn(stdbuf, ['-o0', qemuIo, '-f', 'raw', uri], { stdio: ['pipe', 'pipe', 'pipe'] }));
    this.#child.stdin!.on('error', () => undefined);
    this.#child.stdout!.setEncoding('utf8');
    this.#child.stdout!.on('data', (chunk: string) => {
      this.#output += chunk;
      this.#prompts = this.#output.split('qemu-io> ').length - 1;
      this.#waiter?.();
    });
    this.#exited = new Promise((resolve) => this.#child.once('exit', () => resolve()));
  }

  /** Runs one command and returns the output it printed before the next prompt. */
  async command(line: string): Promise<string> {
    await this.#promptCount(this.#prompts === 0 ? 1 : this.#prompts);
    const before = this.#output.length;
    const target = this.#prompts + 1;
    this.#child.stdin!.write(`${line}\n`);
    await this.#promptCount(target);
    return this.#output.slice(before);
  }

  async quit(): Promise<void> {
    this.#child.stdin!.end('quit\n');
    await this.#exited;
  }

  #promptCount(count: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.#prompts >= count) {
          this.#waiter = undefined;
          resolve();
        }
      };
      this.#waiter = check;
      void this.#exited.then(() => {
        if (this.#waiter === check) reject(new Error(`qemu-io exited; output:\n${this.#output}`));
      });
      check();
    });
  }
}

/**
 * Feeds 1 MiB chunks of `byte` into `sink` until `limit` bytes are written or the sink fails.
 * `consumed(n)` resolves once the reader has taken at least n bytes out of the pipe.
 */
function pump(sink: Writable, byte: number, limit: number): { consumed(bytes: number): Promise<void> } {
  const chunk = Buffer.alloc(MiB, byte);
  let written = 0;
  const waiters: Array<{ bytes: number; resolve: () => void }> = [];
  const check = (): void => {
    const taken = written - sink.writableLength;
    for (const waiter of [...waiters]) {
      if (taken >= waiter.bytes) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve();
      }
    }
  };
  const more = (): void => {
    while (written < limit && !sink.destroyed) {
      written += chunk.length;
      const ok = sink.write(chunk, check);
      if (!ok) {
        sink.once('drain', more);
        return;
      }
    }
    if (written >= limit) sink.end();
  };
  sink.on('error', () => undefined);
  more();
  return {
    consumed: (bytes) =>
      new Promise<void>((resolve) => {
        waiters.push({ bytes, resolve });
        check();
      }),
  };
}

describe('clonebd serve', () => {
  it('creates an absent pool directory holding an empty 1 GiB volume named default', async (ctx) => {
    const nbdinfo = requireTool(ctx, 'nbdinfo');
    const pool = join(await makeTempDir('clonebd-cli-'), 'not', 'yet', 'pool');
    const server = await startServerProcess({ pool });
    expect(existsSync(pool)).toBe(true);

    const info = JSON.parse((await runOk(nbdinfo, ['--json', '--no-content', server.uri('default')])).stdout) as {
      exports: Array<Record<string, unknown>>;
    };
    expect(info.exports[0]).toMatchObject({ 'export-name': 'default', 'export-size': GiB, is_read_only: false });

    const list = JSON.parse((await runOk(nbdinfo, ['--list', '--json', '--no-content', `nbd://127.0.0.1:${server.port}`])).stdout) as {
      exports: Array<{ 'export-name': string }>;
    };
    expect(list.exports.map((entry) => entry['export-name'])).toEqual(['default']);

    const map = await runOk(nbdinfo, ['--map', server.uri('default')]);
    expect(map.stdout.trim().split(/\s+/).join(' ')).toBe(`0 ${GiB} 3 hole,zero`);
  });

  it('--socket serves the exports on a Unix socket too', async (ctx) => {
    const nbdinfo = requireTool(ctx, 'nbdinfo');
    const server = await startServerProcess({ socket: true });
    expect(server.socket).toBeDefined();
    expect(server.port).toBeGreaterThan(0);
    const info = JSON.parse((await runOk(nbdinfo, ['--json', '--no-content', server.unixUri('default')])).stdout) as {
      exports: Array<Record<string, unknown>>;
    };
    expect(info.exports[0]).toMatchObject({ 'export-name': 'default', 'export-size': GiB });
  });

  it('--listen nonsense exits non-zero with a message on stderr', async () => {
    const pool = join(await makeTempDir('clonebd-cli-'), 'pool');
    const result = await run(process.execPath, [CLI_PATH, 'serve', '--pool', pool, '--listen', 'nonsense'], { timeoutMs: 15_000 });
    expect(result.timedOut, describeResult(result)).toBe(false);
    expect(result.code, describeResult(result)).not.toBe(0);
    expect(result.stderr, describeResult(result)).toMatch(/nonsense/);
  });

  it('an unknown flag exits non-zero with a message on stderr', async () => {
    const pool = join(await makeTempDir('clonebd-cli-'), 'pool');
    const result = await run(process.execPath, [CLI_PATH, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--frobnicate'], {
      timeoutMs: 15_000,
    });
    expect(result.timedOut, describeResult(result)).toBe(false);
    expect(result.code, describeResult(result)).not.toBe(0);
    expect(result.stderr, describeResult(result)).toMatch(/frobnicate/);
  });

  it('SIGINT shuts down gracefully with exit code 0', async () => {
    const server = await startServerProcess();
    expect(await server.stop('SIGINT')).toEqual({ code: 0, signal: null, killed: false });
  });

  it('SIGTERM with clients attached and one mid-transfer exits 0; flushed data is there after a restart', async (ctx) => {
    const [qemuIo, nbdcopy, stdbuf] = requireTools(ctx, 'qemu-io', 'nbdcopy', 'stdbuf');
    const pool = join(await makeTempDir('clonebd-restart-'), 'pool');
    const first = await startServerProcess({
      pool,
      prepare: async (store) => {
        await store.createVolume('kept', 4 * MiB);
        await store.createVolume('stream', 64 * MiB);
      },
    });

    // A client that writes, flushes (answered before its next prompt), then stays connected and idle.
    const idle = new QemuIoSession(stdbuf, qemuIo, first.uri('kept'));
    expect(await idle.command('write -P 0x5a 0 1M')).toContain('wrote 1048576/1048576 bytes at offset 0');
    expect(await idle.command('flush')).not.toMatch(/fail|error/i);

    // A client mid-transfer: nbdcopy streams stdin to the volume in synchronous mode (it does so for
    // pipes), so what it has taken from the pipe, less one request, the server has acknowledged.
    const copier = track(spawn(nbdcopy, ['-', first.uri('stream')], { stdio: ['pipe', 'ignore', 'pipe'] }));
    const copierExit = new Promise<number | null>((resolve) => copier.once('exit', (code) => resolve(code)));
    const feed = pump(copier.stdin!, 0x77, 60 * MiB);
    await feed.consumed(16 * MiB);

    const status = await first.stop('SIGTERM');
    expect(status, first.stderr()).toEqual({ code: 0, signal: null, killed: false });
    await idle.quit();
    // The copy was cut short: the signal came mid-transfer.
    expect(await copierExit).not.toBe(0);

    const second = await startServerProcess({ pool });
    const kept = await runOk(qemuIo, ['-f', 'raw', second.uri('kept'), '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0 1M 3M']);
    expect(kept.stdout).not.toContain('Pattern verification failed');
    // Writes the server acknowledged before the signal were flushed by the graceful shutdown.
    const streamed = await runOk(qemuIo, ['-f', 'raw', second.uri('stream'), '-c', 'read -P 0x77 0 4M']);
    expect(streamed.stdout).not.toContain('Pattern verification failed');
  });
});
