{
  "targets": [
    {
      "target_name": "blkexport_native",
      "sources": ["blkexport_native.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ]
}
