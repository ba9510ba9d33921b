/**
 * Free memory in one state for every job. On a virtual machine with free page reporting
 * (virtio-balloon), the guest tells the host which free pages it may take back, and the host does;
 * the kernel handing such a page out again costs a fault on the host. Measured on the machine of
 * the README's figures: 2 GB of buffered writes into a new file run at 3.6 GB/s right after the
 * page cache was dropped and at 0.65 GB/s five seconds later, once the freed pages were reported
 * (reporting starts about 2 s after pages are freed and takes about 1.5 GiB per pass, one pass
 * every 2.5 s). A job's figures would then depend on how much the job before it freed, and when:
 * 1 MiB first writes into a clone read 0.36× of those into an empty volume in one run, 1.00× with
 * reporting paused.
 *
 * For the run, the bench raises the smallest block order the kernel reports past the largest order
 * its allocator has, so nothing more is reported and memory behaves as on a physical machine, the
 * same for every server; the old order is put back when the run ends. Without root, or on a kernel
 * without reporting, memory is left as it is and the report says so.
 */
import { readFile, writeFile } from 'node:fs/promises';

/** Where the kernel keeps the setting and the allocator's orders; tests point elsewhere. */
export interface ReportingFiles {
  order: string;
  buddyinfo: string;
}

const SYSTEM_FILES: ReportingFiles = {
  order: '/sys/module/page_reporting/parameters/page_reporting_order',
  buddyinfo: '/proc/buddyinfo',
};

export interface PageReporting {
  /** What the report's method line says about free memory. */
  readonly note: string;
  /** Set when figures may depend on what ran before: reporting is on and stays on. */
  readonly warning?: string;
  restore(): Promise<void>;
}

/** One past the largest block order, from /proc/buddyinfo (a count of free blocks per order). */
export function orderCount(buddyinfo: string): number | undefined {
  const counts = buddyinfo
    .split('\n')
    .map((line) => /zone\s+\S+\s+((?:\d+\s*)+)$/.exec(line.trim())?.[1]?.trim().split(/\s+/).length)
    .filter((count): count is number => count !== undefined);
  return counts.length === 0 ? undefined : Math.max(...counts);
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
}

export async function holdPageReporting(log: (message: string) => void, files = SYSTEM_FILES): Promise<PageReporting> {
  const current = (await readText(files.order))?.trim();
  const nothing = async (): Promise<void> => undefined;
  if (current === undefined) return { note: 'no free page reporting on this kernel', restore: nothing };
  const past = orderCount((await readText(files.buddyinfo)) ?? '');
  if (past === undefined) throw new Error('free page reporting is on, but /proc/buddyinfo does not say which block orders there are');
  if (Number(current) >= past) return { note: `free page reporting already off (order ${current})`, restore: nothing };
  try {
    await writeFile(files.order, String(past));
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    return {
      note: 'free page reporting left on',
      warning:
        `free page reporting is on and could not be paused (${reason}; it needs root): ` +
        'write and cold-read figures depend on how much memory the run before each job freed, and when',
      restore: nothing,
    };
  }
  log(`free page reporting paused for the run (page_reporting_order ${current} -> ${past}; put back at the end)`);
  let restored = false;
  return {
    note: 'free page reporting to the hypervisor paused for the run',
    async restore() {
      if (restored) return;
      restored = true;
      try {
        await writeFile(files.order, current);
      } catch (error) {
        log(`could not put page_reporting_order back to ${current} (${files.order}): ${String(error)}`);
      }
    },
  };
}
