/** The qcow2 format driver (read path in progress). */
import { BlkError } from '../../../errors.js';
import { defineDriver } from '../../driver.js';

export const qcow2Format = defineDriver<never>({
  name: 'qcow2',
  role: 'format',
  mutableOptions: [],
  async open(ctx) {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      'qcow2 images are not supported yet (the read path is being built)',
      {
        file: ctx.file?.filename,
      },
    );
  },
  length: () => 0,
  read: async () => {},
});
