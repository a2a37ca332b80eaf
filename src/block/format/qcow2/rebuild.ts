/** Refcount rebuild for dirty lazy-refcount images (placeholder until references.ts lands). */
import type { Qcow2State } from './state.js';

/** Rebuilds every refcount from the references the image's tables make. */
export async function rebuildRefcounts(_s: Qcow2State): Promise<void> {}
