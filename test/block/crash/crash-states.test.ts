/** The crash-state generator (pure): epochs, image building, torn writes, guest expectations, sampling. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRandom } from '../../helpers/tools.js';
import {
  analyzeLog,
  buildImage,
  type CrashState,
  compareGuest,
  expectedAt,
  GuestModel,
  ImageBuilder,
  type LogEvent,
  latestPoint,
  overlappingConcurrentWrites,
  sampleStates,
  sectorPieces,
} from './crash-states.js';

const fill = (n: number, v: number) => Buffer.alloc(n, v);

/** A small log: write A, sync, write B (in flight with C), C, sync, write D (never synced). */
function sampleLog(): LogEvent[] {
  return [
    { kind: 'write', id: 0, offset: 0, data: fill(4, 1) }, // 0
    { kind: 'end', id: 0 },
    { kind: 'sync', id: 1 }, // 2
    { kind: 'end', id: 1 }, // 3
    { kind: 'write', id: 2, offset: 4, data: fill(4, 2) }, // 4
    { kind: 'write', id: 3, offset: 8, data: fill(1024, 3) }, // 5
    { kind: 'end', id: 2 },
    { kind: 'end', id: 3 },
    { kind: 'sync', id: 4 }, // 8
    { kind: 'end', id: 4 }, // 9
    { kind: 'write', id: 5, offset: 0, data: fill(2, 9) }, // 10
    { kind: 'end', id: 5 },
  ];
}

test('epochs: what is durable and what may be on disk at each sync point', () => {
  const a = analyzeLog(sampleLog());
  assert.equal(a.syncs, 2);
  assert.deepEqual(
    a.epochs.map((e) => [e.from, e.to, e.durable, e.volatile]),
    [
      [-1, 3, [], [0]],
      [3, 9, [0], [1, 2]],
      [9, 12, [0, 1, 2], [3]],
    ],
  );
});

test('a write in flight while a sync runs is not made durable by it', () => {
  const a = analyzeLog([
    { kind: 'write', id: 0, offset: 0, data: fill(1, 1) },
    { kind: 'sync', id: 1 },
    { kind: 'end', id: 0 },
    { kind: 'end', id: 1 },
  ]);
  assert.deepEqual(
    a.epochs.map((e) => [e.durable, e.volatile]),
    [
      [[], [0]],
      [[], [0]],
    ],
  );
});

test('images: durable ops plus the chosen ones in issue order; torn writes by sector', () => {
  const a = analyzeLog(sampleLog());
  const base = fill(16, 0xee);
  const st = (epoch: number, chosen: [number, true | boolean[]][]): CrashState => ({
    epoch,
    chosen: new Map(chosen),
    how: 'test',
  });
  assert.deepEqual(buildImage(base, a, st(0, [])), base);
  const e1 = buildImage(base, a, st(1, [[2, true]]));
  assert.equal(e1.length, 8 + 1024);
  assert.deepEqual(e1.subarray(0, 8), Buffer.from([1, 1, 1, 1, 0xee, 0xee, 0xee, 0xee]));
  assert.ok(e1.subarray(8).equals(fill(1024, 3)));
  // Torn: the write at 8 of 1024 bytes spans sectors [8,512) [512,1024) [1024,1032).
  assert.deepEqual(sectorPieces(8, 1024), [
    [0, 504],
    [504, 1016],
    [1016, 1024],
  ]);
  const torn = buildImage(base, a, st(1, [[2, [false, true, false]]]));
  assert.equal(torn.length, 1024);
  assert.ok(torn.subarray(8, 16).equals(base.subarray(8, 16)));
  assert.ok(torn.subarray(16, 512).equals(Buffer.alloc(496)));
  assert.ok(torn.subarray(512, 1024).equals(fill(512, 3)));
  // A later write wins over an earlier one at the same bytes.
  const last = buildImage(base, a, st(2, [[3, true]]));
  assert.deepEqual(last.subarray(0, 4), Buffer.from([9, 9, 1, 1]));
  // The reusing builder gives the same bytes.
  const b = new ImageBuilder(base, a);
  for (const s of [st(0, []), st(1, [[2, [true, false, true]]]), st(2, [[3, true]]), st(1, [])]) {
    assert.ok(b.build(s).equals(buildImage(base, a, s)));
  }
});

test('truncates shrink and grow the image; bytes grown back are zero', () => {
  const a = analyzeLog([
    { kind: 'truncate', id: 0, size: 2 },
    { kind: 'end', id: 0 },
    { kind: 'truncate', id: 1, size: 6 },
    { kind: 'end', id: 1 },
  ]);
  const img = buildImage(fill(4, 7), a, {
    epoch: 0,
    chosen: new Map([
      [0, true],
      [1, true],
    ]),
    how: '',
  });
  assert.deepEqual(img, Buffer.from([7, 7, 0, 0, 0, 0]));
});

test('guest expectations: flushed bytes are certain, later and discarded ones are not', () => {
  const g = (id: number, op: Extract<LogEvent, { kind: 'guest' }>['op']): LogEvent => ({
    kind: 'guest',
    id,
    op,
  });
  const events: LogEvent[] = [
    g(0, { op: 'write', offset: 0, data: fill(4, 1) }), // 0
    { kind: 'end', id: 0 },
    g(1, { op: 'discard', offset: 4, length: 2 }), // 2
    { kind: 'end', id: 1 },
    g(2, { op: 'flush' }), // 4
    { kind: 'end', id: 2 }, // 5
    g(3, { op: 'write', offset: 2, data: fill(4, 2) }), // 6
    { kind: 'end', id: 3 },
    g(4, { op: 'resize', size: 12 }), // 8
    { kind: 'end', id: 4 },
  ];
  const a = analyzeLog(events);
  const initial = fill(8, 5);
  const before = expectedAt(a, initial, 5);
  assert.equal(before.flushes, 0);
  assert.deepEqual(before.unknown, [[0, 6]]);
  const after = expectedAt(a, initial, 6);
  assert.equal(after.flushes, 1);
  assert.deepEqual(after.content, Buffer.from([1, 1, 1, 1, 5, 5, 5, 5]));
  assert.deepEqual(after.unknown, [[4, 6]]);
  const end = new GuestModel(a, initial).at(10);
  assert.deepEqual(end.unknown, [
    [2, 6],
    [8, 12],
  ]);
  assert.equal(end.sizeCertain, false);
  // What a guest may read: unknown bytes may be anything; certain ones must match.
  assert.equal(compareGuest(Buffer.from([1, 1, 1, 1, 9, 9, 5, 5]), after), undefined);
  assert.match(
    compareGuest(Buffer.from([1, 1, 1, 1, 0, 0, 0, 5]), after) ?? '',
    /guest byte 6 reads 0, expected 5/,
  );
  assert.equal(compareGuest(Buffer.from([1, 1, 9, 9, 9, 9, 5, 5, 0, 9, 0, 0]), end), undefined);
  assert.match(compareGuest(Buffer.alloc(4), after) ?? '', /virtual size/);
});

test('sampling: none, all and all-but-one at every epoch, seeded, without duplicates', () => {
  const a = analyzeLog(sampleLog());
  const states = sampleStates(a, seededRandom(1), { random: 30, torn: 0.5 });
  for (let k = 0; k < a.epochs.length; k++) {
    const mine = states.filter((s) => s.epoch === k);
    assert.ok(mine.some((s) => s.chosen.size === 0));
    assert.ok(mine.some((s) => s.chosen.size === a.epochs[k]!.volatile.length));
    assert.ok(latestPoint(a, mine[0]!) === a.epochs[k]!.to);
  }
  assert.ok(states.some((s) => s.how === 'all but op 1' || s.how === 'all but op 2'));
  assert.ok(
    states.some((s) => [...s.chosen.values()].some((m) => m !== true)),
    'some torn',
  );
  const again = sampleStates(a, seededRandom(1), { random: 30, torn: 0.5 });
  assert.deepEqual(
    again.map((s) => s.how),
    states.map((s) => s.how),
  );
  assert.equal(sampleStates(a, seededRandom(1), { random: 30, torn: 0.5, max: 3 }).length, 3);
});

test('concurrent writes over the same bytes are reported', () => {
  const a = analyzeLog([
    { kind: 'write', id: 0, offset: 0, data: fill(8, 1) },
    { kind: 'write', id: 1, offset: 4, data: fill(8, 2) },
    { kind: 'end', id: 0 },
    { kind: 'end', id: 1 },
    { kind: 'write', id: 2, offset: 0, data: fill(8, 1) },
    { kind: 'end', id: 2 },
  ]);
  assert.deepEqual(
    overlappingConcurrentWrites(a).map(([x, y]) => [x.index, y.index]),
    [[0, 1]],
  );
});
