#!/usr/bin/env node
/** The composition root: parses the command line and wires the pieces together. */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import pino from 'pino';
import { attachFileCommand } from './attach-file.js';
import { clientCommands } from './client-commands.js';
import { csiCommand } from './csi-command.js';
import { adminCommands, exitCodeFor, readAdminToken } from './admin-commands.js';
import { parseSize } from './parse.js';
import { DEFAULT_LISTEN, TLS_MODES, countArg, defaultPoolDir, definedOnly, secondsArg, serve, sizeArg } from './serve.js';
import { DEFAULT_LIMITS } from '../server/index.js';

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
          .option('tls', {
            choices: TLS_MODES,
            default: (env.CLONEBD_TLS ?? 'off') as (typeof TLS_MODES)[number],
            describe: 'NBD_OPT_STARTTLS: off, optional (plain or TLS), require (TLS before any option); env CLONEBD_TLS',
          })
          .option('tls-cert', { type: 'string', default: env.CLONEBD_TLS_CERT, describe: 'PEM certificate chain of the server; env CLONEBD_TLS_CERT' })
          .option('tls-key', { type: 'string', default: env.CLONEBD_TLS_KEY, describe: 'PEM private key of the server; env CLONEBD_TLS_KEY' })
          .option('tls-ca', {
            type: 'string',
            default: env.CLONEBD_TLS_CA,
            describe: 'PEM CA certificates: clients must present a certificate they signed; env CLONEBD_TLS_CA',
          })
          .option('tls-psk', {
            type: 'string',
            default: env.CLONEBD_TLS_PSK,
            describe: 'TLS-PSK keys, one "username:hexkey" per line (psktool format); env CLONEBD_TLS_PSK',
          })
          .option('access', {
            describe: 'JSON file of per-export rules, e.g. {"exports": {"NAME": {"readOnly": true, "allow": ["client-cn"]}}} (in --config, the object itself may stand here); env CLONEBD_ACCESS',
            default: env.CLONEBD_ACCESS as unknown,
          })
          .option('max-connections', {
            type: 'number',
            describe: 'Most connections at once, all listeners together',
            defaultDescription: String(DEFAULT_LIMITS.maxConnections),
            coerce: countArg('--max-connections'),
          })
          .option('max-connections-per-address', {
            type: 'number',
            describe: 'Most connections at once from one IP address',
            defaultDescription: String(DEFAULT_LIMITS.maxConnectionsPerAddress),
            coerce: countArg('--max-connections-per-address'),
          })
          .option('handshake-timeout', {
            describe: 'Seconds a client may take from connecting to transmission, TLS included (0: no limit)',
            defaultDescription: String(DEFAULT_LIMITS.handshakeTimeoutMs / 1000),
            coerce: secondsArg('--handshake-timeout'),
          })
          .option('idle-timeout', {
            describe: 'Close a connection with nothing in flight and no traffic for this many seconds (0: never)',
            defaultDescription: String(DEFAULT_LIMITS.idleTimeoutMs / 1000),
            coerce: secondsArg('--idle-timeout'),
          })
          .option('busy-poll', {
            type: 'number',
            describe: 'Microseconds the server keeps polling for the next request after traffic instead of sleeping (0: off); lower latency at one request in flight, for CPU',
            defaultDescription: String(DEFAULT_LIMITS.busyPollUs),
            coerce: countArg('--busy-poll'),
          })
          .option('max-option-size', {
            type: 'string',
            describe: 'Largest handshake option; larger ones are refused with NBD_REP_ERR_TOO_BIG',
            defaultDescription: '64KiB',
            coerce: sizeArg,
          })
          .option('max-request-size', {
            type: 'string',
            describe: 'Largest READ or WRITE payload, advertised as the maximum block size',
            defaultDescription: '32MiB',
            coerce: sizeArg,
          })
          .option('max-requests-in-flight', {
            type: 'number',
            describe: 'Requests one connection may have in flight before the server stops reading it',
            defaultDescription: String(DEFAULT_LIMITS.maxInFlightRequests),
            coerce: countArg('--max-requests-in-flight'),
          })
          .option('max-bytes-in-flight', {
            type: 'string',
            describe: 'Request and reply bytes one connection may have in flight before the server stops reading it',
            defaultDescription: '64MiB',
            coerce: sizeArg,
          })
          .option('log-level', {
            choices: LOG_LEVELS,
            default: (env.CLONEBD_LOG_LEVEL ?? 'info') as (typeof LOG_LEVELS)[number],
            describe: 'Log level; env CLONEBD_LOG_LEVEL',
          })
          .example('$0 serve', 'serve the default pool on 127.0.0.1:10809')
          .example('$0 serve --pool /srv/clonebd --listen 0.0.0.0:10809', 'serve another pool on every address')
          .example('$0 serve --tls require --tls-cert server-cert.pem --tls-key server-key.pem --tls-ca ca-cert.pem', 'TLS only, client certificates required'),
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
            tls: args.tls,
            tlsFiles: { cert: args['tls-cert'], key: args['tls-key'], ca: args['tls-ca'], psk: args['tls-psk'] },
            access: args.access,
            limits: definedOnly({
              maxConnections: args['max-connections'],
              maxConnectionsPerAddress: args['max-connections-per-address'],
              handshakeTimeoutMs: args['handshake-timeout'],
              idleTimeoutMs: args['idle-timeout'],
              busyPollUs: args['busy-poll'],
              maxOptionLength: args['max-option-size'],
              maxPayload: args['max-request-size'],
              maxInFlightRequests: args['max-requests-in-flight'],
              maxInFlightBytes: args['max-bytes-in-flight'],
            }),
          },
          logger,
        );
      },
    )
    .command(clientCommands)
    .config('config', 'A JSON file of option values, e.g. {"pool": "/srv/clonebd", "listen": "0.0.0.0:10809"}')
    .default('config', env.CLONEBD_CONFIG, '$CLONEBD_CONFIG')
    .command(adminCommands)
    .command(csiCommand)
    .command(attachFileCommand)
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
