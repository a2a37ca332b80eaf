/** Manifest files as plain JSON, the `manifests` entries of `status -o json`, `validate -o json` and `plan -o json`. */
import type { ManifestFile } from './types.js';

/** One problem as JSON: where and what. */
export interface ProblemJson {
  file: string;
  line: number | null;
  col: number | null;
  message: string;
  /** JSON pointer inside the document ("" for the whole document). */
  path: string | null;
  code: string;
}

/** One manifest file as JSON. */
export interface ManifestJson {
  file: string;
  /** metadata.name of the first document (null when none validated). */
  name: string | null;
  /** metadata.name of every document that validated. */
  documents: string[];
  valid: boolean;
  errors: ProblemJson[];
}

/** The JSON record of one loaded manifest file. */
export function manifestToJson(f: ManifestFile): ManifestJson {
  return {
    file: f.file,
    name: f.documents[0]?.name ?? null,
    documents: f.documents.map((d) => d.name),
    valid: f.valid,
    errors: f.problems.map((p) => ({
      file: p.place.file ?? f.file,
      line: p.place.line ?? null,
      col: p.place.col ?? null,
      message: p.message,
      path: p.place.path ?? null,
      code: p.code,
    })),
  };
}
