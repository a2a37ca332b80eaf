/**
 * The Kubernetes files: the kustomize base and each overlay render (with the
 * kubectl on this machine) to complete objects, and every object passes two
 * checks against the Kubernetes API's own schemas: kubernetes-models' validator
 * (types, required fields, enums) and an unknown-field walk over
 * @kubernetes/client-node's type map (the validator lets a misspelt field
 * through; the walk does not). The agent's command line names only flags the
 * agent has, and the sample manifest in the ConfigMap is a valid manifest.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import * as k8s from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { loadManifestText } from '../../src/manifest/load.js';
import { BIN, needTools, REPO, run, runOk } from '../helpers/tools.js';

type Obj = Record<string, unknown>;
const DIRS = ['base', 'overlays/example', 'overlays/git-sync'];

function render(dir: string): Obj[] {
  const out = runOk('kubectl', ['kustomize', join(REPO, 'deploy/kubernetes', dir)]);
  return parseAllDocuments(out)
    .map((d) => d.toJS() as Obj | null)
    .filter((o): o is Obj => o !== null);
}

/** kubernetes-models' validator for the object's apiVersion and kind (throws on a violation). */
async function validateModel(o: Obj): Promise<void> {
  const [group, version] = String(o.apiVersion).includes('/')
    ? String(o.apiVersion).split('/')
    : ['', String(o.apiVersion)];
  const path = `kubernetes-models/${group ? `${group}/` : ''}${version}/${String(o.kind)}`;
  const mod = (await import(path)) as Record<string, new (d: Obj) => { validate(): void }>;
  const Model = mod[String(o.kind)];
  assert.ok(Model, `no model for ${path}`);
  new Model(o).validate();
}

interface Attr {
  baseName: string;
  type: string;
}
type Typed = { getAttributeTypeMap(): Attr[] };

/** Every field name the Kubernetes API does not know, as paths (client-node's type map). */
export function unknownFields(value: unknown, type: string, path: string): string[] {
  if (value === null || value === undefined) return [];
  const arr = /^Array<(.+)>$/.exec(type);
  if (arr)
    return Array.isArray(value) ? value.flatMap((v, i) => unknownFields(v, arr[1]!, `${path}[${i}]`)) : [];
  const map = /^\{ \[key: string\]: (.+); \}$/.exec(type);
  if (map) {
    return typeof value === 'object'
      ? Object.entries(value as Obj).flatMap(([k, v]) => unknownFields(v, map[1]!, `${path}.${k}`))
      : [];
  }
  const cls = (k8s as unknown as Record<string, Typed | undefined>)[type];
  if (!cls || typeof cls.getAttributeTypeMap !== 'function' || typeof value !== 'object') return [];
  const attrs = new Map(cls.getAttributeTypeMap().map((a) => [a.baseName, a.type]));
  return Object.entries(value as Obj).flatMap(([k, v]) => {
    const t = attrs.get(k);
    return t === undefined ? [`${path}.${k}`] : unknownFields(v, t, `${path}.${k}`);
  });
}

function typeOf(o: Obj): string {
  const version = String(o.apiVersion).split('/').pop()!;
  return `${version.charAt(0).toUpperCase()}${version.slice(1)}${String(o.kind)}`;
}

function daemonSet(objs: Obj[]): Obj {
  const ds = objs.find((o) => o.kind === 'DaemonSet');
  assert.ok(ds, 'no DaemonSet');
  return ds;
}

describe('deploy/kubernetes', () => {
  for (const dir of DIRS) {
    test(`${dir} renders to complete objects that the Kubernetes schemas accept`, async (t) => {
      if (!needTools(t, 'kubectl')) return;
      const objs = render(dir);
      assert.ok(objs.length >= 2, `${dir}: ${objs.length} objects`);
      for (const o of objs) {
        const what = `${dir}: ${String(o.kind)} ${String((o.metadata as Obj | undefined)?.name)}`;
        await validateModel(o).catch((e: Error) => assert.fail(`${what}: ${e.message}`));
        assert.deepEqual(unknownFields(o, typeOf(o), String(o.kind)), [], `${what}: unknown fields`);
      }
      const agent = (
        (daemonSet(objs).spec as Obj).template as { spec: { containers: Obj[] } }
      ).spec.containers.find((c) => c.name === 'agent')!;
      // Every flag of the agent's command line is one the agent knows.
      const help = run(BIN, ['agent', '--help']).stdout + run(BIN, ['agent', '--help']).stderr;
      for (const arg of (agent.command as string[]).filter((a) => a.startsWith('--'))) {
        const flag = arg.split('=')[0]!;
        assert.ok(
          help.includes(`  ${flag} `) || help.includes(`  ${flag}\n`),
          `${dir}: the agent has no ${flag}`,
        );
      }
      // $(MANIFESTS) in the command resolves to a directory that is mounted into the agent.
      const env = new Map((agent.env as { name: string; value?: string }[]).map((e) => [e.name, e.value]));
      const manifests = env.get('MANIFESTS');
      assert.ok(manifests, `${dir}: MANIFESTS unset`);
      const mounts = (agent.volumeMounts as { mountPath: string }[]).map((m) => m.mountPath);
      assert.ok(
        mounts.some((m) => manifests === m || manifests.startsWith(`${m}/`)),
        `${dir}: ${manifests} is not under a volume mount (${mounts.join(', ')})`,
      );
      for (const cm of objs.filter((o) => o.kind === 'ConfigMap')) {
        for (const [name, text] of Object.entries((cm.data as Record<string, string>) ?? {})) {
          assert.deepEqual(loadManifestText(name, text).problems, [], `${dir}: ConfigMap manifest ${name}`);
        }
      }
    });
  }

  test('the checks catch a misspelt field and a wrong type', async (t) => {
    if (!needTools(t, 'kubectl')) return;
    const ds = daemonSet(render('base'));
    const typo = structuredClone(ds);
    ((typo.spec as Obj).template as { spec: { containers: Obj[] } }).spec.containers[0]!.imagee = 'x';
    assert.deepEqual(unknownFields(typo, 'V1DaemonSet', 'DaemonSet'), [
      'DaemonSet.spec.template.spec.containers[0].imagee',
    ]);
    const wrong = structuredClone(ds);
    ((wrong.spec as Obj).template as { spec: Obj }).spec.hostPID = 'yes';
    await assert.rejects(validateModel(wrong), /hostPID must be boolean/);
  });
});
