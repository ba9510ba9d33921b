/**
 * Moves an accepted connection into a Socket that reads into buffers the caller chooses (Node's
 * `onread` option), which `net.Server` does not offer for the sockets it accepts.
 *
 * Why: a plain socket hands every read over in a freshly allocated 64 KiB Buffer. At gigabytes a
 * second that allocation is what V8 answers with a full mark-compact every few tens of
 * milliseconds ("external memory pressure"), and each chunk is copied once more into the request
 * payload. With `onread` the kernel writes into one shared scratch buffer, or straight into the
 * payload being received.
 *
 * How: the accepted socket (created paused, `pauseOnConnect`) gives up its handle and its place
 * in the server's connection count to a new Socket built over the same handle. This relies on
 * `_handle` and `_server`, which Node has kept stable for years but does not document; when they
 * are missing the caller keeps the accepted socket and reads it the ordinary way.
 */
import { Socket, type SocketConstructorOpts } from 'node:net';

export interface ReadInto {
  /** Where the next read lands; called before each read. */
  buffer: () => Uint8Array;
  /** `count` bytes arrived at the start of `buffer`; they must be used or copied before returning. */
  callback: (count: number, buffer: Uint8Array) => void;
}

interface AcceptedInternals {
  _handle?: { useUserBuffer?: unknown } | null;
  _server?: unknown;
  server?: unknown;
}

/** The adopted socket, or undefined when this Node's internals do not allow it. */
export function adoptAccepted(accepted: Socket, readInto: ReadInto): Socket | undefined {
  const internals = accepted as unknown as AcceptedInternals;
  const handle = internals._handle;
  if (handle === null || handle === undefined || typeof handle.useUserBuffer !== 'function' || accepted.destroyed) {
    return undefined;
  }
  const server = internals._server;
  internals._handle = null;
  internals._server = null;
  // Node's types leave out the constructor's `handle` and `onread`, which it does accept.
  const options = { handle, readable: true, writable: true, onread: readInto };
  const adopted = new Socket(options as SocketConstructorOpts);
  const adoptedInternals = adopted as unknown as AcceptedInternals;
  adoptedInternals._server = server;
  adoptedInternals.server = server;
  accepted.destroy();
  return adopted;
}
