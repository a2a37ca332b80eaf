// A client of an exported file for the survival tests: writes seeded blocks at
// random offsets, fsyncs, reads them back, counts every error, until STOPFILE
// exists; then writes a model of what the file must hold (what it wrote over
// `initial`, a file with the starting content) and a JSON summary.
// usage: node survival-client.mjs PATH SIZE SEED STOPFILE OUT_MODEL OUT_JSON INITIAL
import {
  closeSync,
  existsSync,
  fsyncSync,
  openSync,
  readFileSync,
  readSync,
  writeFileSync,
  writeSync,
} from 'node:fs';

const [path, sizeArg, seedArg, stopFile, outModel, outJson, initial] = process.argv.slice(2);
const size = Number(sizeArg);
let state = Number(seedArg) >>> 0 || 1;
const rand = () => {
  // xorshift32: seeded, repeatable
  state ^= state << 13;
  state >>>= 0;
  state ^= state >>> 17;
  state ^= state << 5;
  state >>>= 0;
  return state / 0x100000000;
};

const model = readFileSync(initial);
const summary = { writes: 0, reads: 0, fsyncs: 0, errors: 0, messages: [], longestMs: 0 };
const fd = openSync(path, 'r+');
const back = Buffer.alloc(64 * 1024);
while (!existsSync(stopFile)) {
  const len = 4096 * (1 + Math.floor(rand() * 16));
  const off = Math.floor(rand() * ((size - len) / 4096)) * 4096;
  const data = Buffer.alloc(len);
  for (let i = 0; i < len; i += 4) data.writeUInt32LE((rand() * 0x100000000) >>> 0, i);
  const t0 = Date.now();
  try {
    writeSync(fd, data, 0, len, off);
    summary.writes++;
    data.copy(model, off);
    fsyncSync(fd);
    summary.fsyncs++;
    const n = readSync(fd, back, 0, len, off);
    summary.reads++;
    if (n !== len || !back.subarray(0, len).equals(data))
      throw new Error(`read back of ${len} at ${off} differs`);
  } catch (e) {
    summary.errors++;
    if (summary.messages.length < 20) summary.messages.push(String(e));
  }
  summary.longestMs = Math.max(summary.longestMs, Date.now() - t0);
}
closeSync(fd);
writeFileSync(outModel, model);
writeFileSync(outJson, JSON.stringify(summary));
