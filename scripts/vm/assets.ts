/**
 * What the kernel attach VM boots, fetched once into a cache directory and reused between runs:
 * Debian's own kernel (the versioned package that linux-image-amd64 depends on, which ships
 * nbd.ko) and the guest's userland packages, downloaded with `apt-get download` and unpacked with
 * `dpkg -x`.
 *
 *   CACHE/debs/NAME_VERSION_ARCH.deb   as apt-get download names it; a new version is a new file
 *   CACHE/unpacked/NAME_VERSION_ARCH/  dpkg -x of it, renamed into place once complete
 *
 * From the unpacked kernel come the modules the guest loads, in dependency order. The package
 * carries no modules.dep (depmod makes it on install) and depmod may be absent, so dependencies
 * are read from each module's own `.modinfo` ELF section. Soft dependencies name aliases
 * (ext4's "crypto-crc32c"), which would need every module's aliases to resolve; the caller lists
 * such providers itself (crc32c_generic) before the modules that want them.
 *
 * Guest binaries are the unpacked ones; their shared libraries are the host's, as `ldd` resolves
 * them (the host runs the same Debian release as the packages apt-get fetches).
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';

export const KERNEL_META_PACKAGE = 'linux-image-amd64';

export interface CommandResult {
  stdout: string;
  stderr: string;
  code: number | null;
}

/** Runs a command to completion, capturing its output; rejects only when it cannot start. */
export function runCommand(file: string, args: readonly string[], options: { cwd?: string } = {}): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
    child.on('error', (error) => reject(new Error(`cannot run ${file}: ${error.message}`, { cause: error })));
    child.on('close', (code) =>
      resolve({ stdout: Buffer.concat(stdout).toString('utf8'), stderr: Buffer.concat(stderr).toString('utf8'), code }),
    );
  });
}

async function runChecked(file: string, args: readonly string[], options: { cwd?: string } = {}): Promise<string> {
  const result = await runCommand(file, args, options);
  if (result.code !== 0) {
    throw new Error(`${file} ${args.join(' ')} failed (exit ${result.code}):\n${result.stderr.trim()}`);
  }
  return result.stdout;
}

// ---- packages -----------------------------------------------------------------------------------

/** The versioned kernel package the meta package currently depends on. */
export async function resolveKernelPackage(): Promise<string> {
  const text = await runChecked('apt-cache', ['depends', KERNEL_META_PACKAGE]);
  const match = /Depends:\s*(linux-image-\S+)/.exec(text);
  if (match === null) {
    throw new Error(`apt-cache depends ${KERNEL_META_PACKAGE} names no linux-image package (run apt-get update?):\n${text}`);
  }
  return match[1]!;
}

/** Parses `apt-get download --print-uris`: one `'URI' FILE SIZE HASH` line per package. */
export function parsePrintUris(text: string): string[] {
  const files: string[] = [];
  for (const line of text.split('\n')) {
    const match = /^'[^']+'\s+(\S+\.deb)\s/.exec(line);
    if (match !== null) files.push(match[1]!);
  }
  return files;
}

/**
 * Makes sure the current version of each package is in CACHE/debs; returns the .deb paths in the
 * order of `packages`. Only the missing ones are downloaded.
 */
export async function fetchPackages(cacheDir: string, packages: readonly string[], log: (message: string) => void): Promise<string[]> {
  const debs = join(cacheDir, 'debs');
  await mkdir(debs, { recursive: true });
  // Run where the .debs are not: apt-get leaves out the files already in its working directory.
  // It lists them in its own order; a file is named NAME_VERSION_ARCH.deb.
  const listed = parsePrintUris(await runChecked('apt-get', ['download', '--print-uris', ...packages], { cwd: cacheDir }));
  const files = packages.map((pkg) => {
    const file = listed.find((candidate) => candidate.startsWith(`${pkg}_`));
    if (file === undefined) throw new Error(`apt-get download --print-uris lists no .deb for ${pkg}`);
    return file;
  });
  const missing = packages.filter((_, index) => !existsSync(join(debs, files[index]!)));
  if (missing.length > 0) {
    log(`downloading ${missing.join(' ')}`);
    await runChecked('apt-get', ['download', ...missing], { cwd: debs });
  }
  return files.map((file) => {
    const path = join(debs, file);
    if (!existsSync(path)) throw new Error(`apt-get download did not leave ${file} in ${debs}`);
    return path;
  });
}

/** `dpkg -x` of a .deb into CACHE/unpacked, once; returns the directory. */
export async function unpackPackage(cacheDir: string, deb: string): Promise<string> {
  const target = join(cacheDir, 'unpacked', basename(deb, '.deb'));
  if (existsSync(target)) return target;
  const partial = `${target}.partial-${process.pid}`;
  await rm(partial, { recursive: true, force: true });
  await mkdir(partial, { recursive: true });
  await runChecked('dpkg', ['-x', deb, partial]);
  try {
    await rename(partial, target);
  } catch (error) {
    // Another run unpacked the same package meanwhile.
    if (!existsSync(target)) throw error;
    await rm(partial, { recursive: true, force: true });
  }
  return target;
}

// ---- kernel modules -----------------------------------------------------------------------------

/** A module's name as the kernel knows it: file name without `.ko`, dashes as underscores. */
export function moduleName(fileOrName: string): string {
  return basename(fileOrName).replace(/\.ko(\.\w+)?$/, '').replace(/-/g, '_');
}

/** The strings of an ELF64 little-endian object's `.modinfo` section (`key=value`). */
export function readModinfo(elf: Buffer): string[] {
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1) {
    throw new Error('not a 64-bit little-endian ELF object');
  }
  const sectionTable = Number(elf.readBigUInt64LE(0x28));
  const entrySize = elf.readUInt16LE(0x3a);
  const count = elf.readUInt16LE(0x3c);
  const namesIndex = elf.readUInt16LE(0x3e);
  const section = (index: number): { name: number; offset: number; size: number } => {
    const at = sectionTable + index * entrySize;
    return {
      name: elf.readUInt32LE(at),
      offset: Number(elf.readBigUInt64LE(at + 0x18)),
      size: Number(elf.readBigUInt64LE(at + 0x20)),
    };
  };
  const names = section(namesIndex);
  for (let index = 0; index < count; index++) {
    const candidate = section(index);
    const nameStart = names.offset + candidate.name;
    const name = elf.toString('latin1', nameStart, elf.indexOf(0, nameStart));
    if (name !== '.modinfo') continue;
    return elf
      .toString('latin1', candidate.offset, candidate.offset + candidate.size)
      .split('\0')
      .filter((entry) => entry !== '');
  }
  return [];
}

/** Hard dependencies and soft "pre:" dependencies named in a module's modinfo. */
export function modinfoDependencies(modinfo: readonly string[]): { depends: string[]; softPre: string[] } {
  const depends: string[] = [];
  const softPre: string[] = [];
  for (const entry of modinfo) {
    if (entry.startsWith('depends=')) {
      depends.push(...entry.slice('depends='.length).split(',').filter((name) => name !== '').map(moduleName));
    } else if (entry.startsWith('softdep=')) {
      // "pre: a b post: c"
      let section = '';
      for (const word of entry.slice('softdep='.length).split(/\s+/)) {
        if (word.endsWith(':')) section = word;
        else if (word !== '' && section === 'pre:') softPre.push(moduleName(word));
      }
    }
  }
  return { depends, softPre };
}

export interface KernelModule {
  name: string;
  path: string;
}

async function indexModules(dir: string, index: Map<string, string>): Promise<void> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await indexModules(path, index);
    else if (/\.ko$/.test(entry.name)) index.set(moduleName(entry.name), path);
  }
}

/**
 * The modules to insmod, dependencies first, for `wanted` (module names) in a kernel tree whose
 * modules live in `modulesDir` (lib/modules/VERSION). Built-in modules are left out. Compressed
 * modules are refused: busybox insmod loads plain .ko files.
 */
export async function resolveModules(modulesDir: string, wanted: readonly string[]): Promise<KernelModule[]> {
  const builtin = new Set(
    (await readFile(join(modulesDir, 'modules.builtin'), 'utf8')).split('\n').filter((line) => line !== '').map(moduleName),
  );
  const index = new Map<string, string>();
  await indexModules(join(modulesDir, 'kernel'), index);
  const ordered: KernelModule[] = [];
  const done = new Set<string>();
  const visiting = new Set<string>();
  const visit = async (name: string, optional: boolean): Promise<void> => {
    if (done.has(name) || builtin.has(name)) return;
    const path = index.get(name);
    if (path === undefined) {
      if (optional) return;
      throw new Error(`kernel module ${name} is neither built in nor in ${modulesDir} (or is compressed)`);
    }
    if (visiting.has(name)) throw new Error(`kernel module dependency cycle through ${name}`);
    visiting.add(name);
    const { depends, softPre } = modinfoDependencies(readModinfo(await readFile(path)));
    for (const dependency of softPre) await visit(dependency, true);
    for (const dependency of depends) await visit(dependency, false);
    visiting.delete(name);
    done.add(name);
    ordered.push({ name, path });
  };
  for (const name of wanted) await visit(moduleName(name), false);
  return ordered;
}

// ---- shared libraries ---------------------------------------------------------------------------

/**
 * The shared objects `ldd` lists for a binary, the dynamic loader included, as absolute paths
 * (the guest gets each at the same path). A statically linked binary has none.
 */
export function parseLdd(text: string): { paths: string[]; missing: string[] } {
  const paths: string[] = [];
  const missing: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    let match: RegExpExecArray | null;
    if ((match = /^(\S+) => not found/.exec(line)) !== null) missing.push(match[1]!);
    else if ((match = /^\S+ => (\/\S+) \(0x[0-9a-f]+\)$/.exec(line)) !== null) paths.push(match[1]!);
    else if ((match = /^(\/\S+) \(0x[0-9a-f]+\)$/.exec(line)) !== null) paths.push(match[1]!);
  }
  return { paths, missing };
}

/** Every library the binaries need, deduplicated; throws naming the ones this machine lacks. */
export async function libraryClosure(binaries: readonly string[]): Promise<string[]> {
  const all = new Set<string>();
  for (const binary of binaries) {
    const result = await runCommand('ldd', [binary]);
    const text = result.stdout + result.stderr;
    if (/not a dynamic executable|statically linked/.test(text)) continue;
    if (result.code !== 0) throw new Error(`ldd ${binary} failed:\n${text}`);
    const { paths, missing } = parseLdd(text);
    if (missing.length > 0) {
      throw new Error(
        `${basename(binary)} needs ${missing.join(', ')}, which this machine lacks: install the ${basename(binary)} package (apt-get install) so its libraries are here`,
      );
    }
    for (const path of paths) all.add(path);
  }
  return [...all].sort();
}
