#!/usr/bin/env node
/** The composition root: parses the command line and wires the pieces together. */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import pino from 'pino';
import { clientCommands } from './client-commands.js';
import { adminCommands, exitCodeFor, readAdminToken } from './admin-commands.js';
import { parseSize } from './parse.js';
import { DEFAULT_LISTEN, defaultPoolDir, serve } from './serve.js';

const env = process.env;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

async function main(argv: string[]): Promise<void> {
  await yargs(argv)
    .scriptName('clonebd')
    .usage('$0 <command> [options]')
    .command(
      'serve',
      'Serve every volume and snapshot of a pool over NBD',
      (command) =>
        command
          .option('pool', {
            type: 'string',
            describe: 'Pool directory (created if absent); env CLONEBD_POOL',
            default: defaultPoolDir(),
          })
          .option('listen', {
            type: 'string',
            describe: 'TCP address HOST:PORT',
            default: env.CLONEBD_LISTEN ?? DEFAULT_LISTEN,
            defaultDescription: `$CLONEBD_LISTEN or ${DEFAULT_LISTEN}`,
          })
          .option('socket', { type: 'string', describe: 'Also listen on this Unix socket path; env CLONEBD_SOCKET', default: env.CLONEBD_SOCKET })
          .option('default-volume', {
            type: 'boolean',
            default: true,
            describe: 'Create an empty 1 GiB volume named "default" in a new pool',
          })
          .option('metrics', {
            type: 'string',
            describe: 'Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given; e.g. 127.0.0.1:9810); env CLONEBD_METRICS',
            default: env.CLONEBD_METRICS,
          })
          .option('capacity', {
            type: 'string',
            describe: 'Most bytes the pool may hold (e.g. 500GiB); the file system\'s free space if not given; env CLONEBD_CAPACITY',
            default: env.CLONEBD_CAPACITY,
            coerce: (text: string | undefined) => (text === undefined ? undefined : parseSize(text)),
          })
          .option('admin-listen', {
            type: 'string',
            default: env.CLONEBD_ADMIN_LISTEN,
            describe: 'Also serve the admin API over TCP at HOST:PORT, token required; env CLONEBD_ADMIN_LISTEN',
          })
          .option('admin-token-file', {
            type: 'string',
            describe: 'File holding the admin token (16+ characters) for --admin-listen, or env CLONEBD_ADMIN_TOKEN',
          })
          .option('log-level', {
            choices: LOG_LEVELS,
            default: (env.CLONEBD_LOG_LEVEL ?? 'info') as (typeof LOG_LEVELS)[number],
            describe: 'Log level; env CLONEBD_LOG_LEVEL',
          })
          .example('$0 serve', 'serve the default pool on 127.0.0.1:10809')
          .example('$0 serve --pool /srv/clonebd --listen 0.0.0.0:10809', 'serve another pool on every address'),
      async (args) => {
        const logger = pino({ level: args['log-level'] });
        await serve(
          {
            pool: args.pool,
            listen: args.listen,
            socket: args.socket,
            defaultVolume: args['default-volume'],
            metrics: args.metrics,
            capacity: args.capacity,
            adminListen: args['admin-listen'],
            adminToken: args['admin-listen'] === undefined ? undefined : readAdminToken(args['admin-token-file']),
          },
          logger,
        );
      },
    )
    .command(clientCommands)
    .config('config', 'A JSON file of option values, e.g. {"pool": "/srv/clonebd", "listen": "0.0.0.0:10809"}')
    .default('config', env.CLONEBD_CONFIG, '$CLONEBD_CONFIG')
    .command(adminCommands)
    .demandCommand(1, 'Name a command; see --help')
    .strict()
    .help()
    .alias('help', 'h')
    .version()
    .fail((message, error) => {
      if (error) throw error;
      process.stderr.write(`clonebd: ${message}\nRun 'clonebd --help' for usage.\n`);
      process.exit(2);
    })
    .parseAsync();
}

main(hideBin(process.argv)).catch((error: unknown) => {
  process.stderr.write(`clonebd: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(exitCodeFor(error));
});
