{
  "targets": [
    {
      "target_name": "blkexport_native",
      "sources": ["blkexport_native.c", "fd_holder.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ]
}
