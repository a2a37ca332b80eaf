import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { manifestValidator, SCHEMA_PATH } from '../../src/manifest/schema.js';
import { REPO } from '../helpers/tools.js';

interface SchemaNode {
  [k: string]: unknown;
}

test('the schema is draft 2020-12 and compiles under ajv strict mode', () => {
  const schema = JSON.parse(readFileSync(SCHEMA_PATH, 'utf8')) as SchemaNode;
  assert.equal(schema.$schema, 'https://json-schema.org/draft/2020-12/schema');
  assert.equal(typeof manifestValidator(), 'function');
});

test('every blockdev branch and export form is closed (additionalProperties: false, no unevaluatedProperties)', () => {
  const schema = JSON.parse(readFileSync(SCHEMA_PATH, 'utf8')) as { $defs: Record<string, SchemaNode> };
  const defs = schema.$defs;
  for (const name of [
    'fileBlockdev',
    'rawBlockdev',
    'qcow2Blockdev',
    'fuseExport',
    'shorthandExport',
    'metadata',
    'spec',
    'cache',
  ]) {
    assert.equal(defs[name]!.additionalProperties, false, name);
  }
  assert.doesNotMatch(readFileSync(SCHEMA_PATH, 'utf8'), /unevaluatedProperties/);
  assert.deepEqual(defs.blockdev!.discriminator, { propertyName: 'driver' });
  // Each branch names its driver, and lists node-name (optional inline, required at top level).
  for (const ref of defs.blockdev!.oneOf as { $ref: string }[]) {
    const branch = defs[ref.$ref.replace('#/$defs/', '')]!;
    const props = branch.properties as Record<string, SchemaNode>;
    assert.ok(props.driver?.const, ref.$ref);
    assert.ok(props['node-name'], ref.$ref);
  }
  assert.deepEqual(defs.namedBlockdev!.required, ['node-name']);
});

test('every example names the schema for editors on its first line', () => {
  const dir = join(REPO, 'manifests', 'examples');
  const names = readdirSync(dir).filter((n) => n.endsWith('.yaml'));
  assert.ok(names.length >= 4);
  for (const n of names) {
    const first = readFileSync(join(dir, n), 'utf8').split('\n')[0];
    assert.equal(first, '# yaml-language-server: $schema=../../schema/manifest.schema.json', n);
  }
});
