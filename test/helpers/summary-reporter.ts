import type { Reporter, RunnerTask } from 'vitest/node';

function count(tasks: readonly RunnerTask[], totals: { passed: number; failed: number; skipped: number }): void {
  for (const task of tasks) {
    if (task.type === 'suite') {
      count(task.tasks, totals);
    } else if (task.result?.state === 'pass') {
      totals.passed++;
    } else if (task.result?.state === 'fail') {
      totals.failed++;
    } else {
      totals.skipped++;
    }
  }
}

/** Prints the plain `N passed, N failed, N skipped` closing line that CI reads. */
export default class SummaryReporter implements Reporter {
  onFinished(files: RunnerTask[] = []): void {
    const totals = { passed: 0, failed: 0, skipped: 0 };
    count(files, totals);
    setImmediate(() => {
      process.stdout.write(`tests: ${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped\n`);
    });
  }
}
