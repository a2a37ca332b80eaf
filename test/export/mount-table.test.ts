import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mountOwner, parseMountInfo, topMountAt } from '../../src/export/mount-table.js';

const INFO = [
  '22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw',
  '90 22 0:50 / /srv/img\\040a.qcow2 ro,nosuid,nodev,relatime shared:60 - fuse.blkexport blkexport:4242 ro,user_id=0,group_id=0,default_permissions,allow_other,max_read=131072',
  '91 22 0:51 / /srv/b.raw rw,relatime - fuse.blkexport blkexport-agent:7 rw,user_id=0',
  '92 91 0:52 / /srv/b.raw rw,relatime - fuse.blkexport blkexport-agent:8 rw,user_id=0',
  '93 22 0:53 / /srv/c.raw rw,relatime - fuse sshfs rw',
].join('\n');

test('mountinfo is parsed with octal escapes undone', () => {
  const e = parseMountInfo(INFO);
  assert.equal(e.length, 5);
  assert.equal(e[1]!.mountpoint, '/srv/img a.qcow2');
  assert.equal(e[1]!.fstype, 'fuse.blkexport');
  assert.equal(e[1]!.source, 'blkexport:4242');
});

test('our mounts are recognized with their owner; others are not', () => {
  const e = parseMountInfo(INFO);
  assert.deepEqual(mountOwner(e[1]!), { kind: 'mount', pid: 4242 });
  assert.deepEqual(mountOwner(e[2]!), { kind: 'agent', pid: 7 });
  assert.equal(mountOwner(e[4]!), undefined);
  assert.equal(mountOwner(e[0]!), undefined);
});

test('the topmost of stacked mounts wins', () => {
  const e = parseMountInfo(INFO);
  assert.equal(topMountAt(e, '/srv/b.raw')!.source, 'blkexport-agent:8');
  assert.equal(topMountAt(e, '/nope'), undefined);
});
