// Worker threads do not inherit tsx's loader hooks on Node 20: register them, then run the TypeScript worker.
import { register } from 'tsx/esm/api';

register();
await import('./qcow2-worker.ts');
