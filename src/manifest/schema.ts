/** The manifest JSON Schema (schema/manifest.schema.json), compiled once with ajv's draft 2020-12 build. */
import { readFileSync } from 'node:fs';
import { Ajv2020, type ErrorObject, type ValidateFunction } from 'ajv/dist/2020.js';

/** Path of the schema file: the same from src/manifest/ (tsx) and dist/manifest/ (built). */
export const SCHEMA_PATH = new URL('../../schema/manifest.schema.json', import.meta.url).pathname;

let compiled: ValidateFunction | undefined;

/** Returns the compiled validator; it fills defaults into the data it validates (useDefaults). */
export function manifestValidator(): ValidateFunction {
  if (!compiled) {
    const schema = JSON.parse(readFileSync(SCHEMA_PATH, 'utf8')) as object;
    // discriminator does not mix with unevaluatedProperties (ajv#1892): the
    // schema closes each branch with additionalProperties instead.
    const ajv = new Ajv2020({
      allErrors: true,
      strict: true,
      allowUnionTypes: true, // sizes (integer | "64K") and children (node-name | inline object)
      useDefaults: true,
      discriminator: true,
    });
    compiled = ajv.compile(schema);
  }
  return compiled;
}

/** Validates one document's data in place (defaults filled); returns ajv's errors, empty when valid. */
export function validateManifestData(data: unknown): ErrorObject[] {
  const validate = manifestValidator();
  return validate(data) ? [] : [...(validate.errors ?? [])];
}
