import { OperationError } from '../util/errors.js';

const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

/**
 * Volume names reach the store from the network and the admin API. They never become path
 * components (files are named by layer id), but they are still kept to a small, printable set.
 */
export function validateName(name: unknown): string {
  if (typeof name !== 'string' || !NAME.test(name) || name.includes('..')) {
    throw new OperationError(
      'EINVAL',
      `invalid name ${JSON.stringify(name)}: 1 to 128 of [A-Za-z0-9._-], not starting with '.' or '-', no '..'`,
    );
  }
  return name;
}
