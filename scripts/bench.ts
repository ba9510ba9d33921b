/**
 * `npm run bench`: clonebd beside nbdkit and qemu-nbd on this machine, in one run, driven by fio's
 * nbd engine, on plain volumes and copy-on-write layouts; and, on request, clone creation time and
 * memory at scale. See USAGE in bench-options.ts for the flags.
 *
 * Fairness, in order of how much it matters here:
 *   - every server serves an export of the same size and layout on the same filesystem; reads run
 *     over data written first (through the base for the copy-on-write layouts), so they never hit
 *     holes; every job runs on an export no earlier job wrote (bench-layouts.ts);
 *   - before every run the page cache is put in a known state (bench-cache.ts) for every layer of
 *     every chain, cold and warm reported apart;
 *   - servers are interleaved, forward then reversed, for several rounds; medians are reported
 *     with min and max;
 *   - one server runs twice (nbdkit-2) as a control whose ratio to itself must read 1.0 ± 0.1.
 *
 * Servers live for the whole run (those that serve one image restart when their export is
 * rebuilt); every one is stopped at the end, on failure, and on Ctrl-C.
 */
import { mkdir, mkdtemp, readFile, rm, statfs, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { setCacheState, dropMethod, type CacheState } from './bench-cache.js';
import { runTool, stopAllChildren } from './bench-child.js';
import { runCloneTiming } from './bench-clone.js';
import { parseFioReport, rowJobArgs, ROWS, type Row } from './bench-fio.js';
import { CHAIN_DEPTH, dirtiedBy, diskEstimate, LAYOUT_LABELS, LEVEL_WRITE_DIVISOR, type Layout } from './bench-layouts.js';
import { runCloneMemory, runMapMemory } from './bench-memory.js';
import { interleave, parseBenchOptions, USAGE, type BenchOptions } from './bench-options.js';
import { holdPageReporting } from './bench-page-reporting.js';
import { clockTicksPerSecond, machineInfo, readCpuTicks, readPeakRssBytes, resetPeakRss, type MachineInfo } from './bench-procfs.js';
import {
  controlEntries,
  controlSummary,
  formatBandwidth,
  formatIops,
  LAYOUT_COMPARISONS,
  layoutRatioEntries,
  markdownReport,
  ratioEntries,
  rowGroups,
  summariseSamples,
  svgChart,
  type ControlEntry,
  type LayoutRatioEntry,
  type RatioEntry,
  type Sample,
} from './bench-report.js';
import { cloneTimingMarkdown, memoryMarkdown, type CloneMemoryResult, type CloneTimingResult, type MapMemoryResult } from './bench-scale-report.js';
import { sharedFiles, SUBJECT, TARGETS, type RunningExport, type Target } from './bench-targets.js';

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

function firstLine(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).split('\n')[0]!;
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

async function checkSpace(dir: string, needed: number, what: string): Promise<void> {
  const stats = await statfs(dir);
  const free = stats.bavail * stats.bsize;
  if (free < needed) {
    throw new Error(
      `${dir} has ${(free / 2 ** 30).toFixed(1)} GiB free; ${what} need about ${(needed / 2 ** 30).toFixed(1)} GiB ` +
        '(use --work DIR, --servers, --layouts or --size-gib)',
    );
  }
}

interface Started {
  target: Target;
  running: RunningExport;
}

function plannedExports(targets: readonly Target[], layouts: readonly Layout[]): { target: Target; layout: Layout }[] {
  return targets.flatMap((target) => layouts.filter((layout) => target.layouts[layout] !== undefined).map((layout) => ({ target, layout })));
}

async function startExports(
  planned: readonly { target: Target; layout: Layout }[],
  work: string,
  exportSize: number,
  warnings: string[],
): Promise<Started[]> {
  const sharedDir = join(work, 'shared');
  await mkdir(sharedDir, { recursive: true });
  const shared = sharedFiles(sharedDir, exportSize, log);
  const started: Started[] = [];
  for (const { target, layout } of planned) {
    checkInterrupted();
    const dir = join(work, target.name, layout);
    await mkdir(dir, { recursive: true });
    const where = `${target.name} (${layout})`;
    log(`${where}: starting (${target.description}; ${target.layouts[layout]})`);
    try {
      const running = await target.setup({ dir, exportSize, host: HOST, log: (message) => log(`${where}: ${message}`), shared }, layout);
      log(`${where}: ready, pid ${running.server.pid}, ${running.uri}`);
      for (const note of running.notes) warnings.push(`${running.name} (${layout}): ${note}`);
      started.push({ target, running });
    } catch (error) {
      checkInterrupted();
      warnings.push(`${where} did not start and is left out: ${firstLine(error)}`);
      log(`${where}: FAILED TO START, left out\n${error instanceof Error ? error.message : String(error)}`);
    }
  }
  return started;
}

async function allBackingFiles(started: readonly Started[]): Promise<string[]> {
  const lists = await Promise.all(started.map(({ running }) => running.backingFiles()));
  return [...new Set(lists.flat())];
}

async function measureOne(
  running: RunningExport,
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
  const output = join(fioDir, `${round}-${row.id}-${running.layout}-${cache}-${running.name}.json`);
  const cpuBefore = await readCpuTicks(pid);
  await runTool('fio', rowJobArgs(row, running.uri, options.durationSeconds, output), options.durationSeconds * 1000 + FIO_GRACE_MS);
  const cpuAfter = await readCpuTicks(pid);
  const peakRssBytes = await readPeakRssBytes(pid);
  const result = parseFioReport(await readFile(output, 'utf8'));
  const cpuSeconds = (cpuAfter - cpuBefore) / clockTicksPerSecond();
  return {
    round,
    row: row.id,
    layout: running.layout,
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
  const dead = new Set<RunningExport>();
  const groups = rowGroups(rows, options.layouts);
  const perRound = groups.reduce((sum, { layout }) => sum + started.filter(({ running }) => running.layout === layout).length, 0);
  const total = options.rounds * perRound * options.caches.length;
  let runs = 0;
  for (let round = 1; round <= options.rounds; round++) {
    let group = 0;
    for (const { row, layout } of groups) {
      const exports = started.filter(({ running }) => running.layout === layout).map(({ running }) => running);
      if (exports.length === 0) continue;
      for (const cache of options.caches) {
        for (const running of interleave(exports, round - 1, group)) {
          checkInterrupted();
          runs++;
          if (dead.has(running)) continue;
          const where = `[${runs}/${total}] round ${round} ${row.id} ${layout} ${cache} ${running.name}`;
          try {
            const sample = await measureOne(running, row, cache, round, options, started, fioDir);
            samples.push(sample);
            const figure = row.metric === 'iops' ? `${formatIops(sample.iops)} IOPS` : formatBandwidth(sample.bytesPerSecond);
            const cpu = sample.cpuMicrosPerIo === undefined ? '—' : `${sample.cpuMicrosPerIo.toFixed(1)} µs`;
            const rss = sample.peakRssBytes === undefined ? '—' : `${(sample.peakRssBytes / 2 ** 20).toFixed(0)} MiB`;
            log(`${where}: ${figure}, server CPU ${cpu}/IO, peak RSS ${rss}`);
          } catch (error) {
            checkInterrupted();
            if (running.server.exited) {
              dead.add(running);
              warnings.push(`${running.name} (${layout}) exited during ${row.id} (${cache}); its later runs are missing`);
              log(`${where}: SERVER EXITED\n${running.server.stderrTail()}`);
            } else {
              warnings.push(`${where} failed: ${firstLine(error)}`);
              log(`${where}: FAILED\n${error instanceof Error ? error.message : String(error)}`);
            }
          }
          if (dirtiedBy(layout, row) && !dead.has(running)) {
            try {
              await running.rebuild();
            } catch (error) {
              checkInterrupted();
              dead.add(running);
              warnings.push(`${running.name} (${layout}) could not be rebuilt after ${row.id}; its later runs are missing: ${firstLine(error)}`);
              log(`${where}: REBUILD FAILED\n${error instanceof Error ? error.message : String(error)}`);
            }
          }
        }
        group++;
      }
    }
  }
  return samples;
}

function pickSubject(names: readonly string[], started: readonly Started[]): string | undefined {
  const candidates = names.filter((name) => started.find(({ running }) => running.name === name)!.target.controlOf === undefined);
  return candidates.includes(SUBJECT) ? SUBJECT : candidates[0];
}

function machineLine(machine: MachineInfo, versions: Record<string, string>): string {
  const tools = Object.values(versions);
  return (
    `Machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}, ` +
    `${(machine.memoryBytes / 2 ** 30).toFixed(0)} GiB RAM; Node ${machine.node}${tools.length === 0 ? '' : `; ${tools.join(', ')}`}.`
  );
}

function methodLine(options: BenchOptions, memoryNote: string): string {
  const drop =
    dropMethod() === 'drop_caches'
      ? 'sync and drop the page cache'
      : "sync and evict every export's pages (fadvise, not root)";
  return (
    `Method: fio ioengine=nbd over TCP on ${HOST}, fio on the same cores as the servers; ` +
    `median of ${options.rounds} round${options.rounds === 1 ? '' : 's'} (min–max), ${options.durationSeconds} s per run, ` +
    `${options.exportSize / 2 ** 30} GiB exports, servers interleaved forward then reversed. ` +
    `Before every run: ${drop} (cold), then read every allocated byte of every file of the tested export's chain once, holes skipped (warm). ` +
    `Free memory: ${memoryNote}.`
  );
}

function layoutLines(layouts: readonly Layout[]): string[] {
  if (layouts.length === 1 && layouts[0] === 'plain') return ['Plain volumes written in full first.'];
  const meaning: Record<Layout, string> = {
    plain: 'written in full first; writes overwrite',
    fresh: 'an empty volume or sparse file; write rows only, every write a first write',
    clone: 'a clone of a volume written in full (qcow2: an overlay); reads go through it, writes are first writes',
    depth32:
      `${CHAIN_DEPTH} levels of clones over a volume written in full, each level written (1/${LEVEL_WRITE_DIVISOR} of the blocks, ` +
      'the same blocks for every server) before the next is cloned from it; the job runs on the top level',
  };
  return [
    'Layouts:',
    ...layouts.map((layout) => `- ${LAYOUT_LABELS[layout]}: ${meaning[layout]}.`),
    'Every job runs on an export no earlier job wrote: after a write job, what it dirtied is rebuilt (untimed).',
  ];
}

interface MatrixResults {
  samples: Sample[];
  markdown: string;
  chart: string;
  json: Record<string, unknown>;
}

async function runMatrix(
  options: BenchOptions,
  work: string,
  machine: MachineInfo,
  versions: Record<string, string>,
  stamp: string,
  warnings: string[],
): Promise<MatrixResults> {
  const rows = ROWS.filter((row) => options.rows.includes(row.id));
  const targets = options.servers.map((name) => TARGETS.find((target) => target.name === name)!);
  const planned = plannedExports(targets, options.layouts);
  await checkSpace(
    options.workParent,
    diskEstimate(
      planned.map(({ target, layout }) => ({ layout, ownBase: target.name === SUBJECT })),
      options.exportSize,
    ) + 2 ** 30,
    'the exports',
  );
  const fioDir = join(work, 'fio');
  await mkdir(fioDir);
  const reporting = await holdPageReporting(log);
  if (reporting.warning !== undefined) warnings.push(reporting.warning);
  let samples: Sample[];
  let started: Started[];
  try {
    started = await startExports(planned, join(work, 'exports'), options.exportSize, warnings);
    if (started.length === 0) throw new Error('no server started; nothing to measure');
    samples = await measure(started, rows, options, fioDir, warnings);
  } finally {
    await reporting.restore();
  }

  const names = [...new Set(started.map(({ running }) => running.name))];
  const targetOf = (name: string): Target => started.find(({ running }) => running.name === name)!.target;
  const subject = pickSubject(names, started);
  const references = names.filter((name) => name !== subject && targetOf(name).controlOf === undefined);
  if (subject !== undefined && subject !== SUBJECT) warnings.push(`${SUBJECT} was not measured; ratios are ${subject} ÷ each other server`);
  const cells = summariseSamples(samples);
  const ratios: RatioEntry[] =
    subject === undefined
      ? []
      : references.flatMap((reference) => ratioEntries(cells, rows, options.layouts, options.caches, subject, reference));
  const has = (name: string, layout: Layout): boolean => started.some(({ running }) => running.name === name && running.layout === layout);
  const layoutRatios: LayoutRatioEntry[] = [];
  for (const name of names) {
    if (targetOf(name).controlOf !== undefined) continue;
    for (const { layout, versus } of LAYOUT_COMPARISONS) {
      if (has(name, layout) && has(name, versus)) layoutRatios.push(...layoutRatioEntries(cells, rows, options.caches, name, layout, versus));
    }
  }
  const controls: ControlEntry[] = [];
  for (const name of names) {
    const original = targetOf(name).controlOf;
    if (original === undefined) continue;
    const originalName = names.find((candidate) => targetOf(candidate).name === original);
    if (originalName === undefined) continue;
    const both = options.layouts.filter((layout) => has(name, layout) && has(originalName, layout));
    controls.push(...controlEntries(cells, rows, both, options.caches, name, originalName));
  }
  if (controls.length === 0) warnings.push('no control ran (add nbdkit-2 with nbdkit): fairness was not checked in this run');
  for (const entry of controls) {
    if (!entry.withinTolerance) {
      warnings.push(
        `control ${entry.numerator} ÷ ${entry.denominator} on ${entry.row} (${entry.layout}, ${entry.cache}) reads ` +
          `${entry.ratio === undefined ? 'nothing' : entry.ratio.toFixed(2)}, outside 1.0 ± 0.1: figures of this row are not yet trustworthy`,
      );
    }
  }

  const date = stamp.slice(0, 10);
  const markdown = markdownReport({
    title: `${subject ?? 'servers'} vs ${references.join(', ')} (${date})`,
    preamble: [
      machineLine(machine, versions),
      '',
      methodLine(options, reporting.note),
      '',
      ...layoutLines(options.layouts),
      '',
      ...[...new Map(started.map(({ target, running }) => [running.name, target])).entries()].map(
        ([name, target]) =>
          `- \`${name}\`: ${target.description}; ` +
          options.layouts
            .filter((layout) => target.layouts[layout] !== undefined)
            .map((layout) => `${layout}: ${target.layouts[layout]}`)
            .join('; '),
      ),
    ],
    rows,
    layouts: options.layouts,
    caches: options.caches,
    targets: names,
    subject: subject ?? '',
    references,
    cells,
    ratios,
    layoutRatios,
    controls,
    warnings,
  });
  const chart = svgChart({
    title: `${subject ?? ''} throughput relative to each reference (median of ${options.rounds} round${options.rounds === 1 ? '' : 's'}; > 1.0× is faster)`,
    subtitle: `${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}; ${options.durationSeconds} s runs; ${stamp}`,
    groups: rowGroups(rows, options.layouts),
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
  for (const line of controlSummary(controls)) if (line !== '') log(line);
  return {
    samples,
    markdown,
    chart,
    json: {
      freeMemory: reporting.note,
      rows,
      layouts: options.layouts,
      targets: started.map(({ target, running }) => ({
        name: running.name,
        target: target.name,
        layout: running.layout,
        description: `${target.description}; ${target.layouts[running.layout]}`,
        command: running.command,
        notes: running.notes,
        ...(target.controlOf === undefined ? {} : { controlOf: target.controlOf }),
      })),
      subject,
      samples,
      cells,
      ratios,
      layoutRatios,
      controls,
    },
  };
}

async function run(options: BenchOptions): Promise<void> {
  const versions: Record<string, string> = {};
  if (options.parts.matrix) {
    versions.fio = `${await checkFio()} (nbd engine)`;
    if (options.servers.some((name) => name.startsWith('nbdkit'))) versions.nbdkit = await toolVersion('nbdkit', ['--version']);
  }
  if (options.parts.cloneTiming || (options.parts.matrix && options.servers.some((name) => name.startsWith('qemu-nbd')))) {
    versions['qemu-img'] = await toolVersion('qemu-img', ['--version']);
  }
  const machine = await machineInfo();
  const startedAt = new Date();
  const stamp = startedAt.toISOString().slice(0, 19).replace(/:/g, '-');
  const work = await mkdtemp(join(options.workParent, 'clonebd-bench-'));
  const warnings: string[] = [];
  const results: Record<string, unknown> = {
    startedAt: startedAt.toISOString(),
    machine,
    tools: versions,
    options: { ...options, cacheDrop: dropMethod() },
  };
  const sections: string[] = [];
  let chart: string | undefined;
  /** Warnings the matrix report already carries. */
  let shown = 0;
  try {
    if (options.parts.matrix) {
      const matrix = await runMatrix(options, work, machine, versions, stamp, warnings);
      Object.assign(results, matrix.json);
      sections.push(matrix.markdown);
      chart = matrix.chart;
      shown = warnings.length;
    }
    if (options.parts.cloneTiming) {
      checkInterrupted();
      await checkSpace(options.workParent, 2 ** 30, 'the clone-timing pools');
      const dir = join(work, 'clone-timing');
      await mkdir(dir);
      const timing: CloneTimingResult[] = await runCloneTiming({ dir, host: HOST, requests: options.cloneRequests, log });
      results.cloneTiming = timing;
      sections.push(
        [`### Clone creation (${startedAt.toISOString().slice(0, 10)})`, '', machineLine(machine, versions), '', ...cloneTimingMarkdown(timing, options.cloneRequests)].join(
          '\n',
        ),
      );
    }
    if (options.parts.memory) {
      checkInterrupted();
      await checkSpace(options.workParent, options.mapBlocks * 4096 + 2 * 2 ** 30, 'the memory pools');
      const dir = join(work, 'memory');
      await mkdir(dir);
      let clones: CloneMemoryResult | undefined;
      let map: MapMemoryResult | undefined;
      try {
        clones = await runCloneMemory({ dir, host: HOST, log, clones: options.clones });
      } catch (error) {
        checkInterrupted();
        warnings.push(`memory with ${options.clones} clones failed: ${firstLine(error)}`);
        log(`memory: clones FAILED\n${String(error)}`);
      }
      try {
        map = await runMapMemory({ dir, host: HOST, log, blocks: options.mapBlocks });
      } catch (error) {
        checkInterrupted();
        warnings.push(`map memory with ${options.mapBlocks} blocks failed: ${firstLine(error)}`);
        log(`memory: map FAILED\n${String(error)}`);
      }
      results.memory = { clones, map };
      sections.push(
        [`### clonebd memory at scale (${startedAt.toISOString().slice(0, 10)})`, '', machineLine(machine, versions), '', ...memoryMarkdown(clones, map)].join('\n'),
      );
    }
    results.finishedAt = new Date().toISOString();
    results.warnings = warnings;
    const outDir = resolve(options.out);
    await mkdir(outDir, { recursive: true });
    const base = join(outDir, `bench-${stamp}`);
    let markdown = sections.map((section) => section.trimEnd()).join('\n\n');
    const later = warnings.slice(shown);
    if (later.length > 0) markdown += `\n\n${later.map((warning) => `> **Warning:** ${warning}`).join('\n')}`;
    await writeFile(`${base}.json`, `${JSON.stringify(results, null, 2)}\n`);
    await writeFile(`${base}.md`, `${markdown}\n`);
    if (chart !== undefined) await writeFile(`${base}.svg`, chart);
    process.stdout.write(`\n${markdown}\n`);
    for (const warning of warnings) log(`WARNING: ${warning}`);
    log(`results: ${base}.json${chart === undefined ? '' : `, ${base}.svg`}, ${base}.md`);
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
