/** The manifest layer: load, validate and expand YAML manifests. */
export { checkCollisions } from './collisions.js';
export { isManifestName, listManifestFiles, loadManifestDir, loadManifestPaths } from './directory.js';
export { shorthandNodeNames } from './expand.js';
export { appliesToHost, hostsOverlap } from './hosts.js';
export { loadManifestFile, loadManifestText } from './load.js';
export { type ManifestJson, manifestToJson, type ProblemJson } from './report.js';
export { SCHEMA_PATH } from './schema.js';
export { formatSize, MAX_SIZE, parseSize } from './size.js';
export type * from './types.js';
