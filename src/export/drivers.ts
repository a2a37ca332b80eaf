/** The export types this version serves, by manifest `type`. */
import type { ExportDriver } from './driver.js';
import { fuseExportDriver } from './fuse/driver.js';
import { nbdExportDriver } from './nbd/driver.js';

const EXPORT_DRIVERS: ReadonlyMap<string, ExportDriver> = new Map([
  ['fuse', fuseExportDriver as unknown as ExportDriver],
  ['nbd', nbdExportDriver as unknown as ExportDriver],
]);

/** The export driver of `type`, if this version has one. */
export function findExportDriver(type: string): ExportDriver | undefined {
  return EXPORT_DRIVERS.get(type);
}
