/**
 * The options that choose what a one-shot export shows of an image, shared
 * by `blkexport mount` and `blkexport nbd`: one partition, an internal
 * snapshot, a throwaway overlay. Checked here so both commands refuse the
 * same combinations with the same words.
 */
import { resolve } from 'node:path';
import { defaultOneShotOverlayDir } from '../engine/overlays.js';
import { BlkError } from '../errors.js';

/** The parseArgs entries of the view options. */
export const VIEW_OPTIONS = {
  partition: { type: 'string' },
  snapshot: { type: 'string' },
  overlay: { type: 'boolean', default: false },
  'overlay-dir': { type: 'string' },
} as const;

/** The help lines of the view options. */
export const VIEW_USAGE = `  --partition N          export only partition N of the MBR or GPT table
  --snapshot NAME        qcow2: a read-only view of internal snapshot NAME (its id, else its name)
  --overlay              a writable view that never writes the image: writes go to a throwaway
                         qcow2 overlay, deleted when the export ends (however it ends); the image
                         is opened read-only and shared (QEMU's force-share), so it may be in use
                         by a running VM. Implies --writable
  --overlay-dir DIR      where the overlay file is made (default $TMPDIR, else /var/tmp); its name
                         is removed at once, its space is freed when the export ends
`;

export interface ViewOptions {
  partition?: number;
  snapshot?: string;
  overlay?: { dir: string };
}

/** Checks the view options (and how they combine with --writable) and returns them. */
export function parseViewOptions(values: {
  partition?: string | undefined;
  snapshot?: string | undefined;
  overlay?: boolean | undefined;
  'overlay-dir'?: string | undefined;
  writable?: boolean | undefined;
}): ViewOptions {
  const view: ViewOptions = {};
  if (values.partition !== undefined) {
    if (!/^[1-9][0-9]{0,3}$/.test(values.partition)) {
      throw new BlkError(
        'USAGE',
        `--partition takes a partition number (1, 2, ...), not '${values.partition}'`,
      );
    }
    view.partition = Number(values.partition);
  }
  if (values['overlay-dir'] !== undefined && !values.overlay)
    throw new BlkError('USAGE', '--overlay-dir needs --overlay');
  if (values.snapshot !== undefined && values.writable && !values.overlay)
    throw new BlkError('USAGE', '--snapshot shows an internal snapshot read-only: it cannot be --writable');
  if (values.snapshot !== undefined) view.snapshot = values.snapshot;
  if (values.overlay) view.overlay = { dir: resolve(values['overlay-dir'] ?? defaultOneShotOverlayDir()) };
  return view;
}
