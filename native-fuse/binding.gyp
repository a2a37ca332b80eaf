{
  "targets": [
    {
      "target_name": "blkexport_fuse3",
      "sources": ["fuse_loop.c", "fuse3_ops.c", "fast_map.c", "fast_write.c", "inflate.c", "fuse_mount.c", "napi_glue.c", "napi_handover.c", "napi_requests.c", "passthrough.c"],
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
      "libraries": ["-lfuse3", "-Wl,--exclude-libs,libz.a", "-Wl,-Bstatic", "-lz", "-Wl,-Bdynamic", "-lzstd", "-lpthread"],
      "include_dirs": ["/usr/include/fuse3"]
    }
  ]
}
