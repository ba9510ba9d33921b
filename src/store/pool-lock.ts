/**
 * The pool's exclusive lock: a file created with O_EXCL holding the owner's pid. A lock whose
 * pid no longer runs is stale (its owner crashed) and is taken over: unlink, then O_EXCL again,
 * so of two processes taking over at once only one creates the file. Known limit: a lock file
 * caught between its creation and the write of the pid reads as empty and is taken for stale;
 * each taker re-reads the file after writing it, which narrows that window.
 */
import { OperationError } from '../util/errors.js';
import type { FileLayer } from './file-layer.js';
import { readWhole } from './journal.js';

function running(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export async function acquireLock(files: FileLayer, path: string): Promise<void> {
  const mine = `${process.pid}\n`;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const handle = await files.open(path, 'createExclusive');
      try {
        await handle.write(Buffer.from(mine), 0, mine.length, 0);
        await handle.sync();
      } finally {
        await handle.close();
      }
      if ((await readWhole(files, path)).toString() === mine) return;
      continue;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    }
    let holder: number;
    try {
      holder = Number.parseInt((await readWhole(files, path)).toString(), 10);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw error;
    }
    if (Number.isSafeInteger(holder) && holder > 0 && running(holder)) {
      const who = holder === process.pid ? `this process (pid ${holder})` : `process ${holder}`;
      throw new OperationError('EBUSY', `pool is locked by ${who} (lock file ${path})`);
    }
    await files.unlink(path).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== 'ENOENT') throw error;
    });
  }
  throw new OperationError('EBUSY', `could not take the pool lock ${path}`);
}

export async function releaseLock(files: FileLayer, path: string): Promise<void> {
  await files.unlink(path).catch(() => undefined);
}
