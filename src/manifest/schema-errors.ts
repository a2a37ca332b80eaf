/** Turns ajv's errors into one short message per problem, with the JSON pointer it is about. */
import type { ErrorObject } from 'ajv';
import { toPointer } from './position.js';

/** A schema problem: where (pointer, and whether the key or the value is at fault) and what. */
export interface SchemaProblem {
  pointer: string;
  at: 'key' | 'value';
  message: string;
}

/** Messages for the schema's patterns, which ajv would print as regular expressions. */
const PATTERN_MESSAGES: Readonly<Record<string, string>> = {
  '^/': 'must be an absolute path (starting with /)',
  '^[A-Za-z][A-Za-z0-9_.-]{0,30}$':
    "must be a node-name: a letter, then at most 30 letters, digits, '-', '.' or '_' (QEMU's rule: the qemu engine passes node-names to QEMU, which takes at most 31 characters)",
  '^[A-Za-z][A-Za-z0-9_.-]{0,25}$':
    "must be an export id: a letter, then at most 25 letters, digits, '-', '.' or '_' (the shorthand names its nodes <id>-file, <id>-fmt, <id>-part, and node-names are at most 31 characters, QEMU's limit)",
  '^[0-9]+[KMGTPE]?$':
    'must be a size: an integer with an optional binary suffix K, M, G, T, P or E (e.g. 64K, 20G)',
  '^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$':
    "must be a name of lowercase letters, digits, '-' and '.' (at most 63, starting and ending alphanumeric: the DNS-subdomain rule of Kubernetes object names, since manifests are often kept as Kubernetes objects)",
};

function describeValue(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  if (typeof v === 'string') return `string ${JSON.stringify(v)}`;
  if (typeof v === 'number') return Number.isInteger(v) ? `integer ${v}` : `number ${v}`;
  return `${typeof v} ${String(v)}`;
}

function typeName(t: unknown): string {
  const names: Record<string, string> = {
    object: 'a mapping',
    array: 'a list',
    string: 'a string',
    integer: 'an integer',
    number: 'a number',
    boolean: 'a boolean (true or false)',
    null: 'null',
  };
  const list = String(t)
    .split(',')
    .map((x) => names[x] ?? x);
  return list.join(' or ');
}

function lastSegment(pointer: string): string {
  const i = pointer.lastIndexOf('/');
  return pointer.slice(i + 1);
}

/** Options of FUSE exports only (named when an NBD export has one). */
const FUSE_ONLY: readonly string[] = ['mountpoint', 'create-mountpoint', 'growable', 'allow-other'];

/** True when `data`, at `pointer`, is an export that says type: nbd. */
function isNbdExport(pointer: string, data: unknown): boolean {
  return (
    /^\/spec\/exports\/[0-9]+$/.test(pointer) &&
    typeof data === 'object' &&
    data !== null &&
    (data as Record<string, unknown>).type === 'nbd'
  );
}

function messageOf(e: ErrorObject, data: unknown): SchemaProblem | undefined {
  const p = e.params as Record<string, unknown>;
  const here = e.instancePath;
  switch (e.keyword) {
    case 'additionalProperties': {
      const key = String(p.additionalProperty);
      const fuseOnly = isNbdExport(here, data) && FUSE_ONLY.includes(key);
      const message = fuseOnly
        ? `unknown field "${key}" (a FUSE export option: an NBD export has no mountpoint)`
        : `unknown field "${key}"`;
      return { pointer: `${here}${toPointer([key])}`, at: 'key', message };
    }
    case 'required': {
      const missing = String(p.missingProperty);
      let message = `missing required field "${missing}"`;
      if (isNbdExport(here, data) && missing === 'node-name') {
        message += ' (a long-form NBD export needs node-name; the shorthand needs image)';
      } else if (
        /^\/spec\/exports\/[0-9]+$/.test(here) &&
        (missing === 'node-name' || missing === 'mountpoint')
      ) {
        message += ' (a long-form export needs node-name and mountpoint; the shorthand needs image)';
      }
      return { pointer: here, at: 'value', message };
    }
    case 'type':
      return {
        pointer: here,
        at: 'value',
        message: `expected ${typeName(p.type)}, got ${describeValue(data)}`,
      };
    case 'enum': {
      const allowed = (p.allowedValues as unknown[]).map((v) => String(v)).join(', ');
      return {
        pointer: here,
        at: 'value',
        message: `must be one of ${allowed} (got ${describeValue(data)})`,
      };
    }
    case 'const':
      return {
        pointer: here,
        at: 'value',
        message: `${lastSegment(here)} must be ${JSON.stringify(p.allowedValue)} (got ${describeValue(data)})`,
      };
    case 'pattern':
      return {
        pointer: here,
        at: 'value',
        message: `${PATTERN_MESSAGES[String(p.pattern)] ?? `must match ${String(p.pattern)}`} (got ${describeValue(data)})`,
      };
    case 'discriminator':
      if (p.error === 'mapping') {
        return {
          pointer: `${here}/driver`,
          at: 'value',
          message: `unknown driver ${JSON.stringify(p.tagValue)}: must be one of file, raw, qcow2, vmdk, vhdx, vpc, vdi, qed`,
        };
      }
      return {
        pointer: `${here}/driver`,
        at: 'value',
        message: 'driver must be a string: file, raw, qcow2, vmdk, vhdx, vpc, vdi or qed',
      };
    case 'minimum':
    case 'maximum':
      return {
        pointer: here,
        at: 'value',
        message: `must be ${p.comparison} ${p.limit} (got ${describeValue(data)})`,
      };
    case 'minItems':
      return { pointer: here, at: 'value', message: `must have at least ${p.limit} item(s)` };
    case 'minLength':
      return { pointer: here, at: 'value', message: 'must not be empty' };
    case 'uniqueItems':
      return { pointer: `${here}/${p.i}`, at: 'value', message: `duplicate item (same as item ${p.j})` };
    // if/then/else and oneOf only repeat what their branches already said.
    case 'if':
    case 'oneOf':
    case 'anyOf':
      return undefined;
    default:
      return { pointer: here, at: 'value', message: e.message ?? e.keyword };
  }
}

function valueAt(root: unknown, pointer: string): unknown {
  let v = root;
  for (const seg of pointer.split('/').slice(1)) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<string, unknown>)[seg.replaceAll('~1', '/').replaceAll('~0', '~')];
  }
  return v;
}

/** One problem per distinct fault, in document order of the errors ajv reported. */
export function schemaProblems(errors: readonly ErrorObject[], data: unknown): SchemaProblem[] {
  const requiredAt = new Set(
    errors
      .filter((e) => e.keyword === 'required')
      .map((e) => `${e.instancePath}|${String(e.params.missingProperty)}`),
  );
  const out: SchemaProblem[] = [];
  const seen = new Set<string>();
  for (const e of errors) {
    // A missing driver is reported once, as a missing field.
    if (
      e.keyword === 'discriminator' &&
      e.params.error === 'tag' &&
      requiredAt.has(`${e.instancePath}|driver`)
    ) {
      continue;
    }
    const problem = messageOf(e, valueAt(data, e.instancePath));
    if (!problem) continue;
    // A wrong type is reported once per value, by the outermost schema (integer | string for sizes).
    const key = e.keyword === 'type' ? `${problem.pointer}|type` : `${problem.pointer}|${problem.message}`;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push(problem);
  }
  return out;
}
