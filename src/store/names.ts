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

export type Labels = Readonly<Record<string, string>>;

const LABEL_KEY = /^[a-z0-9][a-z0-9._/-]{0,62}$/;
const MAX_LABELS = 32;
const MAX_LABEL_VALUE = 1024;

/**
 * Labels are a caller's notes on a volume (the CSI driver keeps the request a volume was made
 * from), stored with the volume in the journal, so they stay small and plain.
 */
export function validateLabels(labels: unknown): Labels {
  if (labels === undefined) return {};
  if (typeof labels !== 'object' || labels === null || Array.isArray(labels)) {
    throw new OperationError('EINVAL', 'labels must be an object of strings');
  }
  const entries = Object.entries(labels);
  if (entries.length > MAX_LABELS) throw new OperationError('EINVAL', `at most ${MAX_LABELS} labels`);
  for (const [key, value] of entries) {
    if (!LABEL_KEY.test(key)) {
      throw new OperationError('EINVAL', `invalid label key ${JSON.stringify(key)}: 1 to 63 of [a-z0-9._/-], starting with a letter or digit`);
    }
    if (typeof value !== 'string' || value.length > MAX_LABEL_VALUE) {
      throw new OperationError('EINVAL', `label ${key} must be a string of at most ${MAX_LABEL_VALUE} characters`);
    }
  }
  return Object.fromEntries(entries) as Labels;
}
