/**
 * `npm run bench`: clonebd beside nbdkit and qemu-nbd on this machine, in one run, driven by fio's
 * nbd engine. See USAGE in bench-options.ts for the flags.
 *
 * Fairness, in order of how much it matters here:
 *   - every target serves an export of the same size on the same filesystem, written in full
 *     first, so reads never hit holes;
 *   - before every run the page cache is put in a known state (bench-cache.ts), cold and warm
 *     reported apart;
 *   - targets are interleaved, forward then reversed, for several rounds; medians are reported
 *     with min and max;
 *   - one server runs twice (nbdkit-2) as a control whose ratio to itself must read 1.0 ± 0.1.
 *
 * Servers live for the whole run; every one is stopped at the end, on failure, and on Ctrl-C.
 */
import { mkdir, mkdtemp, readFile, rm, statfs, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { setCacheState, dropMethod, type CacheState } from './bench-cache.js';
import { runTool, stopAllChildren } from './bench-child.js';
import { parseFioReport, rowJobArgs, ROWS, type Row } from './bench-fio.js';
import { interleave, parseBenchOptions, USAGE, type BenchOptions } from './bench-options.js';
import { clockTicksPerSecond, machineInfo, readCpuTicks, readPeakRssBytes, resetPeakRss, type MachineInfo } from './bench-procfs.js';
import {
  controlEntries,
  controlSummary,
  formatBandwidth,
  formatIops,
  markdownReport,
  ratioEntries,
  summariseSamples,
  svgChart,
  type ControlEntry,
  type RatioEntry,
  type Sample,
} from './bench-report.js';
import { SUBJECT, TARGETS, type RunningTarget, type Target } from './bench-targets.js';

const HOST = '127.0.0.1';
const FIO_GRACE_MS = 120_000;

class Interrupted extends Error {}

let interrupted = false;

function checkInterrupted(): void {
  if (interrupted) throw new Interrupted('interrupted');
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

async function toolVersion(file: string, args: readonly string[]): Promise<string> {
  try {
    const { stdout } = await runTool(file, args, 10_000);
    return stdout.split('\n')[0]!.trim();
  } catch {
    return 'not found';
  }
}

async function checkFio(): Promise<string> {
  const version = await toolVersion('fio', ['--version']);
  if (version === 'not found') throw new Error('fio is not installed (Debian: apt-get install fio)');
  try {
    await runTool('fio', ['--enghelp=nbd'], 10_000);
  } catch (error) {
    throw new Error('this fio has no nbd engine (Debian builds it with libnbd)', { cause: error });
  }
  return version;
}

async function checkSpace(dir: string, needed: number): Promise<void> {
  const stats = await statfs(dir);
  const free = stats.bavail * stats.bsize;
  if (free < needed) {
    throw new Error(
      `${dir} has ${(free / 2 ** 30).toFixed(1)} GiB free; the exports need about ${(needed / 2 ** 30).toFixed(1)} GiB ` +
        '(use --work DIR, --servers or --size-gib)',
    );
  }
}

interface Started {
  target: Target;
  running: RunningTarget;
}

async function startTargets(targets: readonly Target[], work: string, exportSize: number, warnings: string[]): Promise<Started[]> {
  const started: Started[] = [];
  for (const target of targets) {
    checkInterrupted();
    const dir = join(work, target.name);
    await mkdir(dir);
    log(`${target.name}: starting (${target.description})`);
    try {
      const running = await target.setup({ dir, exportSize, host: HOST, log });
      log(`${running.name}: ready, pid ${running.server.pid}, ${running.uri}`);
      for (const note of running.notes) warnings.push(`${running.name}: ${note}`);
      started.push({ target, running });
    } catch (error) {
      checkInterrupted();
      const message = error instanceof Error ? error.message : String(error);
      warnings.push(`${target.name} did not start and is left out: ${message.split('\n')[0]}`);
      log(`${target.name}: FAILED TO START, left out\n${message}`);
    }
  }
  return started;
}

async function allBackingFiles(started: readonly Started[]): Promise<string[]> {
  const lists = await Promise.all(started.map(({ running }) => running.backingFiles()));
  return lists.flat();
}

async function measureOne(
  running: RunningTarget,
  row: Row,
  cache: CacheState,
  round: number,
  options: BenchOptions,
  started: readonly Started[],
  fioDir: string,
): Promise<Sample> {
  await setCacheState(cache, await running.backingFiles(), await allBackingFiles(started));
  checkInterrupted();
  const pid = running.server.pid;
  await resetPeakRss(pid);
  const output = join(fioDir, `${round}-${row.id}-${cache}-${running.name}.json`);
  const cpuBefore = await readCpuTicks(pid);
  await runTool('fio', rowJobArgs(row, running.uri, options.durationSeconds, output), options.durationSeconds * 1000 + FIO_GRACE_MS);
  const cpuAfter = await readCpuTicks(pid);
  const peakRssBytes = await readPeakRssBytes(pid);
  const result = parseFioReport(await readFile(output, 'utf8'));
  const cpuSeconds = (cpuAfter - cpuBefore) / clockTicksPerSecond();
  return {
    round,
    row: row.id,
    cache,
    target: running.name,
    iops: result.iops,
    bytesPerSecond: result.bytesPerSecond,
    ios: result.ios,
    runtimeMs: result.runtimeMs,
    cpuMicrosPerIo: result.ios > 0 ? (cpuSeconds * 1e6) / result.ios : undefined,
    peakRssBytes,
    fioCpuPercent: result.fioCpuPercent,
  };
}

async function measure(
  started: readonly Started[],
  rows: readonly Row[],
  options: BenchOptions,
  fioDir: string,
  warnings: string[],
): Promise<Sample[]> {
  const samples: Sample[] = [];
  const dead = new Set<string>();
  const total = options.rounds * rows.length * options.caches.length * started.length;
  let runs = 0;
  for (let round = 1; round <= options.rounds; round++) {
    let group = 0;
    for (const row of rows) {
      for (const cache of options.caches) {
        for (const { running } of interleave(started, round - 1, group)) {
          checkInterrupted();
          runs++;
          if (dead.has(running.name)) continue;
          const where = `[${runs}/${total}] round ${round} ${row.id} ${cache} ${running.name}`;
          try {
            const sample = await measureOne(running, row, cache, round, options, started, fioDir);
            samples.push(sample);
            const figure = row.metric === 'iops' ? `${formatIops(sample.iops)} IOPS` : formatBandwidth(sample.bytesPerSecond);
            const cpu = sample.cpuMicrosPerIo === undefined ? '—' : `${sample.cpuMicrosPerIo.toFixed(1)} µs`;
            const rss = sample.peakRssBytes === undefined ? '—' : `${(sample.peakRssBytes / 2 ** 20).toFixed(0)} MiB`;
            log(`${where}: ${figure}, server CPU ${cpu}/IO, peak RSS ${rss}`);
          } catch (error) {
            checkInterrupted();
            const message = error instanceof Error ? error.message : String(error);
            if (running.server.exited) {
              dead.add(running.name);
              warnings.push(`${running.name} exited during ${row.id} (${cache}); its later runs are missing`);
              log(`${where}: SERVER EXITED\n${running.server.stderrTail()}`);
            } else {
              warnings.push(`${where} failed: ${message.split('\n')[0]}`);
              log(`${where}: FAILED\n${message}`);
            }
          }
        }
        group++;
      }
    }
  }
  return samples;
}

function pickSubject(started: readonly Started[]): string | undefined {
  const candidates = started.filter(({ target }) => target.controlOf === undefined).map(({ running }) => running.name);
  return candidates.includes(SUBJECT) ? SUBJECT : candidates[0];
}

function machineLine(machine: MachineInfo, versions: Record<string, string>): string {
  const tools = Object.entries(versions)
    .map(([, version]) => version)
    .join(', ');
  return (
    `Machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}, ` +
    `${(machine.memoryBytes / 2 ** 30).toFixed(0)} GiB RAM; Node ${machine.node}; ${tools}.`
  );
}

function methodLine(options: BenchOptions): string {
  const drop =
    dropMethod() === 'drop_caches'
      ? 'sync and drop the page cache'
      : "sync and evict every export's pages (fadvise, not root)";
  return (
    `Method: fio ioengine=nbd over TCP on ${HOST}, fio on the same cores as the servers; ` +
    `median of ${options.rounds} round${options.rounds === 1 ? '' : 's'} (min–max), ${options.durationSeconds} s per run, ` +
    `${options.exportSize / 2 ** 30} GiB export per server written in full first, servers interleaved forward then reversed. ` +
    `Before every run: ${drop} (cold), then read the tested server's own files once (warm).`
  );
}

async function run(options: BenchOptions): Promise<void> {
  const rows = ROWS.filter((row) => options.rows.includes(row.id));
  const targets = options.servers.map((name) => TARGETS.find((target) => target.name === name)!);
  const fio = await checkFio();
  const versions: Record<string, string> = { fio: `${fio} (nbd engine)` };
  if (targets.some((target) => target.name.startsWith('nbdkit'))) versions.nbdkit = await toolVersion('nbdkit', ['--version']);
  if (targets.some((target) => target.name.startsWith('qemu-nbd'))) versions['qemu-nbd'] = await toolVersion('qemu-nbd', ['--version']);
  const machine = await machineInfo();
  await checkSpace(options.workParent, options.exportSize * targets.length * 1.05 + 2 ** 30);

  const startedAt = new Date();
  const work = await mkdtemp(join(options.workParent, 'clonebd-bench-'));
  const warnings: string[] = [];
  try {
    const fioDir = join(work, 'fio');
    await mkdir(fioDir);
    const started = await startTargets(targets, work, options.exportSize, warnings);
    if (started.length === 0) throw new Error('no server started; nothing to measure');
    const samples = await measure(started, rows, options, fioDir, warnings);

    const names = started.map(({ running }) => running.name);
    const subject = pickSubject(started);
    const references = names.filter(
      (name) => name !== subject && started.find(({ running }) => running.name === name)!.target.controlOf === undefined,
    );
    if (subject !== undefined && subject !== SUBJECT) {
      warnings.push(`${SUBJECT} was not measured; ratios are ${subject} ÷ each other server`);
    }
    const cells = summariseSamples(samples);
    const ratios: RatioEntry[] =
      subject === undefined
        ? []
        : references.flatMap((reference) => ratioEntries(cells, rows, options.caches, subject, reference));
    const controls: ControlEntry[] = [];
    for (const { target, running } of started) {
      if (target.controlOf === undefined) continue;
      const original = started.find((candidate) => candidate.target.name === target.controlOf);
      if (original === undefined) continue;
      controls.push(...controlEntries(cells, rows, options.caches, running.name, original.running.name));
    }
    if (controls.length === 0) {
      warnings.push('no control ran (add nbdkit-2 with nbdkit): fairness was not checked in this run');
    }
    for (const entry of controls) {
      if (!entry.withinTolerance) {
        warnings.push(
          `control ${entry.numerator} ÷ ${entry.denominator} on ${entry.row} (${entry.cache}) reads ` +
            `${entry.ratio === undefined ? 'nothing' : entry.ratio.toFixed(2)}, outside 1.0 ± 0.1: figures of this row are not yet trustworthy`,
        );
      }
    }

    const stamp = startedAt.toISOString().slice(0, 19).replace(/:/g, '-');
    const title = `${subject ?? 'servers'} vs ${references.join(', ')} (${startedAt.toISOString().slice(0, 10)})`;
    const preamble = [
      machineLine(machine, versions),
      '',
      methodLine(options),
      '',
      ...started.map(({ target, running }) => `- \`${running.name}\`: ${target.description}`),
    ];
    const markdown = markdownReport({
      title,
      preamble,
      rows,
      caches: options.caches,
      targets: names,
      subject: subject ?? '',
      references,
      cells,
      ratios,
      controls,
      warnings,
    });
    const chart = svgChart({
      title: `${subject ?? ''} throughput relative to each reference (median of ${options.rounds} round${options.rounds === 1 ? '' : 's'}; > 1.0× is faster)`,
      subtitle: `${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}; ${options.durationSeconds} s runs; ${stamp}`,
      rows,
      caches: options.caches,
      series: [
        ...references.map((reference) => ({
          label: `${subject} ÷ ${reference}`,
          control: false,
          entries: ratios.filter((entry) => entry.denominator === reference),
        })),
        ...[...new Set(controls.map((entry) => `${entry.numerator}\u0000${entry.denominator}`))].map((pair) => {
          const [control, original] = pair.split('\u0000') as [string, string];
          return {
            label: `${control} ÷ ${original}`,
            control: true,
            entries: controls.filter((entry) => entry.numerator === control && entry.denominator === original),
          };
        }),
      ],
    });

    const outDir = resolve(options.out);
    await mkdir(outDir, { recursive: true });
    const base = join(outDir, `bench-${stamp}`);
    const results = {
      startedAt: startedAt.toISOString(),
      finishedAt: new Date().toISOString(),
      machine,
      tools: versions,
      options: { ...options, cacheDrop: dropMethod() },
      rows,
      targets: started.map(({ target, running }) => ({
        name: running.name,
        target: target.name,
        description: target.description,
        command: running.command,
        notes: running.notes,
        ...(target.controlOf === undefined ? {} : { controlOf: target.controlOf }),
      })),
      subject,
      samples,
      cells,
      ratios,
      controls,
      warnings,
    };
    await writeFile(`${base}.json`, `${JSON.stringify(results, null, 2)}\n`);
    await writeFile(`${base}.svg`, chart);
    await writeFile(`${base}.md`, markdown);
    process.stdout.write(`\n${markdown}\n`);
    for (const line of controlSummary(controls)) if (line !== '') log(line);
    for (const warning of warnings) log(`WARNING: ${warning}`);
    log(`results: ${base}.json, ${base}.svg, ${base}.md`);
  } finally {
    await stopAllChildren();
    await rm(work, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  let options: BenchOptions;
  try {
    options = parseBenchOptions(
      process.argv.slice(2),
      { servers: TARGETS.map((target) => target.name), rows: ROWS.map((row) => row.id) },
      os.tmpdir(),
    );
  } catch (error) {
    log(`${error instanceof Error ? error.message : String(error)}\n${USAGE}`);
    process.exitCode = 2;
    return;
  }
  if (options.help) {
    process.stdout.write(USAGE);
    return;
  }
  const onSignal = (signal: NodeJS.Signals): void => {
    if (interrupted) return;
    interrupted = true;
    log(`\n${signal}: stopping every server`);
    void stopAllChildren();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await run(options);
  } catch (error) {
    if (error instanceof Interrupted || interrupted) {
      log('interrupted; every server stopped');
      process.exitCode = 130;
      return;
    }
    log(`bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    process.exitCode = 1;
  }
}

await main();
