/*
 * An example deepport plugin written in C: "device" memory is host memory,
 * and four ops are implemented (add, silu_mul, rms_norm, embedding, for
 * f32 and bf16 tensors). Every other op is NULL, i.e. NotSupported.
 *
 * It is the worked example of docs/porting.md; `cargo build --release`
 * builds it into target/release/libdeepport_example_plugin.so, and
 * `deepport run --plugin target/release/libdeepport_example_plugin.so`
 * judges it.
 */
#include "deepport_plugin.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char g_err[512];

static dp_status fail(dp_status s, const char *msg) {
  snprintf(g_err, sizeof g_err, "%s", msg);
  return s;
}

static const char *ex_last_error(void *ctx) {
  (void)ctx;
  return g_err[0] ? g_err : NULL;
}

/* ---- devices and contexts ------------------------------------------------ */

typedef struct ctx_t {
  int device;
  void *stream; /* set_stream (ABI 1.1): remembered only */
} ctx_t;

static int32_t ex_device_count(void) { return 1; }

static dp_status ex_create(int32_t device, void **out) {
  if (device != 0 && device != -1)
    return fail(DP_INVALID_ARGUMENT, "the example plugin has one device (index 0)");
  ctx_t *c = calloc(1, sizeof *c);
  if (!c) return fail(DP_OUT_OF_MEMORY, "out of host memory");
  *out = c;
  return DP_OK;
}

static void ex_destroy(void *ctx) { free(ctx); }
static const char *ex_device_name(void *ctx) { (void)ctx; return "host memory (example plugin)"; }
static const char *ex_driver(void *ctx) { (void)ctx; return "example-plugin 1.0"; }

/* ---- memory: a handle is a malloc'd block ---------------------------------- */

static dp_status ex_alloc(void *ctx, uint64_t nbytes, void **handle) {
  (void)ctx;
  void *p = malloc(nbytes ? (size_t)nbytes : 1);
  if (!p) return fail(DP_OUT_OF_MEMORY, "malloc failed");
  *handle = p;
  return DP_OK;
}

static void ex_release(void *ctx, void *handle) { (void)ctx; free(handle); }

static dp_status ex_upload(void *ctx, void *h, uint64_t off, const void *src, uint64_t n) {
  (void)ctx;
  memcpy((char *)h + off, src, (size_t)n);
  return DP_OK;
}

static dp_status ex_download(void *ctx, void *h, uint64_t off, void *dst, uint64_t n) {
  (void)ctx;
  memcpy(dst, (const char *)h + off, (size_t)n);
  return DP_OK;
}

static dp_status ex_synchronize(void *ctx) { (void)ctx; return DP_OK; }

/* ---- element access ------------------------------------------------------ */

static void *data(const dp_tensor *t) { return (char *)t->handle + t->offset_bytes; }

static size_t numel(const dp_tensor *t) {
  size_t n = 1;
  for (uint32_t i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
  return n;
}

static double load(const dp_tensor *t, size_t i) {
  if (t->dtype == DP_F32) return ((const float *)data(t))[i];
  /* bf16: the high half of an f32 */
  uint32_t bits = (uint32_t)((const uint16_t *)data(t))[i] << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* double -> bf16 with one rounding (to nearest even): round to f32 toward
 * zero with a sticky bit ("round to odd"), then f32 -> bf16 to nearest even. */
static uint16_t to_bf16(double d) {
  float f = (float)d;
  uint32_t b;
  memcpy(&b, &f, 4);
  if (isnan(f)) return (uint16_t)((b >> 16) | 0x40);
  if (!isinf(f) && (double)f != d) {
    if (fabs((double)f) > fabs(d)) b -= 1; /* toward zero */
    b |= 1;                                 /* sticky */
  }
  uint32_t lsb = (b >> 16) & 1;
  b += 0x7fff + lsb;
  return (uint16_t)(b >> 16);
}

static void store(const dp_tensor *t, size_t i, double v) {
  if (t->dtype == DP_F32)
    ((float *)data(t))[i] = (float)v;
  else
    ((uint16_t *)data(t))[i] = to_bf16(v);
}

static int is_float_ok(dp_dtype d) { return d == DP_F32 || d == DP_BF16; }

static int32_t ex_supports(void *ctx, const char *op, const dp_dtype *dt, uint32_t n) {
  (void)ctx;
  if (!strcmp(op, "add") || !strcmp(op, "silu_mul") || !strcmp(op, "rms_norm")) {
    for (uint32_t i = 0; i < n; i++)
      if (!is_float_ok(dt[i])) return 0;
    return 1;
  }
  if (!strcmp(op, "embedding"))
    return n == 3 && is_float_ok(dt[0]) && (dt[1] == DP_I32 || dt[1] == DP_I64) &&
           is_float_ok(dt[2]);
  return 0;
}

static dp_status check_floats(const dp_tensor *t, uint32_t n, const char *op) {
  for (uint32_t i = 0; i < n; i++)
    if (!is_float_ok(t[i].dtype)) {
      snprintf(g_err, sizeof g_err, "%s: the example plugin has f32 and bf16 only", op);
      return DP_NOT_SUPPORTED;
    }
  return DP_OK;
}

/* ---- ops ------------------------------------------------------------------ */

static dp_status ex_add(void *ctx, const dp_tensor *t, uint32_t nt, const dp_param *p,
                        uint32_t np) {
  (void)ctx; (void)p; (void)np;
  if (nt != 3) return fail(DP_INVALID_ARGUMENT, "add: expected 3 tensors");
  dp_status s = check_floats(t, 3, "add");
  if (s) return s;
  size_t n = numel(&t[0]);
  for (size_t i = 0; i < n; i++) store(&t[2], i, load(&t[0], i) + load(&t[1], i));
  return DP_OK;
}

static dp_status ex_silu_mul(void *ctx, const dp_tensor *t, uint32_t nt, const dp_param *p,
                             uint32_t np) {
  (void)ctx; (void)p; (void)np;
  if (nt != 3) return fail(DP_INVALID_ARGUMENT, "silu_mul: expected 3 tensors");
  dp_status s = check_floats(t, 3, "silu_mul");
  if (s) return s;
  size_t n = numel(&t[0]);
  for (size_t i = 0; i < n; i++) {
    double g = load(&t[0], i);
    store(&t[2], i, g / (1.0 + exp(-g)) * load(&t[1], i));
  }
  return DP_OK;
}

static dp_status ex_rms_norm(void *ctx, const dp_tensor *t, uint32_t nt, const dp_param *p,
                             uint32_t np) {
  (void)ctx;
  if (nt != 3) return fail(DP_INVALID_ARGUMENT, "rms_norm: expected 3 tensors");
  dp_status s = check_floats(t, 3, "rms_norm");
  if (s) return s;
  double eps = 1e-6;
  for (uint32_t i = 0; i < np; i++)
    if (!strcmp(p[i].name, "eps")) eps = p[i].value;
  size_t dim = (size_t)t[0].shape[t[0].ndim - 1];
  size_t rows = dim ? numel(&t[0]) / dim : 0;
  for (size_t r = 0; r < rows; r++) {
    double ss = 0;
    for (size_t j = 0; j < dim; j++) {
      double v = load(&t[0], r * dim + j);
      ss += v * v;
    }
    double inv = 1.0 / sqrt(ss / (double)dim + eps);
    for (size_t j = 0; j < dim; j++)
      store(&t[2], r * dim + j, load(&t[0], r * dim + j) * inv * load(&t[1], j));
  }
  return DP_OK;
}

static dp_status ex_embedding(void *ctx, const dp_tensor *t, uint32_t nt, const dp_param *p,
                              uint32_t np) {
  (void)ctx; (void)p; (void)np;
  if (nt != 3) return fail(DP_INVALID_ARGUMENT, "embedding: expected 3 tensors");
  if (!is_float_ok(t[0].dtype) || !is_float_ok(t[2].dtype))
    return fail(DP_NOT_SUPPORTED, "embedding: the example plugin has f32 and bf16 only");
  size_t vocab = (size_t)t[0].shape[0], dim = (size_t)t[0].shape[1];
  size_t tokens = (size_t)t[1].shape[0];
  /* Check every id before writing anything. */
  for (size_t k = 0; k < tokens; k++) {
    int64_t id = t[1].dtype == DP_I32 ? ((const int32_t *)data(&t[1]))[k]
                                      : ((const int64_t *)data(&t[1]))[k];
    if (id < 0 || (uint64_t)id >= vocab) {
      snprintf(g_err, sizeof g_err, "embedding: ids[%zu] = %lld is outside [0, %zu)", k,
               (long long)id, vocab);
      return DP_INDEX_OUT_OF_RANGE;
    }
  }
  for (size_t k = 0; k < tokens; k++) {
    int64_t id = t[1].dtype == DP_I32 ? ((const int32_t *)data(&t[1]))[k]
                                      : ((const int64_t *)data(&t[1]))[k];
    for (size_t j = 0; j < dim; j++)
      store(&t[2], k * dim + j, load(&t[0], (size_t)id * dim + j));
  }
  return DP_OK;
}

/* ---- the vtable ------------------------------------------------------------ */

static const dp_plugin_v1 VTABLE = {
    .abi_version = DEEPPORT_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(dp_plugin_v1),
    .name = "example-plugin",
    .vendor = "deepport example",
    .device_count = ex_device_count,
    .create = ex_create,
    .destroy = ex_destroy,
    .device_name = ex_device_name,
    .driver = ex_driver,
    .last_error = ex_last_error,
    .alloc = ex_alloc,
    .release = ex_release,
    .upload = ex_upload,
    .download = ex_download,
    .synchronize = ex_synchronize,
    .supports = ex_supports,
    .rms_norm = ex_rms_norm,
    .silu_mul = ex_silu_mul,
    .embedding = ex_embedding,
    .add = ex_add,
};

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
const dp_plugin_v1 *deepport_plugin_entry(uint32_t host_abi_version) {
  if (host_abi_version != DEEPPORT_PLUGIN_ABI_VERSION) return NULL;
  return &VTABLE;
}

/* ---- ABI 1.1 extensions -------------------------------------------------------
 * This plugin runs every op synchronously and reports errors at the call, so
 * it never has a deferred error; a plugin with asynchronous kernels records
 * what they find (e.g. a device status word) and returns it here, once.
 * Its "stream" is only remembered: work here is always in order. */

static dp_status ex_poll_error(void *ctx) {
  (void)ctx;
  return DP_OK;
}

static dp_status ex_set_stream(void *ctx, void *stream) {
  ((ctx_t *)ctx)->stream = stream;
  return DP_OK;
}

static const dp_plugin_ext EXTENSIONS = {
    .abi_minor = DEEPPORT_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(dp_plugin_ext),
    .poll_error = ex_poll_error,
    .set_stream = ex_set_stream,
};

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
const dp_plugin_ext *deepport_plugin_ext(uint32_t host_abi_minor) {
  (void)host_abi_minor; /* 1.1 fields only; an older host reads fewer */
  return &EXTENSIONS;
}
