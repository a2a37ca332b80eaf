{
  "targets": [
    {
      "target_name": "blkexport_fuse3",
      "sources": ["fuse3_ops.c", "fast_map.c", "napi_glue.c"],
      "cflags": [
        "-O2",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-fvisibility=hidden",
        "-D_FILE_OFFSET_BITS=64",
        "-D_GNU_SOURCE",
        "-DFUSE_USE_VERSION=312"
      ],
      "libraries": ["-lfuse3", "-lpthread"],
      "include_dirs": ["/usr/include/fuse3"]
    }
  ]
}
