/** Old import path, kept so src/engine compiles until it imports './partition/index.js' (or uses the `partition` driver). */
export * from './partition/index.js';
