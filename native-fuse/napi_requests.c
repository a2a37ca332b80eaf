/*
 * JavaScript's side of a request: call_js() runs on the JavaScript thread for
 * every request a worker queued (fuse3_ops.c) and calls
 * dispatch(op, req, a, b, c, d, e, buf); the reply functions answer a request
 * exactly once (blk_reply_* in fuse3_ops.c) and free it. OP_ENDED, queued by
 * the last worker out (fuse_loop.c), closes the descriptor and the fast map
 * before JavaScript hears of it, so later replies are dropped, never written.
 */
#include "napi_glue.h"

#include <errno.h>
#include <stdlib.h>

static void free_req(blk_req *r) {
  free(r->buf);
  free(r);
}

static void noop_finalize(napi_env env, void *data, void *hint) {}

/* Called on the JS thread for each queued request: dispatch(op, req, a, b, c, d, e, buf). */
void blk_call_js(napi_env env, napi_value js_cb, void *context, void *data) {
  blk_req *r = data;
  blk_fs *fs = context;
  if (env == NULL) { /* the function is being torn down */
    if (r->op != OP_ENDED) blk_reply_err(r, ENOTCONN);
    free_req(r);
    return;
  }
  napi_value argv[8], undef;
  napi_get_undefined(env, &undef);
  for (int i = 0; i < 8; i++) argv[i] = undef;
  napi_create_int32(env, r->op, &argv[0]);
  if (r->op == OP_ENDED) {
    free_req(r);
    /* No worker is left: the descriptor and the fast map can go. */
    blk_fs_ended(fs);
    napi_create_int32(env, fs->loop_errno, &argv[2]);
    napi_call_function(env, undef, js_cb, 8, argv, NULL);
    return;
  }
  napi_create_external(env, r, NULL, NULL, &argv[1]);
  switch (r->op) {
    case OP_SETATTR:
      napi_create_int32(env, r->flags, &argv[2]);
      napi_create_uint32(env, r->mode, &argv[3]);
      napi_create_uint32(env, r->uid, &argv[4]);
      napi_create_uint32(env, r->gid, &argv[5]);
      napi_create_double(env, (double)r->attr_size, &argv[6]);
      break;
    case OP_OPEN:
      napi_create_int32(env, r->flags, &argv[2]);
      break;
    case OP_READ:
    case OP_WRITE:
      napi_create_double(env, (double)r->size, &argv[2]);
      napi_create_double(env, (double)r->off, &argv[3]);
      napi_create_external_buffer(env, r->size, r->buf, noop_finalize, NULL, &argv[7]);
      break;
    case OP_LSEEK:
      napi_create_double(env, (double)r->off, &argv[2]);
      napi_create_int32(env, r->flags, &argv[3]);
      break;
    case OP_FALLOCATE:
      napi_create_int32(env, r->flags, &argv[2]);
      napi_create_double(env, (double)r->off, &argv[3]);
      napi_create_double(env, (double)r->size, &argv[4]);
      break;
    default:
      break;
  }
  napi_value result;
  if (napi_call_function(env, undef, js_cb, 8, argv, &result) != napi_ok) {
    /* The handler threw synchronously: answer EIO so the request never hangs. */
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    if (!r->answered) {
      r->answered = 1;
      blk_reply_err(r, EIO);
      free_req(r);
    }
  }
}

static blk_req *req_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "expected a request handle");
    return NULL;
  }
  blk_req *r = p;
  if (r->answered) {
    napi_throw_error(env, NULL, "request already answered");
    return NULL;
  }
  r->answered = 1;
  return r;
}

/* Reads `n` arguments into argv (missing ones are undefined); the first is a request, claimed for one answer. */
static blk_req *req_args(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  return req_arg(env, argv[0]);
}

/* reply_err(req, errno) */
napi_value blk_js_reply_err(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  blk_req *r = req_args(env, info, argv, 2);
  if (!r) return NULL;
  int32_t err = EIO;
  napi_get_value_int32(env, argv[1], &err);
  blk_reply_err(r, err);
  free_req(r);
  return NULL;
}

/* reply_attr(req, mode, uid, gid, size, blocks, timeoutSec) */
napi_value blk_js_reply_attr(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  blk_req *r = req_args(env, info, argv, 7);
  if (!r) return NULL;
  uint32_t mode = 0, uid = 0, gid = 0;
  double size = 0, blocks = 0, timeout = 1;
  napi_get_value_uint32(env, argv[1], &mode);
  napi_get_value_uint32(env, argv[2], &uid);
  napi_get_value_uint32(env, argv[3], &gid);
  napi_get_value_double(env, argv[4], &size);
  napi_get_value_double(env, argv[5], &blocks);
  napi_get_value_double(env, argv[6], &timeout);
  blk_reply_attr(r, mode, uid, gid, size < 0 ? 0 : (uint64_t)size, blocks < 0 ? 0 : (uint64_t)blocks, timeout);
  free_req(r);
  return NULL;
}

/* reply_open(req, directIo, keepCache, backingId): backingId > 0 opens the file in passthrough (passthrough.c) */
napi_value blk_js_reply_open(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  blk_req *r = req_args(env, info, argv, 4);
  if (!r) return NULL;
  bool direct = false, keep = false;
  int32_t backing = 0;
  napi_get_value_bool(env, argv[1], &direct);
  napi_get_value_bool(env, argv[2], &keep);
  napi_get_value_int32(env, argv[3], &backing);
  blk_reply_open(r, direct, keep, backing);
  free_req(r);
  return NULL;
}

/* The request and byte count of reply_data/reply_write(req, n); n is clamped to the request's size. */
static blk_req *req_and_count(napi_env env, napi_callback_info info, size_t *count) {
  napi_value argv[2];
  blk_req *r = req_args(env, info, argv, 2);
  if (!r) return NULL;
  double n = 0;
  napi_get_value_double(env, argv[1], &n);
  if (n < 0 || n > (double)r->size) n = (double)r->size;
  *count = (size_t)n;
  return r;
}

/* reply_data(req, n): sends the first n bytes of the read buffer. */
napi_value blk_js_reply_data(napi_env env, napi_callback_info info) {
  size_t n = 0;
  blk_req *r = req_and_count(env, info, &n);
  if (!r) return NULL;
  blk_reply_data(r, n);
  free_req(r);
  return NULL;
}

/* reply_write(req, n) */
napi_value blk_js_reply_write(napi_env env, napi_callback_info info) {
  size_t n = 0;
  blk_req *r = req_and_count(env, info, &n);
  if (!r) return NULL;
  blk_reply_write(r, n);
  free_req(r);
  return NULL;
}

/* reply_lseek(req, offset) */
napi_value blk_js_reply_lseek(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  blk_req *r = req_args(env, info, argv, 2);
  if (!r) return NULL;
  double off = 0;
  napi_get_value_double(env, argv[1], &off);
  blk_reply_lseek(r, off < 0 ? 0 : (uint64_t)off);
  free_req(r);
  return NULL;
}
