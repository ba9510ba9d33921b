/**
 * The real kernel client, in a VM: Debian's kernel booted in QEMU without KVM attaches a real
 * `clonebd serve` through nbd.ko and Debian's nbd-client (scripts/vm/). One boot runs four jobs
 * to keep the time down: a 5 GiB volume (mkfs.ext4, mount, write and fsync, e2fsck, detach and
 * reattach, fio), a clone whose first 8 MiB must be its source's at clone time although the
 * source was overwritten after the clone, and two restarts of the server (on the same TCP port and
 * Unix socket) with I/O started while it is down: under sid's nbd-client over netlink (-persist,
 * -dead-timeout) and under qemu-nbd -c (reconnect-delay), which must carry that I/O through.
 *
 * The judge of the guest's step reports and the readers of apt, ldd, modinfo and the archive's
 * index are checked on their own first, without a VM.
 */
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../native-free/index.js';
import { modinfoDependencies, parseLdd, parsePrintUris } from '../../scripts/vm/assets.js';
import {
  expectedSteps,
  jobArguments,
  judgeSteps,
  parseHostLine,
  parseStepLine,
  type GuestJob,
  type StepReport,
} from '../../scripts/vm/guest-plan.js';
import { newcHeader } from '../../scripts/vm/initramfs.js';
import { runKernelTest } from '../../scripts/vm/kernel-vm.js';
import { debFileName, dependencyClosure, indexPackages, parseStanzas, releaseChecksum } from '../../scripts/vm/suite-packages.js';
import { AdminClient } from '../../src/control/admin-client.js';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import { makeTempDir, removeTempDirs, requireTools } from '../helpers/tools.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

describe('the guest step judge', () => {
  const jobs: GuestJob[] = [{ kind: 'fs', name: 'a', exportName: 'a', target: { host: '127.0.0.1', port: 1 } }];
  const all = (): StepReport[] => expectedSteps(jobs).map((name) => ({ name, ok: true, detail: '' }));

  it('passes every expected step reported ok, in order', () => {
    expect(judgeSteps(expectedSteps(jobs), all())).toEqual({ ok: true });
  });

  it('fails on the first failed step, a missing step, a step out of order, or one after the end', () => {
    const expected = expectedSteps(jobs);
    const failed = all();
    failed[5] = { ...failed[5]!, ok: false, detail: 'mount: bad superblock' };
    expect(judgeSteps(expected, failed)).toEqual({ ok: false, reason: `step ${expected[5]} failed: mount: bad superblock` });
    expect(judgeSteps(expected, all().slice(0, 7))).toEqual({ ok: false, reason: `step ${expected[7]} missing (last step: ${expected[6]})` });
    const swapped = all();
    [swapped[3], swapped[4]] = [swapped[4]!, swapped[3]!];
    expect(judgeSteps(expected, swapped)).toMatchObject({ ok: false, reason: `step ${expected[4]} came where ${expected[3]} was expected` });
    expect(judgeSteps(expected, [...all(), { name: 'extra', ok: true, detail: '' }])).toMatchObject({ ok: false });
  });

  it('hands a restart job its client and timeouts on the command line, and expects the held I/O steps', () => {
    const restart: GuestJob = {
      kind: 'restart',
      name: 'r',
      exportName: 'vol',
      target: { path: 'nbd.sock' },
      client: 'qemu-nbd',
      timeoutSeconds: 10,
      holdSeconds: 15,
    };
    expect(jobArguments([restart])).toEqual(['clonebd.job=r,restart,vol,qemu-nbd,10,15']);
    expect(() => jobArguments([{ ...restart, holdSeconds: 0 }])).toThrow(/holdSeconds/);
    const tcp = { host: '127.0.0.1', port: 1 };
    expect(jobArguments([{ ...restart, target: tcp }, { ...restart, name: 's' }])).toHaveLength(2);
    expect(() => jobArguments([restart, { kind: 'fs', name: 'f', exportName: 'vol', target: tcp }])).toThrow(/Unix socket/);
    const steps = expectedSteps([restart]);
    expect(steps.indexOf('r.io-held')).toBeGreaterThan(steps.indexOf('r.link-down'));
    expect(steps.indexOf('r.server-started')).toBeGreaterThan(steps.indexOf('r.io-held'));
    expect(steps.indexOf('r.held-io')).toBeGreaterThan(steps.indexOf('r.server-started'));
  });

  it('finds step and host lines in the console, also behind kernel messages', () => {
    expect(parseStepLine('Probing EDD (edd=off to disable)... oSTEP boot ok 6.1.0-56-amd64')).toEqual({
      name: 'boot',
      ok: true,
      detail: '6.1.0-56-amd64',
    });
    expect(parseStepLine('STEP a.mkfs fail')).toEqual({ name: 'a.mkfs', ok: false, detail: '' });
    expect(parseStepLine('output: STEPS a ok')).toBeUndefined();
    expect(parseHostLine('HOST stop-server a')).toEqual({ request: 'stop-server', job: 'a' });
    expect(parseHostLine('HOST reboot a')).toBeUndefined();
  });

  it('writes newc headers the kernel unpacks: 110 bytes of magic and hex fields, the name, padding to 4', () => {
    const header = newcHeader({ ino: 1, mode: 0o100755, nlink: 1, fileSize: 10, name: 'init' });
    const text = header.toString('latin1');
    expect(text.slice(0, 6)).toBe('070701');
    expect(text.slice(6, 14)).toBe('00000001');
    expect(text.slice(14, 22)).toBe((0o100755).toString(16).padStart(8, '0'));
    expect(text.slice(54, 62)).toBe('0000000a');
    expect(text.slice(94, 102)).toBe('00000005');
    expect(text.slice(110, 115)).toBe('init\0');
    expect(header.length % 4).toBe(0);
    expect(header.length).toBe(116);
  });
});

describe('reading apt, ldd and modinfo', () => {
  it('takes file names from apt-get download --print-uris', () => {
    const text =
      "'http://deb.debian.org/debian/pool/main/n/nbd/nbd-client_3.24-1.1_amd64.deb' nbd-client_1%3a3.24-1.1_amd64.deb 44952 SHA256:84\n" +
      "'http://deb.debian.org/debian/pool/main/s/socat/socat_1.7.4.4-2_amd64.deb' socat_1.7.4.4-2_amd64.deb 375000 SHA256:aa\n";
    expect(parsePrintUris(text)).toEqual(['nbd-client_1%3a3.24-1.1_amd64.deb', 'socat_1.7.4.4-2_amd64.deb']);
  });

  it('lists the libraries and the loader ldd resolved, and those it could not', () => {
    const text = [
      '\tlinux-vdso.so.1 (0x00007ffd4b3f2000)',
      '\tlibnl-3.so.200 => /lib/x86_64-linux-gnu/libnl-3.so.200 (0x00007f1f2b0e2000)',
      '\tlibceph-common.so.2 => /usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2 (0x00007f5474c00000)',
      '\tlibgone.so.1 => not found',
      '\t/lib64/ld-linux-x86-64.so.2 (0x00007f1f2b131000)',
    ].join('\n');
    expect(parseLdd(text)).toEqual({
      paths: [
        '/lib/x86_64-linux-gnu/libnl-3.so.200',
        '/usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2',
        '/lib64/ld-linux-x86-64.so.2',
      ],
      missing: ['libgone.so.1'],
    });
  });

  it('reads hard and "pre:" soft dependencies from modinfo, with dashes as underscores', () => {
    expect(
      modinfoDependencies(['license=GPL', 'softdep=pre: crypto-crc32c post: foo', 'depends=jbd2,mbcache,crc16', 'name=ext4']),
    ).toEqual({ depends: ['jbd2', 'mbcache', 'crc16'], softPre: ['crypto_crc32c'] });
    expect(modinfoDependencies(['depends=', 'name=nbd'])).toEqual({ depends: [], softPre: [] });
  });
});

describe("reading a suite's index from the Debian archive", () => {
  const index = indexPackages(
    [
      'Package: tool',
      'Version: 1:2.0-1',
      'Depends: libc6 (>= 2.38), libnl-3-200 (= 3.12.0-2), debconf (>= 0.5) | debconf-2.0',
      'Filename: pool/main/t/tool/tool_2.0-1_amd64.deb',
      'Size: 100',
      `SHA256: ${'a'.repeat(64)}`,
      'Description: a tool',
      ' that does things',
      '',
      'Package: libc6',
      'Version: 2.43-7',
      'Pre-Depends: libgcc-s1',
      'Filename: pool/main/g/glibc/libc6_2.43-7_amd64.deb',
      'Size: 200',
      `SHA256: ${'b'.repeat(64)}`,
      '',
      'Package: libgcc-s1',
      'Version: 16.2.0-4',
      'Depends: libc6 (>= 2.35)',
      'Filename: pool/main/g/gcc-16/libgcc-s1_16.2.0-4_amd64.deb',
      'Size: 300',
      `SHA256: ${'c'.repeat(64)}`,
      '',
      'Package: libnl-3-200',
      'Version: 3.12.0-2',
      'Depends: libc6:any | libc6-udeb',
      'Filename: pool/main/libn/libnl3/libnl-3-200_3.12.0-2_amd64.deb',
      'Size: 400',
      `SHA256: ${'d'.repeat(64)}`,
      '',
      'Package: debconf',
      'Version: 1.5.91',
      'Depends: perl-base',
      'Filename: pool/main/d/debconf/debconf_1.5.91_all.deb',
      'Size: 500',
      `SHA256: ${'e'.repeat(64)}`,
      '',
    ].join('\n'),
  );

  it('follows Pre-Depends and Depends once each, first alternative the index has, skipping what it is told to', () => {
    const closure = dependencyClosure(index, ['tool'], ['debconf']);
    expect(closure.map((pkg) => pkg.name)).toEqual(['tool', 'libc6', 'libnl-3-200', 'libgcc-s1']);
    expect(closure[0]).toEqual({
      name: 'tool',
      version: '1:2.0-1',
      filename: 'pool/main/t/tool/tool_2.0-1_amd64.deb',
      sha256: 'a'.repeat(64),
      size: 100,
    });
    expect(debFileName(closure[0]!)).toBe('tool_1%3a2.0-1_amd64.deb');
    // Without the skip, debconf's perl-base is a package this index lacks.
    expect(() => dependencyClosure(index, ['tool'])).toThrow(/perl-base/);
    expect(() => dependencyClosure(index, ['absent'])).toThrow(/no package absent/);
  });

  it('reads continuation lines, and the SHA256 list of a Release file', () => {
    const [tool] = parseStanzas(index.get('tool')!);
    expect(tool!.get('Description')).toBe('a tool\nthat does things');
    const [release] = parseStanzas(
      [
        'Origin: Debian',
        'SHA256:',
        ` ${'1'.repeat(64)} 64988655 main/binary-amd64/Packages`,
        ` ${'2'.repeat(64)} 15001303 main/binary-amd64/Packages.gz`,
      ].join('\n'),
    );
    expect(releaseChecksum(release!, 'main/binary-amd64/Packages.gz')).toEqual({ sha256: '2'.repeat(64), size: 15001303 });
    expect(() => releaseChecksum(release!, 'main/binary-arm64/Packages.gz')).toThrow(/no SHA256/);
  });
});

describe('Debian kernel, nbd.ko and nbd-client in a VM', () => {
  afterEach(async () => {
    await stopAllServerProcesses();
  });

  afterAll(async () => {
    await removeTempDirs();
  });

  async function writeExport(port: number, exportName: string, data: Buffer): Promise<void> {
    const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName });
    try {
      await client.write(0, data, { fua: true });
      await client.flush();
    } finally {
      await client.disconnect();
    }
  }

  it('attaches a volume and a clone, formats, mounts, checks, reattaches, runs fio, and carries I/O across a server restart', { timeout: 10 * 60_000 }, async (ctx) => {
    requireTools(ctx, 'qemu-system-x86_64', 'apt-get', 'dpkg', 'ldd', 'gpgv', 'nbd-client', 'socat', 'mke2fs', 'e2fsck', 'fio', 'qemu-nbd');
    const pool = join(await makeTempDir('clonebd-kernel-vm-'), 'pool');
    // The VM's chardevs connect when QEMU starts and handshake only when the guest attaches.
    const serveArgs = ['--handshake-timeout', '0'];
    let server: ServerProcess = await startServerProcess({
      pool,
      args: serveArgs,
      prepare: async (store) => {
        await store.createVolume('plain', 5 * GiB);
        await store.createVolume('source', GiB);
        await store.createVolume('restart', GiB);
      },
    });
    const port = server.port;
    const atCloneTime = randomBytes(8 * MiB);
    await writeExport(port, 'source', atCloneTime);
    await new AdminClient(join(pool, 'admin.sock')).clone('source', 'clone');
    await writeExport(port, 'source', randomBytes(8 * MiB));

    const tcp = { host: '127.0.0.1', port };
    // The server comes back on the same TCP port and Unix socket; the restart jobs go through the
    // socket, since the second one's port sits idle through the first one's restart (see jobArguments).
    const restart = {
      kind: 'restart',
      exportName: 'restart',
      target: { path: join(pool, 'nbd.sock') },
      timeoutSeconds: 10,
      holdSeconds: 15,
    } as const;
    const jobs: GuestJob[] = [
      { kind: 'fs', name: 'plain', exportName: 'plain', target: tcp },
      {
        kind: 'clone',
        name: 'clone',
        exportName: 'clone',
        target: tcp,
        sha256: createHash('sha256').update(atCloneTime).digest('hex'),
        bytes: atCloneTime.length,
      },
      { ...restart, name: 'restart', client: 'nbd-client' },
      { ...restart, name: 'restart-qemu', client: 'qemu-nbd' },
    ];
    const requests: string[] = [];
    const result = await runKernelTest({
      jobs,
      timeoutMs: 8 * 60_000,
      onHostRequest: async (request, job) => {
        requests.push(`${request} ${job}`);
        if (request === 'stop-server') {
          const status = await server.stop();
          if (status.killed) throw new Error('the server did not stop on SIGTERM');
        } else {
          server = await startServerProcess({ pool, args: [...serveArgs, '--listen', `127.0.0.1:${port}`] });
        }
      },
    });

    expect(requests).toEqual(['stop-server restart', 'start-server restart', 'stop-server restart-qemu', 'start-server restart-qemu']);
    const detail = (name: string): string => result.steps.find((step) => step.name === name)?.detail ?? '';
    // The kernel's view: 512-byte logical blocks, a volatile cache to flush, FUA.
    for (const job of ['plain', 'clone', 'restart', 'restart-qemu']) {
      expect(detail(`${job}.attach`)).toMatch(/logical_block=512 .*write_cache=write_back fua=1/);
    }
    expect(detail('plain.attach')).toContain(`size=${5 * GiB}`);
    expect(detail('clone.source-data')).toBe(`first ${8 * MiB} bytes match`);
    // The read and the write issued while the server was down completed, on the same connection
    // as far as the kernel knows, and both read back (the guest compared the data).
    expect(detail('restart-qemu.held-io')).toMatch(/^resumed: /);
    expect(detail('restart-qemu.reattach')).toBe('still attached');
    expect(detail('restart-qemu.read')).toContain('the held write at 8 MiB read back');
    expect(server.port).toBe(port);
    console.info(
      `kernel VM: ${result.kernelPackage}, boot ${(result.bootMs / 1000).toFixed(1)} s, VM ${(result.vmMs / 1000).toFixed(1)} s; ` +
        `sid nbd-client ${result.sidClientVersion}: held I/O ${detail('restart.held-io')}, ${detail('restart.reattach')}; ` +
        `qemu-nbd: held I/O ${detail('restart-qemu.held-io')}`,
    );
  });
});
