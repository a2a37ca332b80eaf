/**
 * The I/O workloads of the benchmark (docs/benchmarks.md, "The rows"): one
 * row of the report each. Sizes: 1 MiB for sequential throughput, 4 KiB for IOPS.
 * Every workload on a qcow2 image (except the compressed ones, which have no
 * raw form) is followed by the same job on the raw twin exported as a `raw`
 * image: the raw row shows what the export path itself costs, without the
 * qcow2 layer.
 */

/** Which image a workload runs on (see images.ts). */
export type ImageKind = 'allocated' | 'compressed' | 'fresh' | 'overwrite';

export type Unit = 'MB/s' | 'IOPS';

/** The native read-only formats that have bench rows of their own (see FORMAT_VARIANTS). */
export type ReadOnlyFormat = 'vmdk' | 'vhdx' | 'vpc' | 'vdi' | 'qed';

/**
 * The format the exports present: the qcow2 of the pair, its raw twin, or
 * (format rows) a conversion of the raw twin to one of the read-only formats.
 */
export type ImageFormat = 'qcow2' | 'raw' | ReadOnlyFormat;

/** One image of a format row: how `qemu-img convert` makes it from the allocated raw twin. */
export interface FormatVariant {
  /** The id's middle part: `fmt-<name>-...`. */
  name: string;
  format: ReadOnlyFormat;
  /** `-o` options of qemu-img convert. */
  options: string;
  /** What the report's title says about the image. */
  label: string;
}

export interface Workload {
  /** Short id for --only and the JSON results. */
  id: string;
  /** The row's title in the report. */
  title: string;
  image: ImageKind;
  format: ImageFormat;
  /** The export must be writable. */
  writes: boolean;
  unit: Unit;
  /**
   * Cover the whole image once (each block exactly once, in random order for
   * random workloads), with the runtime as a cap, instead of looping for the
   * runtime. A looping run would measure something else after its first pass:
   * buffered reads would come from the kernel's page cache of the open FUSE
   * file instead of the server, and writes to a fresh image would overwrite.
   */
  onePass?: boolean;
  /** fio job options (besides file, runtime and output format, which fio.ts adds). */
  fio: string[];
  /** Format rows: the image converted from the allocated raw twin (format is its format). */
  variant?: FormatVariant;
}

/** fio opens the file with O_DIRECT: the plain file's same-cache-mode baseline is then the pre-read file, buffered. */
export function isDirect(w: Workload): boolean {
  return w.fio.includes('--direct=1');
}

const libaio = (depth: number): string[] => ['--ioengine=libaio', `--iodepth=${depth}`, '--direct=1'];

const QCOW2_WORKLOADS: readonly Omit<Workload, 'format'>[] = [
  {
    id: 'seq-read-buffered',
    title: 'seq read 1 MiB, buffered (one pass)',
    image: 'allocated',
    writes: false,
    onePass: true,
    unit: 'MB/s',
    fio: ['--rw=read', '--bs=1M', '--ioengine=psync', '--direct=0'],
  },
  {
    id: 'seq-read-direct',
    title: 'seq read 1 MiB, O_DIRECT',
    image: 'allocated',
    writes: false,
    unit: 'MB/s',
    fio: ['--rw=read', '--bs=1M', '--ioengine=psync', '--direct=1'],
  },
  {
    id: 'rand-read-qd1',
    title: 'rand read 4 KiB, QD1 (libaio, O_DIRECT)',
    image: 'allocated',
    writes: false,
    unit: 'IOPS',
    fio: ['--rw=randread', '--bs=4k', ...libaio(1)],
  },
  {
    id: 'rand-read-qd16',
    title: 'rand read 4 KiB, QD16 (libaio, O_DIRECT)',
    image: 'allocated',
    writes: false,
    unit: 'IOPS',
    fio: ['--rw=randread', '--bs=4k', ...libaio(16)],
  },
  {
    id: 'seq-read-compressed',
    title: 'seq read 1 MiB, buffered, zlib-compressed qcow2 (one pass)',
    image: 'compressed',
    writes: false,
    onePass: true,
    unit: 'MB/s',
    fio: ['--rw=read', '--bs=1M', '--ioengine=psync', '--direct=0'],
  },
  {
    id: 'rand-read-compressed',
    title: 'rand read 4 KiB, QD1, zlib-compressed qcow2',
    image: 'compressed',
    writes: false,
    unit: 'IOPS',
    fio: ['--rw=randread', '--bs=4k', ...libaio(1)],
  },
  {
    id: 'seq-write-fresh',
    title: 'seq write 1 MiB, buffered + fsync, fresh qcow2 (allocating, one pass)',
    image: 'fresh',
    writes: true,
    onePass: true,
    unit: 'MB/s',
    fio: ['--rw=write', '--bs=1M', '--ioengine=psync', '--direct=0', '--end_fsync=1'],
  },
  {
    id: 'rand-write-fresh',
    title: 'rand write 4 KiB, QD16, fresh qcow2 (allocating, one pass)',
    image: 'fresh',
    writes: true,
    onePass: true,
    unit: 'IOPS',
    fio: ['--rw=randwrite', '--bs=4k', ...libaio(16)],
  },
  {
    id: 'rand-write-overwrite',
    title: 'rand write 4 KiB, QD16, allocated qcow2 (overwriting)',
    image: 'overwrite',
    writes: true,
    unit: 'IOPS',
    fio: ['--rw=randwrite', '--bs=4k', ...libaio(16)],
  },
  {
    id: 'rand-rw-70-30',
    title: 'rand 70/30 read/write 4 KiB, QD16, allocated qcow2',
    image: 'overwrite',
    writes: true,
    unit: 'IOPS',
    fio: ['--rw=randrw', '--rwmixread=70', '--bs=4k', ...libaio(16)],
  },
];

/** The same job on the raw twin, exported as a raw image. */
function rawVariant(w: Omit<Workload, 'format'>): Workload {
  return {
    ...w,
    id: `${w.id}-raw`,
    title: `${w.title.replace(/,? ?(fresh|allocated) qcow2/, '')}, raw image`,
    format: 'raw',
  };
}

export const WORKLOADS: readonly Workload[] = QCOW2_WORKLOADS.flatMap((w) =>
  w.image === 'compressed'
    ? [{ ...w, format: 'qcow2' as const }]
    : [{ ...w, format: 'qcow2' as const }, rawVariant(w)],
);

/**
 * The read-only formats' images (docs/benchmarks.md, "Format rows"), each a
 * conversion of the allocated raw twin: every block holds data, so every
 * grain, block or cluster is allocated; streamOptimized vmdk compresses each
 * grain (random data does not shrink, the grains stay compressed on disk).
 * vpc with force_size keeps the virtual size exactly the raw twin's (without
 * it qemu-img rounds up to a CHS geometry).
 */
export const FORMAT_VARIANTS: readonly FormatVariant[] = [
  {
    name: 'vmdk-sparse',
    format: 'vmdk',
    options: 'subformat=monolithicSparse',
    label: 'vmdk monolithicSparse',
  },
  { name: 'vmdk-flat', format: 'vmdk', options: 'subformat=monolithicFlat', label: 'vmdk monolithicFlat' },
  {
    name: 'vmdk-stream',
    format: 'vmdk',
    options: 'subformat=streamOptimized',
    label: 'vmdk streamOptimized',
  },
  { name: 'vhdx', format: 'vhdx', options: 'subformat=dynamic', label: 'vhdx dynamic' },
  {
    name: 'vpc-dynamic',
    format: 'vpc',
    options: 'subformat=dynamic,force_size=on',
    label: 'vpc (vhd) dynamic',
  },
  { name: 'vpc-fixed', format: 'vpc', options: 'subformat=fixed,force_size=on', label: 'vpc (vhd) fixed' },
  { name: 'vdi-static', format: 'vdi', options: 'static=on', label: 'vdi static' },
  { name: 'vdi-dynamic', format: 'vdi', options: 'static=off', label: 'vdi dynamic' },
  { name: 'qed', format: 'qed', options: 'cluster_size=65536', label: 'qed 64 KiB clusters' },
];

/** The row pair every variant gets: the qcow2 rows' O_DIRECT sequential 1 MiB and random 4 KiB QD16 reads. */
function formatRows(v: FormatVariant): Workload[] {
  return [
    {
      id: `fmt-${v.name}-seq-read`,
      title: `seq read 1 MiB, O_DIRECT, ${v.label}`,
      image: 'allocated',
      format: v.format,
      variant: v,
      writes: false,
      unit: 'MB/s',
      fio: ['--rw=read', '--bs=1M', '--ioengine=psync', '--direct=1'],
    },
    {
      id: `fmt-${v.name}-rand-read-qd16`,
      title: `rand read 4 KiB, QD16 (libaio, O_DIRECT), ${v.label}`,
      image: 'allocated',
      format: v.format,
      variant: v,
      writes: false,
      unit: 'IOPS',
      fio: ['--rw=randread', '--bs=4k', ...libaio(16)],
    },
  ];
}

/** The format rows: opt-in (`--only fmt`, or an id or part of one); a run without --only leaves them out. */
export const FORMAT_WORKLOADS: readonly Workload[] = FORMAT_VARIANTS.flatMap(formatRows);
