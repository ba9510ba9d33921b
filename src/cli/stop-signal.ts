import type { Logger } from 'pino';

/**
 * Resolves on the first SIGTERM or SIGINT, logged. The handlers go in at the call, so call it
 * before announcing readiness: a signal sent on seeing that line is then handled.
 */
export function stopSignal(logger: Logger): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const stop = (signal: NodeJS.Signals): void => {
      logger.info({ signal }, 'shutting down');
      process.off('SIGTERM', stop);
      process.off('SIGINT', stop);
      resolve(signal);
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });
}
