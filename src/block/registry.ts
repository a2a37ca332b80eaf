/** The drivers the native engine knows, by name. */
import { BlkError } from '../errors.js';
import type { BlockDriver } from './driver.js';
import { partitionFilter } from './filter/partition.js';
import { qcow2Format } from './format/qcow2/driver.js';
import { qedFormat } from './format/qed.js';
import { rawFormat } from './format/raw.js';
import { vdiFormat } from './format/vdi.js';
import { vhdxFormat } from './format/vhdx/driver.js';
import { vmdkFormat } from './format/vmdk/driver.js';
import { vpcFormat } from './format/vpc/driver.js';
import { fileProtocol } from './protocol/file.js';

const DRIVERS: ReadonlyMap<string, BlockDriver> = new Map([
  ['file', fileProtocol],
  ['raw', rawFormat],
  ['qcow2', qcow2Format],
  ['vhdx', vhdxFormat],
  ['partition', partitionFilter],
  ['vpc', vpcFormat],
  ['vdi', vdiFormat],
  ['qed', qedFormat],
  ['vmdk', vmdkFormat],
]);

/** The driver called `name`, or a NOT_SUPPORTED error. */
export function findDriver(name: string): BlockDriver {
  const d = DRIVERS.get(name);
  if (!d) throw new BlkError('NOT_SUPPORTED', `block driver '${name}' is not supported`);
  return d;
}

/** Names of every registered driver. */
export function driverNames(): string[] {
  return [...DRIVERS.keys()];
}
