{
  "targets": [
    {
      "target_name": "blkexport_fuse3",
      "sources": ["fuse3_file.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_FILE_OFFSET_BITS=64"],
      "libraries": ["-lfuse3", "-lpthread"],
      "include_dirs": ["/usr/include/fuse3"]
    }
  ]
}
