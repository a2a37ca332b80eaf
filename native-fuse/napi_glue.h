/*
 * What the N-API files share: napi_glue.c (the addon's exports), napi_requests.c
 * (a request's JavaScript side), napi_handover.c (connection() and adopt()),
 * passthrough.c (passthrough() and backingClose()).
 */
#ifndef BLKEXPORT_NAPI_GLUE_H
#define BLKEXPORT_NAPI_GLUE_H

#include "blk_fs.h"

#define NAPI_CALL(env, call)                                      \
  do {                                                            \
    if ((call) != napi_ok) {                                      \
      napi_throw_error((env), NULL, "N-API call failed: " #call); \
      return NULL;                                                \
    }                                                             \
  } while (0)

/* napi_glue.c: the threadsafe function carrying fs's requests to dispatch, then the workers; NULL or what failed. */
const char *blk_serve(napi_env env, blk_fs *fs, napi_value dispatch);
/* Frees a blk_fs that never served (its fast map included). */
void blk_free_fs(blk_fs *fs);
/* The mount handle's blk_fs, or NULL once the loop has ended (throws when v is no handle). */
blk_fs *blk_fs_arg(napi_env env, napi_value v);
/* The same, but throws ENOTCONN (unless it threw already) once the loop has ended. */
blk_fs *blk_live_fs_arg(napi_env env, napi_value v);

/* napi_handover.c */
napi_value blk_js_adopt(napi_env env, napi_callback_info info);
napi_value blk_js_connection(napi_env env, napi_callback_info info);

/* passthrough.c */
napi_value blk_js_passthrough(napi_env env, napi_callback_info info);
napi_value blk_js_backing_close(napi_env env, napi_callback_info info);

/* napi_requests.c: the threadsafe function's call_js: dispatch(op, req, a, b, c, d, e, buf) for each queued request. */
void blk_call_js(napi_env env, napi_value js_cb, void *context, void *data);

napi_value blk_js_reply_err(napi_env env, napi_callback_info info);
napi_value blk_js_reply_attr(napi_env env, napi_callback_info info);
napi_value blk_js_reply_open(napi_env env, napi_callback_info info);
napi_value blk_js_reply_data(napi_env env, napi_callback_info info);
napi_value blk_js_reply_write(napi_env env, napi_callback_info info);
napi_value blk_js_reply_lseek(napi_env env, napi_callback_info info);

#endif
