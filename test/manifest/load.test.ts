import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import {
  appliesToHost,
  checkCollisions,
  loadManifestDir,
  loadManifestFile,
  loadManifestText,
} from '../../src/manifest/index.js';
import { tempDir } from '../helpers/tools.js';

const HEAD = 'apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: NAME\nspec:\n';

function manifest(name: string, spec: string): string {
  return HEAD.replace('NAME', name) + spec;
}

test('long form: defaults filled, sizes as numbers, positions remembered', () => {
  const m = loadManifestText(
    'a.yaml',
    manifest(
      'a',
      `  blockdevs:
    - node-name: prot0
      driver: file
      filename: /img/a.raw
    - node-name: win0
      driver: raw
      file: prot0
      offset: 1M
      size: 64K
  exports:
    - type: fuse
      id: exp0
      node-name: win0
      mountpoint: /img/a.raw
`,
    ),
  );
  assert.deepEqual(m.problems, []);
  const doc = m.documents[0]!;
  assert.equal(doc.engine, undefined, "absent: the agent's --engine decides");
  assert.equal(doc.hosts, undefined);
  assert.deepEqual(
    doc.nodes.map((n) => n.options),
    [
      { 'node-name': 'prot0', driver: 'file', 'read-only': false, filename: '/img/a.raw', locking: 'auto' },
      { 'node-name': 'win0', driver: 'raw', 'read-only': false, file: 'prot0', offset: 1048576, size: 65536 },
    ],
  );
  assert.deepEqual(doc.nodes[1]!.source, { file: 'a.yaml', line: 10, col: 7, path: '/spec/blockdevs/1' });
  assert.deepEqual(doc.exports[0]!.options, {
    type: 'fuse',
    id: 'exp0',
    'node-name': 'win0',
    mountpoint: '/img/a.raw',
    'create-mountpoint': false,
    writable: false,
    growable: false,
    'allow-other': 'auto',
  });
  assert.equal(doc.exports[0]!.shorthand, false);
  assert.deepEqual(doc.exports[0]!.source, { file: 'a.yaml', line: 16, col: 7, path: '/spec/exports/0' });
});

test('inline children are named <parent>-file / <parent>-backing and listed before their parent', () => {
  const m = loadManifestFile(new URL('../fixtures/manifests/valid/inline.yaml', import.meta.url).pathname);
  assert.deepEqual(m.problems, []);
  const nodes = m.documents[0]!.nodes;
  assert.deepEqual(
    nodes.map((n) => [
      n.options['node-name'],
      n.options.driver,
      n.options.file,
      n.options.backing,
      n.generatedFor,
    ]),
    [
      ['top-file', 'file', undefined, undefined, 'inline file of top'],
      ['mid-file', 'file', undefined, undefined, 'inline file of mid'],
      ['mid-backing-file', 'file', undefined, undefined, 'inline file of mid-backing'],
      ['mid-backing', 'qcow2', 'mid-backing-file', null, 'inline backing of mid'],
      ['mid', 'qcow2', 'mid-file', 'mid-backing', undefined],
      ['top', 'qcow2', 'top-file', 'mid', undefined],
    ],
  );
});

test('shorthand expands to file + format nodes (+ a partition filter); format auto stays unresolved', () => {
  const m = loadManifestText(
    's.yaml',
    manifest(
      's',
      `  exports:
    - id: foo
      image: /srv/images/foo.qcow2
    - id: bar
      image: /srv/images/bar.img
      format: raw
      writable: true
      mountpoint: /srv/raw/bar
    - id: baz
      image: /srv/images/baz.qcow2
      format: qcow2
      partition: 2
`,
    ),
  );
  assert.deepEqual(m.problems, []);
  const doc = m.documents[0]!;
  const byName = new Map(doc.nodes.map((n) => [n.options['node-name'], n]));
  assert.deepEqual(
    doc.nodes.map((n) => n.options['node-name']),
    ['foo-file', 'foo-fmt', 'bar-file', 'bar-fmt', 'baz-file', 'baz-fmt', 'baz-part'],
  );
  assert.deepEqual(byName.get('foo-file')!.options, {
    'node-name': 'foo-file',
    driver: 'file',
    'read-only': true,
    filename: '/srv/images/foo.qcow2',
    locking: 'auto',
  });
  assert.deepEqual(byName.get('foo-fmt')!.options, {
    'node-name': 'foo-fmt',
    driver: 'auto',
    'read-only': true,
    file: 'foo-file',
    unresolved: ['driver'],
  });
  assert.equal(byName.get('foo-fmt')!.generatedFor, 'shorthand export foo');
  assert.deepEqual(byName.get('bar-fmt')!.options, {
    'node-name': 'bar-fmt',
    driver: 'raw',
    'read-only': false,
    file: 'bar-file',
    offset: 0,
  });
  assert.deepEqual(byName.get('baz-part')!.options, {
    'node-name': 'baz-part',
    driver: 'partition',
    'read-only': true,
    file: 'baz-fmt',
    number: 2,
  });
  const [foo, bar, baz] = doc.exports;
  assert.equal(foo!.shorthand, true);
  assert.deepEqual(foo!.options, {
    type: 'fuse',
    id: 'foo',
    'node-name': 'foo-fmt',
    mountpoint: '/srv/images/foo.qcow2',
    'create-mountpoint': false,
    writable: false,
    growable: false,
    'allow-other': 'auto',
    image: '/srv/images/foo.qcow2',
    format: 'auto',
  });
  assert.equal(bar!.options.type === 'fuse' && bar!.options.mountpoint, '/srv/raw/bar');
  assert.equal(bar!.options.writable, true);
  assert.equal(baz!.options['node-name'], 'baz-part');
  assert.equal(baz!.options.partition, 2);
});

test('the shorthand and the long form it stands for give the same graph', () => {
  const short = loadManifestText(
    's.yaml',
    manifest('s', '  exports:\n    - { id: foo, image: /srv/foo.qcow2, format: qcow2, writable: true }\n'),
  );
  const long = loadManifestText(
    'l.yaml',
    manifest(
      'l',
      `  blockdevs:
    - { node-name: foo-file, driver: file, filename: /srv/foo.qcow2 }
    - { node-name: foo-fmt, driver: qcow2, file: foo-file }
  exports:
    - { type: fuse, id: foo, node-name: foo-fmt, mountpoint: /srv/foo.qcow2, writable: true }
`,
    ),
  );
  assert.deepEqual(
    short.documents[0]!.nodes.map((n) => n.options),
    long.documents[0]!.nodes.map((n) => n.options),
  );
  const { image, format, ...rest } = short.documents[0]!.exports[0]!.options;
  assert.deepEqual(rest, long.documents[0]!.exports[0]!.options);
  assert.deepEqual([image, format], ['/srv/foo.qcow2', 'qcow2']);
});

test('a partition blockdev in long form is the graph the shorthand partition: expands to', () => {
  const short = loadManifestText(
    's.yaml',
    manifest('s', '  exports:\n    - { id: foo, image: /srv/foo.qcow2, format: qcow2, partition: 5 }\n'),
  );
  const long = loadManifestText(
    'l.yaml',
    manifest(
      'l',
      `  blockdevs:
    - { node-name: foo-file, driver: file, filename: /srv/foo.qcow2, read-only: true }
    - { node-name: foo-fmt, driver: qcow2, file: foo-file, read-only: true }
    - { node-name: foo-part, driver: partition, file: foo-fmt, number: 5, read-only: true }
  exports:
    - { type: fuse, id: foo, node-name: foo-part, mountpoint: /srv/foo.qcow2 }
`,
    ),
  );
  assert.equal(long.valid, true, long.problems.map((p) => p.format()).join('\n'));
  assert.deepEqual(
    short.documents[0]!.nodes.map((n) => n.options),
    long.documents[0]!.nodes.map((n) => n.options),
  );
  const noNumber = loadManifestText(
    'n.yaml',
    manifest(
      'n',
      '  blockdevs:\n    - { node-name: p, driver: partition, file: { driver: file, filename: /x } }\n',
    ),
  );
  assert.equal(noNumber.valid, false);
  assert.match(noNumber.problems[0]!.format(), /number/);
});

test('all problems of a file at once, across documents, in position order', () => {
  const text = `${manifest('a', '  engine: fast\n  exports:\n    - { id: x, image: rel }\n')}---\n${manifest('b', '  bogus: 1\n')}`;
  const m = loadManifestText('m.yaml', text);
  assert.equal(m.valid, false);
  assert.deepEqual(
    m.problems.map((p) => `${p.place.line}:${p.place.col} ${p.code}`),
    ['6:11 MANIFEST_SCHEMA', '8:23 MANIFEST_SCHEMA', '15:3 MANIFEST_SCHEMA'],
  );
  assert.deepEqual(
    m.problems.map((p) => p.place.path),
    ['/spec/engine', '/spec/exports/0/image', '/spec/bogus'],
  );
});

test('empty and comment-only files are valid and declare nothing; unreadable files are one problem', (t) => {
  assert.deepEqual(loadManifestText('e.yaml', ''), {
    file: 'e.yaml',
    valid: true,
    documents: [],
    problems: [],
  });
  assert.equal(loadManifestText('c.yaml', '# nothing yet\n').valid, true);
  const dir = tempDir(t);
  const missing = loadManifestFile(join(dir, 'nope.yaml'));
  assert.equal(missing.valid, false);
  assert.match(missing.problems[0]!.format(), /nope\.yaml: cannot read manifest: ENOENT$/);
});

test('hosts: a document applies to listed hosts only; no hosts means everywhere', () => {
  assert.equal(appliesToHost({}, 'hv-01'), true);
  assert.equal(appliesToHost({ hosts: ['hv-01', 'hv-02'] }, 'hv-02'), true);
  assert.equal(appliesToHost({ hosts: ['hv-01'] }, 'hv-03'), false);
});

test('collisions: the manifest that sorts later is refused as a whole, the earlier stays valid', (t) => {
  const dir = tempDir(t);
  const a = manifest('a', '  exports:\n    - { id: foo, image: /srv/foo.qcow2 }\n');
  const b = manifest(
    'b',
    '  exports:\n    - { id: foo, image: /srv/other.qcow2 }\n    - { id: ok, image: /srv/ok.qcow2 }\n',
  );
  writeFileSync(join(dir, '10-a.yaml'), a);
  writeFileSync(join(dir, '20-b.yaml'), b);
  writeFileSync(join(dir, '.hidden.yaml'), b);
  writeFileSync(join(dir, 'notes.txt'), 'not a manifest');
  const files = loadManifestDir(dir);
  assert.deepEqual(
    files.map((f) => [f.file.slice(dir.length + 1), f.valid]),
    [
      ['10-a.yaml', true],
      ['20-b.yaml', false],
    ],
  );
  const msgs = files[1]!.problems.map((p) => p.format());
  // Once for the id, not again for the generated node-names; the other export is fine.
  assert.equal(msgs.length, 1, msgs.join('\n'));
  assert.match(
    msgs[0]!,
    /20-b\.yaml:7:7: export id "foo" is already used by manifest "a" at .*10-a\.yaml:7:7/,
  );
  assert.match(msgs[0]!, /refused as a whole \(at \/spec\/exports\/0\)$/);
  // The documents stay attached for status, but the file does not count.
  assert.equal(files[1]!.documents.length, 1);
});

test('collisions: only documents for the same host collide; with a hostname, others are ignored', () => {
  const a = loadManifestText(
    'a.yaml',
    manifest('a', '  hosts: [hv-01]\n  exports:\n    - { id: foo, image: /srv/a }\n'),
  );
  const b = loadManifestText(
    'b.yaml',
    manifest('a', '  hosts: [hv-02]\n  exports:\n    - { id: foo, image: /srv/a }\n'),
  );
  const c = loadManifestText('c.yaml', manifest('c', '  exports:\n    - { id: foo, image: /srv/c }\n'));
  assert.deepEqual(
    checkCollisions([a, b]).map((f) => f.valid),
    [true, true],
  );
  assert.deepEqual(
    checkCollisions([a, b, c]).map((f) => f.valid),
    [true, true, false],
  );
  // On hv-03 neither a nor b applies, so c is fine there.
  assert.deepEqual(
    checkCollisions([a, b, c], { hostname: 'hv-03' }).map((f) => f.valid),
    [true, true, true],
  );
  // Inputs are not changed.
  assert.equal(c.valid, true);
  assert.deepEqual(c.problems, []);
});

test('a metadata.name used twice on a host is a collision too', () => {
  const a = loadManifestText('a.yaml', manifest('same', '  exports: []\n'));
  const b = loadManifestText('b.yaml', manifest('same', '  exports: []\n'));
  const [, rb] = checkCollisions([a, b]);
  assert.equal(rb!.valid, false);
  assert.match(rb!.problems[0]!.message, /manifest name "same" is already used by manifest "same"/);
});

test('name rules say why they exist: Kubernetes object names, QEMU node-name length', () => {
  const m = loadManifestText(
    'why.yaml',
    manifest(
      'Guest-Disks',
      `  exports:
    - id: a-very-long-export-id-of-27c
      image: /srv/images/foo.qcow2
`,
    ),
  );
  const messages = m.problems.map((p) => p.message);
  assert.equal(messages.length, 2, messages.join('\n'));
  assert.match(messages.find((s) => s.includes('Guest-Disks')) ?? '', /lowercase.*Kubernetes object names/);
  assert.match(
    messages.find((s) => s.includes('a-very-long')) ?? '',
    /at most 25 .*<id>-file.*31 characters, QEMU's limit/,
  );
});
