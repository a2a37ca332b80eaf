/**
 * Refcount rebuild for a dirty lazy-refcount image opened writable: with lazy
 * refcounts the stored refcounts may lag behind the tables, so they are set
 * from the references (and COPIED fixed) before anything is allocated.
 */
import { checkImage } from './check.js';
import type { Qcow2State } from './state.js';

/** Rebuilds every refcount from the references the image's tables make. */
export async function rebuildRefcounts(s: Qcow2State): Promise<void> {
  await checkImage(s, 'all');
}
