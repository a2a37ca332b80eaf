/**
 * Which entries of a manifest directory are manifests (listManifestFiles):
 * regular files and symlinks to regular files (a ConfigMap's files) named
 * *.yaml / *.yml and not hidden, in sorted order; never a directory, a FIFO
 * or a dangling symlink, whatever its name. Real files in a temporary
 * directory.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { listManifestFiles } from '../../src/manifest/directory.js';
import { tempDir } from '../helpers/tools.js';

test('regular files and symlinks to them are listed, sorted; directories, FIFOs, dangling links and hidden files are not', (t) => {
  const dir = tempDir(t);
  mkdirSync(join(dir, '..2026_01'));
  writeFileSync(join(dir, '..2026_01', 'c.yaml'), 'x: 1\n');
  symlinkSync('..2026_01', join(dir, '..data'));
  symlinkSync('..data/c.yaml', join(dir, 'c.yaml')); // a ConfigMap's file
  writeFileSync(join(dir, 'b.yml'), 'x: 1\n');
  writeFileSync(join(dir, 'a.yaml'), 'x: 1\n');
  writeFileSync(join(dir, '.hidden.yaml'), 'x: 1\n');
  writeFileSync(join(dir, 'notes.txt'), 'x\n');
  mkdirSync(join(dir, 'dir.yaml'));
  symlinkSync('dir.yaml', join(dir, 'link-to-dir.yaml'));
  symlinkSync('missing.yaml', join(dir, 'dangling.yaml'));
  assert.equal(spawnSync('mkfifo', [join(dir, 'fifo.yaml')]).status, 0, 'mkfifo');
  assert.deepEqual(
    listManifestFiles(dir),
    ['a.yaml', 'b.yml', 'c.yaml'].map((n) => join(dir, n)),
  );
});
