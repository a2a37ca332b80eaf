/** Loads one manifest file: YAML (all documents), schema, expansion and per-document checks, every problem at once. */
import { readFileSync } from 'node:fs';
import { type Document, isMap, isScalar, LineCounter, parseAllDocuments, visit, type YAMLError } from 'yaml';
import { BlkError, type BlkErrorCode } from '../errors.js';
import { checkDocument } from './check.js';
import { type DocumentProblem, expandDocument, type RawDocument } from './expand.js';
import { positionOf } from './position.js';
import { validateManifestData } from './schema.js';
import { schemaProblems } from './schema-errors.js';
import type { ManifestDocument, ManifestFile, SourcePos } from './types.js';

/** yaml's messages end with " at line L, column C:" and a code frame; the position is reported separately. */
function yamlMessage(e: YAMLError): string {
  const first = e.message.split('\n')[0] ?? e.message;
  return first.replace(/ at line \d+, column \d+:?$/, '');
}

function syntaxProblem(file: string, text: string, e: YAMLError, lineCounter: LineCounter): BlkError {
  // yaml may point at the indentation before a badly indented token: point at the token.
  let offset = e.pos[0];
  while (text[offset] === ' ') offset++;
  // An unterminated quoted string is found at the end of the file: point at its opening quote.
  const quote = /^Missing closing (["'])quote/.exec(e.message)?.[1];
  if (quote !== undefined) {
    const open = text.lastIndexOf(quote, Math.max(0, e.pos[0] - 1));
    if (open >= 0) offset = open;
  }
  // An unclosed flow collection is found where the next block starts: point at its opening bracket.
  const close = /end with an? ([\]}])/.exec(e.message)?.[1];
  if (close !== undefined) {
    const open = close === ']' ? '[' : '{';
    for (let i = e.pos[0] - 1, depth = 0; i >= 0; i--) {
      if (text[i] === close) depth++;
      else if (text[i] === open && depth-- === 0) {
        offset = i;
        break;
      }
    }
  }
  const pos = lineCounter.linePos(offset);
  return new BlkError('MANIFEST_SYNTAX', yamlMessage(e), { file, line: pos.line, col: pos.col });
}

/** A conversion error (unresolved alias, too many aliases), located at the alias it names or the first one. */
function aliasProblem(file: string, doc: Document, e: unknown, lineCounter: LineCounter): BlkError {
  const message =
    (e instanceof Error ? e.message : String(e)).split('\n')[0] ?? 'cannot convert the document';
  const named = /: (.*)$/.exec(message)?.[1];
  let offset: number | undefined;
  visit(doc, {
    Alias(_, node) {
      if (offset === undefined || node.source === named) offset = node.range?.[0];
      if (node.source === named) return visit.BREAK;
      return undefined;
    },
  });
  const pos = lineCounter.linePos(offset ?? doc.range?.[0] ?? 0);
  return new BlkError('MANIFEST_SYNTAX', message, { file, line: pos.line, col: pos.col });
}

function isEmptyDocument(doc: Document): boolean {
  // A document of comments only parses as a null scalar.
  return doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null);
}

function sortByPosition(problems: BlkError[]): BlkError[] {
  return problems
    .map((p, i) => ({ p, i }))
    .sort((a, b) => {
      const la = a.p.place.line ?? 0;
      const lb = b.p.place.line ?? 0;
      if (la !== lb) return la - lb;
      const ca = a.p.place.col ?? 0;
      const cb = b.p.place.col ?? 0;
      return ca !== cb ? ca - cb : a.i - b.i;
    })
    .map(({ p }) => p);
}

/** Parses and validates manifest text; `file` names it in every problem. */
export function loadManifestText(file: string, text: string): ManifestFile {
  const lineCounter = new LineCounter();
  const problems: BlkError[] = [];
  const documents: ManifestDocument[] = [];
  const docs = parseAllDocuments(text, {
    lineCounter,
    uniqueKeys: true,
    prettyErrors: true,
    logLevel: 'error',
  });
  const list = Array.isArray(docs) ? docs : [];
  list.forEach((doc, index) => {
    if (doc.errors.length > 0) {
      for (const e of doc.errors) problems.push(syntaxProblem(file, text, e, lineCounter));
      return;
    }
    if (isEmptyDocument(doc)) return;
    const locate = (pointer: string, at: 'key' | 'value' = 'value'): SourcePos => {
      const { line, col } = positionOf(doc, lineCounter, pointer, at);
      return { file, line, col, path: pointer };
    };
    const toError = (code: BlkErrorCode, p: DocumentProblem): BlkError => {
      const pos = locate(p.pointer, p.at);
      return new BlkError(code, p.message, { file, line: pos.line, col: pos.col, path: p.pointer });
    };
    if (!isMap(doc.contents)) {
      const pos = locate('');
      problems.push(
        new BlkError(
          'MANIFEST_SCHEMA',
          'a manifest document must be a mapping (apiVersion, kind, metadata, spec)',
          {
            file,
            line: pos.line,
            col: pos.col,
            path: '',
          },
        ),
      );
      return;
    }
    let data: unknown;
    try {
      data = doc.toJS({ maxAliasCount: 100 });
    } catch (e) {
      // yaml finds an alias to an anchor set later (or an alias bomb) only when converting.
      problems.push(aliasProblem(file, doc, e, lineCounter));
      return;
    }
    const errors = validateManifestData(data);
    if (errors.length > 0) {
      for (const p of schemaProblems(errors, data)) problems.push(toError('MANIFEST_SCHEMA', p));
      return;
    }
    const expanded = expandDocument(data as RawDocument, file, index, locate);
    const semantic = [...expanded.problems, ...checkDocument(expanded.document)];
    for (const p of semantic) problems.push(toError('MANIFEST_SEMANTIC', p));
    if (semantic.length === 0) documents.push(expanded.document);
  });
  const sorted = sortByPosition(problems);
  return { file, valid: sorted.length === 0, documents, problems: sorted };
}

/** Reads and loads one manifest file; an unreadable file is one problem, never a throw. */
export function loadManifestFile(file: string): ManifestFile {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    return {
      file,
      valid: false,
      documents: [],
      problems: [
        new BlkError('MANIFEST_SYNTAX', `cannot read manifest: ${err.code ?? err.message}`, { file }),
      ],
    };
  }
  return loadManifestText(file, text);
}
