/**
 * The Kubernetes manifests in deploy/, checked offline: every document parses and is a kind we
 * know with the fields that kind needs, and the documents agree with each other (one driver name,
 * one socket path, references that resolve, RBAC that covers what the sidecars do). Each check
 * names the mistake it catches.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, posix, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import yargs from 'yargs';
import { csiCommand, DEFAULT_DRIVER_NAME } from '../../src/cli/csi-command.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const DEPLOY = join(ROOT, 'deploy');

type Obj = Record<string, unknown>;

interface Manifest {
  file: string;
  apiVersion: string;
  kind: string;
  name: string;
  namespace: string | undefined;
  body: Obj;
}

function isObj(value: unknown): value is Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Follows `path` through nested objects and arrays (numeric segments index arrays). */
function at(value: unknown, ...path: (string | number)[]): unknown {
  let current = value;
  for (const key of path) {
    if (typeof key === 'number') current = Array.isArray(current) ? current[key] : undefined;
    else current = isObj(current) ? current[key] : undefined;
  }
  return current;
}

function list(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}

function yamlFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return yamlFiles(path);
    return /\.ya?ml$/.test(entry.name) ? [path] : [];
  });
}

/** The kinds deploy/ may use, with their apiVersion and whether they live in a namespace. */
const KNOWN_KINDS: Record<string, { apiVersion: string; namespaced: boolean }> = {
  Namespace: { apiVersion: 'v1', namespaced: false },
  ServiceAccount: { apiVersion: 'v1', namespaced: true },
  PersistentVolumeClaim: { apiVersion: 'v1', namespaced: true },
  Pod: { apiVersion: 'v1', namespaced: true },
  DaemonSet: { apiVersion: 'apps/v1', namespaced: true },
  CSIDriver: { apiVersion: 'storage.k8s.io/v1', namespaced: false },
  StorageClass: { apiVersion: 'storage.k8s.io/v1', namespaced: false },
  ClusterRole: { apiVersion: 'rbac.authorization.k8s.io/v1', namespaced: false },
  ClusterRoleBinding: { apiVersion: 'rbac.authorization.k8s.io/v1', namespaced: false },
  Role: { apiVersion: 'rbac.authorization.k8s.io/v1', namespaced: true },
  RoleBinding: { apiVersion: 'rbac.authorization.k8s.io/v1', namespaced: true },
  VolumeSnapshotClass: { apiVersion: 'snapshot.storage.k8s.io/v1', namespaced: false },
  VolumeSnapshot: { apiVersion: 'snapshot.storage.k8s.io/v1', namespaced: true },
};

const KUSTOMIZATION = { apiVersion: 'kustomize.config.k8s.io/v1beta1', kind: 'Kustomization' };

interface Loaded {
  manifests: Manifest[];
  kustomizations: { file: string; body: Obj }[];
  problems: string[];
}

function load(): Loaded {
  const manifests: Manifest[] = [];
  const kustomizations: { file: string; body: Obj }[] = [];
  const problems: string[] = [];
  for (const path of yamlFiles(DEPLOY)) {
    const file = relative(ROOT, path);
    const documents = parseAllDocuments(readFileSync(path, 'utf8'));
    if (!Array.isArray(documents)) {
      problems.push(`${file}: not a YAML stream`);
      continue;
    }
    documents.forEach((document, index) => {
      const where = `${file} document ${index + 1}`;
      for (const error of document.errors) problems.push(`${where}: ${error.message}`);
      const body: unknown = document.toJS();
      if (body === null || body === undefined) return;
      if (!isObj(body)) {
        problems.push(`${where}: not a mapping`);
        return;
      }
      const { apiVersion, kind } = body;
      if (apiVersion === KUSTOMIZATION.apiVersion && kind === KUSTOMIZATION.kind) {
        kustomizations.push({ file, body });
        return;
      }
      const name = at(body, 'metadata', 'name');
      if (typeof apiVersion !== 'string' || typeof kind !== 'string' || typeof name !== 'string' || name === '') {
        problems.push(`${where}: needs apiVersion, kind and metadata.name`);
        return;
      }
      const known = KNOWN_KINDS[kind];
      if (known === undefined) problems.push(`${where}: unknown kind ${kind}`);
      else if (known.apiVersion !== apiVersion) problems.push(`${where}: ${kind} is ${known.apiVersion}, not ${apiVersion}`);
      const namespace = at(body, 'metadata', 'namespace');
      if (known?.namespaced === true && typeof namespace !== 'string') problems.push(`${where}: ${kind} ${name} needs a namespace`);
      if (known?.namespaced === false && namespace !== undefined) problems.push(`${where}: ${kind} ${name} is not namespaced`);
      manifests.push({ file, apiVersion, kind, name, namespace: typeof namespace === 'string' ? namespace : undefined, body });
    });
  }
  return { manifests, kustomizations, problems };
}

const loaded = load();
const { manifests } = loaded;

function ofKind(kind: string): Manifest[] {
  return manifests.filter((manifest) => manifest.kind === kind);
}

function only(kind: string): Manifest {
  const found = ofKind(kind);
  if (found.length !== 1) throw new Error(`expected one ${kind}, found ${found.length}`);
  return found[0]!;
}

function find(kind: string, name: string, namespace?: string): Manifest | undefined {
  return manifests.find((m) => m.kind === kind && m.name === name && (namespace === undefined || m.namespace === namespace));
}

interface Container {
  name: string;
  image: unknown;
  args: unknown[];
  env: Obj[];
  volumeMounts: Obj[];
  securityContext: Obj | undefined;
}

const daemonSet = only('DaemonSet');
const podSpec = at(daemonSet.body, 'spec', 'template', 'spec');
const containers: Container[] = list(at(podSpec, 'containers')).map((raw) => ({
  name: String(at(raw, 'name')),
  image: at(raw, 'image'),
  args: list(at(raw, 'args')),
  env: list(at(raw, 'env')).filter(isObj),
  volumeMounts: list(at(raw, 'volumeMounts')).filter(isObj),
  securityContext: isObj(at(raw, 'securityContext')) ? (at(raw, 'securityContext') as Obj) : undefined,
}));
const podVolumes = list(at(podSpec, 'volumes')).filter(isObj);

function container(name: string): Container {
  const found = containers.find((candidate) => candidate.name === name);
  if (found === undefined) throw new Error(`the DaemonSet has no container ${name}`);
  return found;
}

/** The value of `--flag=value` among a container's args. */
function flag(c: Container, name: string): string | undefined {
  const prefix = `--${name}=`;
  const arg = c.args.find((candidate): candidate is string => typeof candidate === 'string' && candidate.startsWith(prefix));
  return arg?.slice(prefix.length);
}

/** Where the pod volume mounted at `mountPath` in `c` comes from on the host. */
function hostPathAt(c: Container, mountPath: string): string | undefined {
  const mount = c.volumeMounts.find((candidate) => candidate.mountPath === mountPath);
  const volume = podVolumes.find((candidate) => candidate.name === mount?.name);
  const path = at(volume, 'hostPath', 'path');
  return typeof path === 'string' ? path : undefined;
}

/** The host path of `path` inside container `c`, through the hostPath volume mounted at its longest matching mount. */
function hostPathOf(c: Container, path: string): string | undefined {
  const mounts = c.volumeMounts
    .filter((mount) => typeof mount.mountPath === 'string' && (path === mount.mountPath || path.startsWith(`${String(mount.mountPath)}/`)))
    .sort((a, b) => String(b.mountPath).length - String(a.mountPath).length);
  const mount = mounts[0];
  if (mount === undefined) return undefined;
  const base = hostPathAt(c, String(mount.mountPath));
  return base === undefined ? undefined : posix.join(base, posix.relative(String(mount.mountPath), path));
}

function envFromField(c: Container, name: string): unknown {
  return at(c.env.find((variable) => variable.name === name), 'valueFrom', 'fieldRef', 'fieldPath');
}

const SIDECARS = ['node-driver-registrar', 'csi-provisioner', 'csi-snapshotter', 'csi-resizer'] as const;

describe('deploy/ manifests', () => {
  it('every YAML document parses and is a known kind with apiVersion, kind and metadata.name', () => {
    expect(loaded.problems).toEqual([]);
    expect(manifests.length).toBeGreaterThan(10);
  });

  it('no two objects of one kind share a name in one namespace', () => {
    const keys = manifests.map((m) => `${m.kind}/${m.namespace ?? ''}/${m.name}`);
    expect(keys.filter((key, index) => keys.indexOf(key) !== index)).toEqual([]);
  });

  it('the kustomization lists every file of deploy/kubernetes and nothing else', () => {
    expect(loaded.kustomizations).toHaveLength(1);
    const kustomization = loaded.kustomizations[0]!;
    const dir = dirname(kustomization.file);
    const resources = list(kustomization.body.resources).map(String).sort();
    const files = yamlFiles(join(ROOT, dir))
      .map((path) => relative(join(ROOT, dir), path))
      .filter((file) => file !== 'kustomization.yaml')
      .sort();
    expect(resources).toEqual(files);
    // Its image override must name the image the DaemonSet uses.
    const imageNames = list(kustomization.body.images).map((image) => at(image, 'name'));
    const clonebdImages = containers.map((c) => String(c.image)).filter((image) => !image.includes('/'));
    expect(clonebdImages.length).toBeGreaterThan(0);
    for (const image of clonebdImages) expect(imageNames).toContain(image.split(':')[0]);
  });

  it('the CSIDriver needs no attach and asks for pod info', () => {
    const driver = only('CSIDriver');
    expect(at(driver.body, 'spec', 'attachRequired')).toBe(false);
    expect(at(driver.body, 'spec', 'podInfoOnMount')).toBe(true);
    expect(list(at(driver.body, 'spec', 'volumeLifecycleModes'))).toEqual(['Persistent']);
  });

  it('one driver name everywhere: StorageClass, VolumeSnapshotClass, registration path, socket dir', () => {
    const name = only('CSIDriver').name;
    expect(name).toMatch(/^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$/);
    expect(only('StorageClass').body.provisioner).toBe(name);
    expect(only('VolumeSnapshotClass').body.driver).toBe(name);
    const registrar = container('node-driver-registrar');
    expect(flag(registrar, 'kubelet-registration-path')).toBe(`/var/lib/kubelet/plugins/${name}/csi.sock`);
    // The name the driver reports in GetPluginInfo: the one it is given, else its default.
    expect(flag(container('clonebd-csi'), 'driver-name') ?? DEFAULT_DRIVER_NAME).toBe(name);
    // Any other mention of a driver-like name in the manifests must be this one.
    const text = yamlFiles(DEPLOY)
      .map((path) => readFileSync(path, 'utf8'))
      .join('\n');
    const mentions = new Set(text.match(/\b[a-z0-9-]+\.csi\.[a-z0-9.-]+\b/g) ?? []);
    expect([...mentions]).toEqual([name]);
  });

  it('the StorageClass waits for the first consumer and allows expansion', () => {
    const storageClass = only('StorageClass');
    expect(storageClass.body.volumeBindingMode).toBe('WaitForFirstConsumer');
    expect(storageClass.body.allowVolumeExpansion).toBe(true);
    expect(['ext4', 'xfs']).toContain(at(storageClass.body, 'parameters', 'csi.storage.k8s.io/fstype'));
  });

  it('every container has a pinned image and every arg is a non-empty string', () => {
    expect(containers.map((c) => c.name).sort()).toEqual(['clonebd-csi', 'clonebd-daemon', ...SIDECARS].sort());
    for (const c of containers) {
      expect(typeof c.image, c.name).toBe('string');
      expect(String(c.image), c.name).toMatch(/^[a-z0-9./-]+:v?\d+\.\d+\.\d+$/);
      expect(c.args.length, c.name).toBeGreaterThan(0);
      for (const arg of c.args) {
        expect(typeof arg, `${c.name}: ${String(arg)}`).toBe('string');
        expect(arg, c.name).not.toBe('');
        // `--flag=` with nothing after it is a value someone forgot to fill in.
        expect(arg, c.name).not.toMatch(/=$/);
      }
    }
    for (const sidecar of SIDECARS) expect(String(container(sidecar).image)).toMatch(/^registry\.k8s\.io\/sig-storage\//);
  });

  it('the driver container passes only options that `clonebd csi` knows, with valid values', async () => {
    const csi = container('clonebd-csi');
    // Kubernetes expands $(VAR) from the container's env before the command sees it.
    const args = csi.args.map((arg) => String(arg).replace(/\$\((\w+)\)/g, 'node-1'));
    let parsed: Record<string, unknown> | undefined;
    await yargs()
      .command({ ...csiCommand, handler: (argv) => void (parsed = argv as Record<string, unknown>) })
      .strict()
      .exitProcess(false)
      .fail((message, error) => {
        throw error ?? new Error(message);
      })
      .parseAsync(args);
    expect(parsed?.['node-id']).toBe('node-1');
    expect(parsed?.pool).toBe(flag(csi, 'pool'));
  });

  it('every $(VAR) in an arg is defined in that container env', () => {
    for (const c of containers) {
      for (const arg of c.args.map(String)) {
        for (const match of arg.matchAll(/\$\((\w+)\)/g)) {
          expect(c.env.map((variable) => variable.name), `${c.name}: ${arg}`).toContain(match[1]);
        }
      }
    }
  });

  it('every volume mount names a pod volume, and the sidecars reach the driver on the registered socket', () => {
    const volumeNames = podVolumes.map((volume) => volume.name);
    for (const c of containers) for (const mount of c.volumeMounts) expect(volumeNames, `${c.name}`).toContain(mount.name);
    const registered = flag(container('node-driver-registrar'), 'kubelet-registration-path');
    const endpoint = flag(container('clonebd-csi'), 'endpoint');
    expect(endpoint).toMatch(/^unix:\/\//);
    const driverSocket = endpoint!.replace(/^unix:\/\//, '');
    expect(hostPathOf(container('clonebd-csi'), driverSocket)).toBe(registered);
    for (const sidecar of SIDECARS) {
      const c = container(sidecar);
      const address = flag(c, 'csi-address');
      expect(address, sidecar).toBeDefined();
      expect(hostPathOf(c, address!), sidecar).toBe(registered);
    }
    expect(hostPathAt(container('node-driver-registrar'), '/registration')).toBe('/var/lib/kubelet/plugins_registry');
  });

  it('the driver container can mount for the kubelet: privileged, kubelet dir Bidirectional, host /dev', () => {
    const csi = container('clonebd-csi');
    expect(csi.securityContext?.privileged).toBe(true);
    const kubelet = csi.volumeMounts.find((mount) => hostPathAt(csi, String(mount.mountPath)) === '/var/lib/kubelet');
    expect(kubelet?.mountPath).toBe('/var/lib/kubelet');
    expect(kubelet?.mountPropagation).toBe('Bidirectional');
    expect(hostPathAt(csi, '/dev')).toBe('/dev');
    expect(envFromField(csi, 'NODE_NAME')).toBe('spec.nodeName');
  });

  it('the daemon and the driver share one pool directory, and the driver keeps its state on the host', () => {
    const daemon = container('clonebd-daemon');
    const csi = container('clonebd-csi');
    expect(daemon.args[0]).toBe('serve');
    expect(csi.args[0]).toBe('csi');
    const pool = flag(daemon, 'pool');
    expect(pool).toBeDefined();
    expect(flag(csi, 'pool')).toBe(pool);
    expect(hostPathOf(daemon, pool!)).toBeDefined();
    expect(hostPathOf(csi, pool!)).toBe(hostPathOf(daemon, pool!));
    const state = flag(csi, 'state-dir');
    expect(state).toBeDefined();
    expect(hostPathOf(csi, state!)).toBeDefined();
    // The state must not sit under the kubelet dir, whose mounts propagate to the host.
    expect(hostPathOf(csi, state!)!.startsWith('/var/lib/kubelet')).toBe(false);
  });

  it('provisioner and snapshotter run per node; the resizer elects one leader', () => {
    for (const name of ['csi-provisioner', 'csi-snapshotter']) {
      const c = container(name);
      expect(flag(c, 'node-deployment'), name).toBe('true');
      expect(envFromField(c, 'NODE_NAME'), name).toBe('spec.nodeName');
      expect(flag(c, 'leader-election') ?? 'false', name).toBe('false');
    }
    expect(flag(container('csi-provisioner'), 'strict-topology')).toBe('true');
    const resizer = container('csi-resizer');
    expect(flag(resizer, 'leader-election')).toBe('true');
    expect(flag(resizer, 'node-deployment')).toBeUndefined();
  });

  it('the pod runs as a service account that exists, and every binding points at roles and accounts that exist', () => {
    const account = at(podSpec, 'serviceAccountName');
    expect(find('ServiceAccount', String(account), daemonSet.namespace)).toBeDefined();
    for (const binding of [...ofKind('ClusterRoleBinding'), ...ofKind('RoleBinding')]) {
      const roleKind = String(at(binding.body, 'roleRef', 'kind'));
      const roleName = String(at(binding.body, 'roleRef', 'name'));
      const role = find(roleKind, roleName, roleKind === 'Role' ? binding.namespace : undefined);
      expect(role, `${binding.kind} ${binding.name} -> ${roleKind} ${roleName}`).toBeDefined();
      for (const subject of list(at(binding.body, 'subjects'))) {
        const subjectNamespace = String(at(subject, 'namespace'));
        // The snapshot-controller's account comes with the snapshot CRDs, not from here.
        if (subjectNamespace === 'kube-system') continue;
        expect(find('ServiceAccount', String(at(subject, 'name')), subjectNamespace), `${binding.name}`).toBeDefined();
      }
    }
  });

  it('RBAC gives the pod what its sidecars do', () => {
    const account = String(at(podSpec, 'serviceAccountName'));
    const namespace = daemonSet.namespace;
    const boundTo = (binding: Manifest): boolean =>
      list(at(binding.body, 'subjects')).some((subject) => at(subject, 'name') === account && at(subject, 'namespace') === namespace);
    const rules = [...ofKind('ClusterRoleBinding'), ...ofKind('RoleBinding').filter((binding) => binding.namespace === namespace)]
      .filter(boundTo)
      .flatMap((binding) => {
        const kind = String(at(binding.body, 'roleRef', 'kind'));
        const role = find(kind, String(at(binding.body, 'roleRef', 'name')), kind === 'Role' ? binding.namespace : undefined);
        return list(at(role?.body, 'rules'));
      });
    const allowed = (group: string, resource: string, verb: string): boolean =>
      rules.some(
        (rule) =>
          list(at(rule, 'apiGroups')).includes(group) &&
          list(at(rule, 'resources')).includes(resource) &&
          list(at(rule, 'verbs')).includes(verb),
      );
    const needed: [string, string, string][] = [
      // external-provisioner
      ['', 'persistentvolumes', 'create'],
      ['', 'persistentvolumes', 'delete'],
      ['', 'persistentvolumeclaims', 'update'],
      ['storage.k8s.io', 'storageclasses', 'list'],
      ['storage.k8s.io', 'csinodes', 'get'],
      ['', 'nodes', 'get'],
      ['snapshot.storage.k8s.io', 'volumesnapshots', 'get'],
      ['snapshot.storage.k8s.io', 'volumesnapshotcontents', 'get'],
      ['', 'events', 'create'],
      // external-snapshotter
      ['snapshot.storage.k8s.io', 'volumesnapshotclasses', 'list'],
      ['snapshot.storage.k8s.io', 'volumesnapshotcontents', 'update'],
      ['snapshot.storage.k8s.io', 'volumesnapshotcontents/status', 'update'],
      ['groupsnapshot.storage.k8s.io', 'volumegroupsnapshotcontents', 'watch'],
      // external-resizer and its leader election
      ['', 'persistentvolumes', 'patch'],
      ['', 'persistentvolumeclaims/status', 'patch'],
      ['', 'pods', 'list'],
      ['coordination.k8s.io', 'leases', 'update'],
    ];
    expect(needed.filter(([group, resource, verb]) => !allowed(group, resource, verb))).toEqual([]);
  });

  it('the examples: a PVC, its clone, a snapshot of it and a restore, all of the clonebd class', () => {
    const storageClass = only('StorageClass').name;
    const claims = ofKind('PersistentVolumeClaim');
    const source = claims.find((claim) => at(claim.body, 'spec', 'dataSource') === undefined);
    expect(source).toBeDefined();
    for (const claim of claims) {
      // Kubernetes clones and restores only within one StorageClass.
      expect(at(claim.body, 'spec', 'storageClassName'), claim.name).toBe(storageClass);
      expect(claim.namespace, claim.name).toBe(source!.namespace);
    }
    const storage = (claim: Manifest): string => String(at(claim.body, 'spec', 'resources', 'requests', 'storage'));

    const clone = claims.find((claim) => at(claim.body, 'spec', 'dataSource', 'kind') === 'PersistentVolumeClaim');
    expect(clone).toBeDefined();
    expect(at(clone!.body, 'spec', 'dataSource', 'name')).toBe(source!.name);
    expect(at(clone!.body, 'spec', 'dataSource', 'apiGroup') ?? '').toBe('');
    expect(storage(clone!)).toBe(storage(source!));

    const snapshot = only('VolumeSnapshot');
    expect(snapshot.namespace).toBe(source!.namespace);
    expect(at(snapshot.body, 'spec', 'source', 'persistentVolumeClaimName')).toBe(source!.name);
    expect(at(snapshot.body, 'spec', 'volumeSnapshotClassName')).toBe(only('VolumeSnapshotClass').name);

    const restore = claims.find((claim) => at(claim.body, 'spec', 'dataSource', 'kind') === 'VolumeSnapshot');
    expect(restore).toBeDefined();
    expect(at(restore!.body, 'spec', 'dataSource', 'name')).toBe(snapshot.name);
    expect(at(restore!.body, 'spec', 'dataSource', 'apiGroup')).toBe('snapshot.storage.k8s.io');
  });

  it('every example pod mounts a claim that exists, and clone and restore pods go to the source node', () => {
    const pods = ofKind('Pod');
    expect(pods.length).toBeGreaterThan(0);
    const claims = ofKind('PersistentVolumeClaim');
    for (const pod of pods) {
      for (const volume of list(at(pod.body, 'spec', 'volumes'))) {
        const claimName = at(volume, 'persistentVolumeClaim', 'claimName');
        if (claimName === undefined) continue;
        const claim = find('PersistentVolumeClaim', String(claimName), pod.namespace);
        expect(claim, `${pod.name} mounts ${String(claimName)}`).toBeDefined();
        if (at(claim!.body, 'spec', 'dataSource') === undefined) continue;
        // A clone or restore is made where its source lives: the pod must follow it there.
        const terms = list(at(pod.body, 'spec', 'affinity', 'podAffinity', 'requiredDuringSchedulingIgnoredDuringExecution'));
        expect(terms.length, pod.name).toBeGreaterThan(0);
        const labels = at(terms[0], 'labelSelector', 'matchLabels');
        const target = pods.find((candidate) => {
          const podLabels = at(candidate.body, 'metadata', 'labels');
          return isObj(labels) && isObj(podLabels) && Object.entries(labels).every(([key, value]) => podLabels[key] === value);
        });
        expect(target, `${pod.name}'s affinity selects a pod`).toBeDefined();
        const targetClaims = list(at(target!.body, 'spec', 'volumes')).map((v) => at(v, 'persistentVolumeClaim', 'claimName'));
        expect(targetClaims, pod.name).toContain(claims.find((c) => at(c.body, 'spec', 'dataSource') === undefined)!.name);
      }
    }
  });

  it('the image installs the tools the node service runs and starts the CLI that package.json names', () => {
    const containerfile = readFileSync(join(DEPLOY, 'Containerfile'), 'utf8');
    const install = /apt-get install[^\n]*\\\n([\s\S]*?)(?:&&|$)/.exec(containerfile)?.[1] ?? '';
    const packages = install.split(/[\s\\]+/).filter((word) => word !== '');
    for (const needed of ['nbd-client', 'fuse3', 'e2fsprogs', 'xfsprogs', 'util-linux', 'mount']) {
      expect(packages, needed).toContain(needed);
    }
    expect(containerfile).toMatch(/^FROM \S*node:20-bookworm\S*/m);
    const bin = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string> }).bin.clonebd;
    const entrypoint = /^ENTRYPOINT \[(.*)\]$/m.exec(containerfile)?.[1];
    expect(entrypoint).toBeDefined();
    const [program, script] = JSON.parse(`[${entrypoint!}]`) as string[];
    expect(program).toBe('node');
    const workdir = /^WORKDIR (\S+)$/gm;
    const dirs = [...containerfile.matchAll(workdir)].map((match) => match[1]);
    expect(script).toBe(posix.join(dirs.at(-1)!, bin!));
  });
});
