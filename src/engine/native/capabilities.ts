/**
 * What the native engine changes in place: each block driver's own
 * `mutableOptions` and each export driver's, as the drivers declare them.
 * For `driver: auto` only what every format a probe can choose changes.
 */
import { PROBED_FORMATS } from '../../block/probe.js';
import { driverNames, findDriver } from '../../block/registry.js';
import { findExportDriver } from '../../export/drivers.js';
import type { EngineCapabilities } from '../../reconcile/model.js';

function nodeMutable(driver: string): readonly string[] {
  if (driver === 'auto') {
    const each = PROBED_FORMATS.map(nodeMutable);
    return each[0]!.filter((o) => each.every((m) => m.includes(o)));
  }
  return driverNames().includes(driver) ? findDriver(driver).mutableOptions : [];
}

export const nativeCapabilities: EngineCapabilities = {
  engine: 'native',
  nodeMutable,
  exportMutable: (type) => findExportDriver(type)?.mutableOptions ?? [],
  reopenUnderOwnMount: true,
};
