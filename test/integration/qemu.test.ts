/**
 * QEMU's NBD client against a real `clonebd serve`: qemu-img convert/compare and qemu-io commands
 * (write, write -z, discard, flush, pattern-checked reads).
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { describeResult, makeTempDir, removeTempDirs, requireTool, run, runOk, type RunResult } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CONVERT_SIZE = 4 * MiB;

let server: ServerProcess;
let work: string;

beforeAll(async () => {
  work = await makeTempDir('clonebd-qemu-');
  server = await startServerProcess({
    prepare: async (pool) => {
      await pool.createVolume('convert', CONVERT_SIZE);
      await pool.createVolume('io', MiB);
      await pool.createVolume('overwrite', MiB);
    },
  });
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

/** Runs qemu-io with one `-c` per command and checks each command reported success. */
async function qemuIo(qemuIoPath: string, uri: string, commands: string[]): Promise<RunResult> {
  const result = await run(qemuIoPath, ['-f', 'raw', uri, ...commands.flatMap((command) => ['-c', command])]);
  const report = describeResult(result);
  expect(result.stdout + result.stderr, report).not.toMatch(/failed|error/i);
  expect(result.code, report).toBe(0);
  for (const command of commands) {
    const [offset, length] = positionalArguments(command).map(parseQemuSize);
    const verb = command.split(' ')[0];
    const expected: Record<string, string> = {
      write: `wrote ${length}/${length} bytes at offset ${offset}`,
      read: `read ${length}/${length} bytes at offset ${offset}`,
      discard: `discard ${length}/${length} bytes at offset ${offset}`,
    };
    if (verb !== undefined && verb in expected) expect(result.stdout, report).toContain(expected[verb]);
  }
  return result;
}

/** `write -P 0xab 0 64k` → `['0', '64k']`: the words left after the verb, flags and -P's pattern. */
function positionalArguments(command: string): string[] {
  const words = command.split(' ').slice(1);
  const positional: string[] = [];
  for (let i = 0; i < words.length; i++) {
    if (words[i] === '-P') i++;
    else if (!words[i]!.startsWith('-')) positional.push(words[i]!);
  }
  return positional;
}

function parseQemuSize(text: string): number {
  const match = /^(\d+)([kKmM]?)$/.exec(text);
  if (match === null) throw new Error(`test bug: cannot parse qemu-io size "${text}"`);
  const unit = { '': 1, k: KiB, m: MiB }[match[2]!.toLowerCase()]!;
  return Number(match[1]) * unit;
}

describe('qemu', () => {
  it('qemu-img convert writes a raw image into a volume and qemu-img compare finds them identical', async (ctx) => {
    const qemuImg = requireTool(ctx, 'qemu-img');
    const source = join(work, 'source.raw');
    const content = randomBytes(CONVERT_SIZE);
    content.fill(0, MiB, 2 * MiB);
    await writeFile(source, content);

    await runOk(qemuImg, ['convert', '-n', '-f', 'raw', '-O', 'raw', source, server.uri('convert')]);
    const same = await runOk(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', source, server.uri('convert')]);
    expect(same.stdout).toContain('Images are identical');

    // The comparison really reads the export: one changed byte is found.
    const changed = join(work, 'changed.raw');
    content[3 * MiB + 17] = content[3 * MiB + 17]! ^ 0xff; // inside the sector at 3 MiB
    await writeFile(changed, content);
    const different = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', changed, server.uri('convert')]);
    expect(different.code, describeResult(different)).toBe(1);
    // qemu-img names the start of the 512-byte sector that differs.
    const mismatch = /Content mismatch at offset (\d+)/.exec(different.stdout);
    expect(mismatch, describeResult(different)).not.toBeNull();
    expect(Number(mismatch![1])).toBe(3 * MiB);
  });

  it('qemu-io write, write -z, discard, flush and pattern-checked reads all succeed', async (ctx) => {
    const qemuIoPath = requireTool(ctx, 'qemu-io');
    await qemuIo(qemuIoPath, server.uri('io'), [
      'write -P 0xab 0 64k',
      'write -z 64k 64k',
      'discard 128k 64k',
      'flush',
      'read -P 0xab 0 64k',
      'read -P 0 64k 128k',
    ]);
  });

  it('qemu-io write -z and discard turn written data into zeros (clonebd trims to zero state)', async (ctx) => {
    const qemuIoPath = requireTool(ctx, 'qemu-io');
    const uri = server.uri('overwrite');
    await qemuIo(qemuIoPath, uri, ['write -P 0xcd 0 320k', 'flush', 'read -P 0xcd 0 320k']);
    await qemuIo(qemuIoPath, uri, [
      'write -z 64k 64k', // NO_HOLE: zeros, allocation kept
      'discard 128k 64k',
      'write -z -u 192k 64k', // may punch a hole
      'flush',
      'read -P 0xcd 0 64k',
      'read -P 0 64k 192k',
      'read -P 0xcd 256k 64k',
    ]);
  });

  it('qemu-io sees a pattern mismatch as a failure (the checks above can fail)', async (ctx) => {
    const qemuIoPath = requireTool(ctx, 'qemu-io');
    const result = await run(qemuIoPath, ['-f', 'raw', server.uri('io'), '-c', 'read -P 0x5a 0 4k']);
    expect(result.stdout, describeResult(result)).toContain('Pattern verification failed');
  });
});
