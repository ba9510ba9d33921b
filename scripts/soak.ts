/**
 * Soak: mixed fio load (ioengine=nbd) on several volumes for a long time while clones and
 * snapshots come and go, sampling the server's resident memory, open file descriptors and journal
 * size every interval. After warm-up (the first third) each must stay flat: the last third's
 * median within a tolerance of the middle third's. Prints the samples and a summary table; exits 1
 * when something grew or fio failed.
 *
 *   node dist/scripts/soak.js [--minutes 30] [--volumes 4] [--interval 10] [--work DIR]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BUILT_CLI, startClonebd, type ClonebdProcess } from './clonebd-process.js';

const MiB = 2 ** 20;
const VOLUME_SIZE = 1024 * MiB;
/** How much the late median may exceed the middle one, per measure. */
const TOLERANCE = { rss: 0.15, fds: 0.1, journal: 0.5, layers: 0.1 } as const;
const JOURNAL_SLACK_BYTES = 4 * MiB;

export interface Sample {
  seconds: number;
  rssBytes: number;
  fds: number;
  journalBytes: number;
  volumes: number;
  /** Layers the pool keeps: copies deleted while their source kept writing can leave theirs. */
  layers: number;
}

export interface Trend {
  measure: 'rss' | 'fds' | 'journal' | 'layers';
  middle: number;
  late: number;
  flat: boolean;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Middle third against last third; the first third is warm-up. */
export function trends(samples: readonly Sample[]): Trend[] {
  const third = Math.floor(samples.length / 3);
  const middle = samples.slice(third, 2 * third);
  const late = samples.slice(2 * third);
  const measures = [
    ['rss', (sample: Sample) => sample.rssBytes, 0],
    ['fds', (sample: Sample) => sample.fds, 2],
    ['journal', (sample: Sample) => sample.journalBytes, JOURNAL_SLACK_BYTES],
    ['layers', (sample: Sample) => sample.layers, 2],
  ] as const;
  return measures.map(([measure, of, slack]) => {
    const before = median(middle.map(of));
    const after = median(late.map(of));
    return { measure, middle: before, late: after, flat: after <= before * (1 + TOLERANCE[measure]) + slack };
  });
}

async function sample(server: ClonebdProcess, pool: string, started: number): Promise<Sample> {
  const status = await readFile(`/proc/${server.pid}/status`, 'utf8');
  const rssKib = Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1] ?? NaN);
  const fds = (await readdir(`/proc/${server.pid}/fd`)).length;
  let journalBytes = 0;
  for (const entry of await readdir(pool)) {
    if (entry.startsWith('journal.')) journalBytes += (await stat(join(pool, entry))).size;
  }
  const volumes = (await server.admin.listVolumes()).length;
  const { layers } = await server.admin.poolStatus();
  return { seconds: (performance.now() - started) / 1000, rssBytes: rssKib * 1024, fds, journalBytes, volumes, layers };
}

/** fio processes running: an interrupted soak stops them, and then ends through its cleanup. */
const fioChildren = new Set<ChildProcess>();

function fio(uri: string, seconds: number, index: number): Promise<void> {
  const shapes = [
    ['--rw=randrw', '--bs=4k', '--iodepth=16'],
    ['--rw=randwrite', '--bs=64k', '--iodepth=4', '--fsync=32'],
    ['--rw=readwrite', '--bs=1m', '--iodepth=4'],
    ['--rw=randread', '--bs=4k', '--iodepth=32'],
  ];
  const args = [
    `--name=soak-${index}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    ...shapes[index % shapes.length]!,
    '--norandommap',
    '--time_based',
    `--runtime=${seconds}s`,
    '--output-format=terse',
  ];
  return new Promise((resolve, reject) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    fioChildren.add(child);
    child.once('exit', () => fioChildren.delete(child));
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-4096)));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`fio on ${uri} exited ${code}\n${stderr}`))));
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      minutes: { type: 'string', default: '30' },
      volumes: { type: 'string', default: '4' },
      interval: { type: 'string', default: '10' },
      work: { type: 'string', default: tmpdir() },
    },
  });
  const minutes = Number(values.minutes);
  const volumeCount = Number(values.volumes);
  const interval = Number(values.interval);
  if (!(minutes > 0) || !Number.isInteger(volumeCount) || volumeCount < 1 || !(interval > 0)) {
    throw new Error('--minutes and --interval want positive numbers, --volumes a positive integer');
  }
  const seconds = Math.round(minutes * 60);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      process.stderr.write(`soak: ${signal}: stopping fio, the server and the pool\n`);
      for (const child of fioChildren) child.kill('SIGTERM');
    });
  }
  const dir = await mkdtemp(join(values.work, 'clonebd-soak-'));
  const pool = join(dir, 'pool');
  const server = await startClonebd(BUILT_CLI, pool);
  const samples: Sample[] = [];
  let churned = 0;
  try {
    const names = Array.from({ length: volumeCount }, (_, i) => `soak${i}`);
    for (const name of names) await server.admin.createVolume(name, VOLUME_SIZE);
    const started = performance.now();
    const load = Promise.all(names.map((name, i) => fio(`nbd://127.0.0.1:${server.port}/${name}`, seconds, i)));
    let finished = false;
    const done = load.finally(() => (finished = true));

    // Churn: a clone or snapshot of a busy volume, and the oldest copies deleted, every two seconds.
    const churn = (async () => {
      const copies: string[] = [];
      while (!finished) {
        const source = names[churned % names.length]!;
        const name = `copy${churned}`;
        if (churned % 2 === 0) await server.admin.snapshot(source, name);
        else await server.admin.clone(source, name);
        copies.push(name);
        churned++;
        while (copies.length > 2 * volumeCount) await server.admin.delete(copies.shift()!);
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    })();
    const sampler = (async () => {
      while (!finished) {
        const now = await sample(server, pool, started);
        samples.push(now);
        process.stdout.write(
          `${now.seconds.toFixed(0).padStart(6)} s  rss ${(now.rssBytes / MiB).toFixed(1).padStart(7)} MiB  fds ${String(now.fds).padStart(4)}  journal ${(now.journalBytes / MiB).toFixed(2).padStart(7)} MiB  volumes ${now.volumes}  layers ${now.layers}\n`,
        );
        await new Promise((resolve) => setTimeout(resolve, interval * 1000));
      }
    })();
    await Promise.all([done, churn, sampler]).catch((error: unknown) => {
      const exit = server.child.exitCode ?? server.child.signalCode;
      throw new Error(`${error instanceof Error ? error.message : String(error)}${exit === null ? '' : `; the server exited (${exit})`}\n${server.stderrTail()}`);
    });
  } finally {
    await server.stop();
    await rm(dir, { recursive: true, force: true });
  }
  const results = trends(samples);
  process.stdout.write(`\nclones and snapshots made: ${churned}; samples: ${samples.length}\n`);
  process.stdout.write('measure   middle third   last third   flat\n');
  for (const trend of results) {
    const show = (value: number): string =>
      trend.measure === 'fds' || trend.measure === 'layers' ? value.toFixed(0) : `${(value / MiB).toFixed(1)} MiB`;
    process.stdout.write(`${trend.measure.padEnd(10)}${show(trend.middle).padStart(12)}${show(trend.late).padStart(13)}   ${trend.flat ? 'yes' : 'NO'}\n`);
  }
  if (results.some((trend) => !trend.flat)) process.exitCode = 1;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((error: unknown) => {
    process.stderr.write(`soak: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exit(2);
  });
}
