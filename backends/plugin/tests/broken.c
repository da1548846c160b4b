/* A tiny plugin with one defect per BROKEN_* macro (tests/bad_plugins.rs). */
#include "deepport_plugin.h"
#include <stdlib.h>
#include <string.h>

static int32_t count(void) {
#ifdef BROKEN_DEVICE_COUNT
  return -3;
#else
  return 1;
#endif
}
static dp_status create(int32_t d, void **ctx) {
  (void)d;
#ifdef BROKEN_NULL_CTX
  *ctx = NULL;
#else
  *ctx = malloc(1);
#endif
  return DP_OK;
}
static void destroy(void *ctx) { free(ctx); }
static const char *last_error(void *ctx) { (void)ctx; return "broken plugin message"; }
static dp_status alloc_(void *ctx, uint64_t n, void **h) {
  (void)ctx;
#ifdef BROKEN_NULL_HANDLE
  (void)n;
  *h = NULL;
#else
  *h = malloc(n ? n : 1);
#endif
  return DP_OK;
}
static void release(void *ctx, void *h) { (void)ctx; free(h); }
static dp_status upload(void *ctx, void *h, uint64_t off, const void *s, uint64_t n) {
  (void)ctx;
  memcpy((char *)h + off, s, n);
#ifdef BROKEN_UPLOAD_STATUS
  return -17;
#else
  return DP_OK;
#endif
}
static dp_status download(void *ctx, void *h, uint64_t off, void *d, uint64_t n) {
  (void)ctx;
  memcpy(d, (char *)h + off, n);
  return DP_OK;
}
static dp_status sync_(void *ctx) { (void)ctx; return DP_OK; }
static int32_t supports(void *ctx, const char *op, const dp_dtype *d, uint32_t n) {
  (void)ctx; (void)op; (void)d; (void)n;
#ifdef BROKEN_SUPPORTS
  return 7;
#else
  return 1;
#endif
}
static dp_status add(void *ctx, const dp_tensor *t, uint32_t nt, const dp_param *p, uint32_t np) {
  (void)ctx; (void)t; (void)nt; (void)p; (void)np;
#ifdef BROKEN_OP_STATUS
  return 42;
#else
  return DP_DEVICE_ERROR;
#endif
}

static const dp_plugin_v1 VT = {
#ifdef BROKEN_VERSION
    .abi_version = 99,
#else
    .abi_version = DEEPPORT_PLUGIN_ABI_VERSION,
#endif
#if defined(BROKEN_SIZE)
    .struct_size = 16,
#elif defined(BROKEN_OLD_TABLE)
    .struct_size = offsetof(dp_plugin_v1, add), /* built before `add` existed */
#else
    .struct_size = sizeof(dp_plugin_v1),
#endif
#ifdef BROKEN_NAME
    .name = "Bad Name!",
#else
    .name = "broken",
#endif
    .vendor = "test",
    .device_count = count,
    .create = create,
    .destroy = destroy,
    .last_error = last_error,
#ifndef BROKEN_NO_ALLOC
    .alloc = alloc_,
#endif
    .release = release,
    .upload = upload,
    .download = download,
    .synchronize = sync_,
    .supports = supports,
    .add = add,
};

#ifndef BROKEN_NO_ENTRY
const dp_plugin_v1 *deepport_plugin_entry(uint32_t v) {
#ifdef BROKEN_REFUSE
  (void)v;
  return NULL;
#else
  (void)v;
  return &VT;
#endif
}
#else
const dp_plugin_v1 *some_other_symbol(uint32_t v) { (void)v; return &VT; }
#endif

/* ABI 1.1 extensions: absent unless an EXT_* macro asks for them. */
#if defined(EXT_DEFERRED) || defined(EXT_GARBAGE) || defined(EXT_SIZE) || \
    defined(EXT_SHORT) || defined(EXT_NULL_TABLE) || defined(EXT_NULL_FUNCTIONS)
static int pending = 1;
static dp_status poll_error(void *ctx) {
  (void)ctx;
#ifdef EXT_GARBAGE
  return 77;
#else
  if (pending) {
    pending = 0;
    return DP_INDEX_OUT_OF_RANGE;
  }
  return DP_OK;
#endif
}
static dp_status set_stream(void *ctx, void *s) { (void)ctx; (void)s; return 99; }
static const dp_plugin_ext EXT = {
    .abi_minor = DEEPPORT_PLUGIN_ABI_MINOR,
#if defined(EXT_SIZE)
    .struct_size = 4,
#elif defined(EXT_SHORT)
    .struct_size = 8, /* a table of a minor version before 1.1: no functions */
#else
    .struct_size = sizeof(dp_plugin_ext),
#endif
#ifndef EXT_NULL_FUNCTIONS
    .poll_error = poll_error,
    .set_stream = set_stream,
#endif
};
const dp_plugin_ext *deepport_plugin_ext(uint32_t minor) {
  (void)minor;
#ifdef EXT_NULL_TABLE
  return NULL;
#else
  return &EXT;
#endif
}
#endif
