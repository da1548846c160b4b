/*
 * deepport_plugin.h — the C interface of an out-of-tree deepport backend.
 *
 * A vendor implements a deepport backend in C, C++, MUSA, CANN, SYCL, … as a
 * shared library that exports one symbol:
 *
 *     const dp_plugin_v1 *deepport_plugin_entry(uint32_t host_abi_version);
 *
 * The host (`deepport run --plugin libvendor.so`, or any program using the
 * deepport-plugin crate) calls it once with DEEPPORT_PLUGIN_ABI_VERSION and
 * receives a table of function pointers (the vtable). The host refuses a table
 * whose `abi_version` differs from its own or whose `struct_size` does not
 * reach the first op field, with a message naming both. Op fields are
 * appended as deepport gains ops: a table built before an op existed is
 * shorter, and the host treats the op fields beyond its `struct_size` as
 * NULL (NotSupported), never reading past it.
 *
 * Conventions
 * -----------
 * - Every function that can fail returns a dp_status. On failure the plugin
 *   should make a message available through `last_error` (per thread, valid
 *   until the next call of the plugin on that thread). Any value the host does
 *   not know is reported as a garbage status, never trusted.
 * - A NULL op pointer means the op is not supported: the host reports
 *   NotSupported for it without calling anything. A plugin may also return
 *   DP_NOT_SUPPORTED from an op (e.g. for a dtype it lacks), but then its
 *   `supports` answer must agree, or the conformance suite records a Fail.
 * - Memory: the host allocates every tensor through `alloc` (bytes, opaque
 *   handle), fills it with `upload`, reads it with `download`, and releases it
 *   with `release` exactly once. A handle is whatever the plugin wants it to be
 *   (a device pointer, an index); the host never dereferences it.
 * - Tensors reach ops as dp_tensor descriptors: the allocation handle, a
 *   byte offset into it (non-zero for views), dtype, shape and strides.
 *   Tensors are always dense row-major today (`strides` is NULL); a
 *   plugin that reads strides must accept NULL as "contiguous".
 * - The op functions receive the op's tensors in their declared order (the
 *   order `deepport op --help` lists them: inputs, then outputs). An absent
 *   optional tensor has `handle == NULL` and `ndim == 0`. Shapes and dtypes
 *   have been validated by the host against the op's declaration (SPEC.md)
 *   before the call: a plugin need not re-check them, but must bounds-check
 *   every index *value* it reads (token ids, block tables, expert ids) and
 *   return DP_INDEX_OUT_OF_RANGE instead of reading out of bounds.
 * - Scalar op parameters arrive as (name, value) pairs, every value a double:
 *   integers and booleans (0/1) are exact, choices are their index in the
 *   list given below. The parameters of each op:
 *       act_quant      scale_fmt (0 float, 1 ue8m0)
 *       rms_norm       eps
 *       rope           theta, yarn (0/1), yarn_factor,
 *                      yarn_original_max_position_embeddings, yarn_beta_fast,
 *                      yarn_beta_slow, yarn_mscale, yarn_mscale_all_dim,
 *                      layout (0 interleaved, 1 half)
 *       moe_gate       n_group, topk_group, topk, route_scale
 *       mla_decode     softmax_scale, causal (0/1)
 *       mla_prefill    softmax_scale, form (0 naive, 1 absorbed)
 *       copy_window    src_row, src_col, dst_row, dst_col, rows, cols
 *       get_dispatch_layout  num_experts, world_size
 *       indexer_topk   topk
 *       sparse_mla_decode  softmax_scale
 *       sparse_mla_prefill softmax_scale
 *       cache_quant    layout (0 index, 1 latent), ue8m0 (0/1)
 *   every other op has none.
 * - Ops may run asynchronously; `synchronize` waits for all submitted work
 *   and reports any error that surfaced since (see the Backend trait docs).
 *   ABI 1.1 adds `poll_error` (deferred errors reported at every download)
 *   and `set_stream` (ordering with an engine's stream): see dp_plugin_ext.
 * - Expert parallelism: the expert-parallel ops (dispatch, combine and their
 *   low-latency forms) are not in the table. The host runs them with core's
 *   protocol over four local ops of the table: gather_rows (pack and place
 *   rows), reduce_rows (the combines' weighted sums, in a fixed order),
 *   act_quant (FP8 payloads) and get_dispatch_layout. A plugin implementing
 *   those four gets all four expert-parallel ops, on any transport; without
 *   them they are NotSupported. gather_rows and reduce_rows receive views
 *   (a non-zero offset_bytes into a larger allocation).
 * - Threads: the host may call one context from several threads, but never
 *   concurrently with `destroy`. A plugin that is not thread-safe must lock.
 * - A plugin must not let a C++ exception or a Rust panic escape a call.
 */
#ifndef DEEPPORT_PLUGIN_H
#define DEEPPORT_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bump on every incompatible change of the structures below. */
#define DEEPPORT_PLUGIN_ABI_VERSION 1u

/* The name of the entry symbol. */
#define DEEPPORT_PLUGIN_ENTRY "deepport_plugin_entry"

/* Status codes. Anything else is a garbage status (an error of the plugin). */
typedef int32_t dp_status;
#define DP_OK 0
#define DP_NOT_SUPPORTED 1
#define DP_INVALID_ARGUMENT 2
#define DP_INDEX_OUT_OF_RANGE 3
#define DP_OUT_OF_MEMORY 4
#define DP_DEVICE_ERROR 5
#define DP_NON_FINITE 6

/* Element types (little-endian; SPEC.md §2). */
typedef int32_t dp_dtype;
#define DP_F32 0
#define DP_F16 1
#define DP_BF16 2
#define DP_F8E4M3 3     /* OCP E4M3FN */
#define DP_F8E4M3FNUZ 4 /* AMD E4M3FNUZ */
#define DP_F8E5M2 5
#define DP_E8M0 6 /* UE8M0 scale byte */
#define DP_I32 7
#define DP_I64 8
#define DP_U8 9
#define DP_BOOL 10

#define DP_MAX_DIMS 8

typedef struct dp_tensor {
  void *handle;          /* from alloc; NULL for an absent optional tensor */
  uint64_t offset_bytes; /* where this tensor's data starts in the allocation */
  dp_dtype dtype;
  uint32_t ndim;          /* 0..DP_MAX_DIMS */
  const int64_t *shape;   /* ndim entries */
  const int64_t *strides; /* in elements; NULL = dense row-major */
} dp_tensor;

typedef struct dp_param {
  const char *name; /* NUL-terminated, see the list above */
  double value;
} dp_param;

/* One op: the tensors in declared order and the op's parameters. */
typedef dp_status (*dp_op_fn)(void *ctx, const dp_tensor *tensors, uint32_t n_tensors,
                              const dp_param *params, uint32_t n_params);

typedef struct dp_plugin_v1 {
  uint32_t abi_version; /* DEEPPORT_PLUGIN_ABI_VERSION */
  uint32_t struct_size; /* sizeof(dp_plugin_v1) as the plugin was compiled */
  const char *name;     /* backend name: [a-z0-9_-]+, at most 64 bytes */
  const char *vendor;   /* for reports and waivers */

  /* Devices and contexts. */
  int32_t (*device_count)(void);                 /* >= 0 */
  dp_status (*create)(int32_t device, void **ctx); /* one context per device */
  void (*destroy)(void *ctx);
  /* Device and driver names of a context (NUL-terminated, live as long as ctx). */
  const char *(*device_name)(void *ctx);
  const char *(*driver)(void *ctx);
  /* The message of this thread's last failure, or NULL. ctx may be NULL
   * (failure of create). */
  const char *(*last_error)(void *ctx);

  /* Memory. */
  dp_status (*alloc)(void *ctx, uint64_t nbytes, void **handle);
  void (*release)(void *ctx, void *handle);
  dp_status (*upload)(void *ctx, void *handle, uint64_t offset, const void *src, uint64_t nbytes);
  dp_status (*download)(void *ctx, void *handle, uint64_t offset, void *dst, uint64_t nbytes);
  dp_status (*synchronize)(void *ctx);

  /* Optional (may be NULL: then an op is supported for every dtype its
   * declaration allows iff its pointer is non-NULL). Returns 1 when `op`
   * (canonical snake_case name) runs with these dtypes (in declared tensor
   * order, absent optional tensors left out), 0 when not. */
  int32_t (*supports)(void *ctx, const char *op, const dp_dtype *dtypes, uint32_t n_dtypes);

  /* The local ops, in deepport's catalogue order. NULL = NotSupported. */
  dp_op_fn act_quant;
  dp_op_fn weight_dequant;
  dp_op_fn fp8_gemm;
  dp_op_fn fp8_grouped_contiguous;
  dp_op_fn fp8_grouped_masked;
  dp_op_fn gemm;
  dp_op_fn gemm_grouped_contiguous;
  dp_op_fn gemm_grouped_masked;
  dp_op_fn mla_decode;
  dp_op_fn mla_prefill;
  dp_op_fn rms_norm;
  dp_op_fn rope;
  dp_op_fn moe_gate;
  dp_op_fn silu_mul;
  dp_op_fn embedding;
  dp_op_fn add;
  dp_op_fn copy_window;
  dp_op_fn gather_rows;
  dp_op_fn reduce_rows;
  dp_op_fn get_dispatch_layout;
  dp_op_fn indexer_logits;
  dp_op_fn indexer_topk;
  dp_op_fn sparse_mla_decode;
  dp_op_fn cache_quant;
  dp_op_fn sparse_mla_prefill;
} dp_plugin_v1;

/* The entry point a plugin exports. Returns NULL when it cannot serve a host
 * of `host_abi_version` (the host then reports a version mismatch). */
typedef const dp_plugin_v1 *(*dp_plugin_entry_fn)(uint32_t host_abi_version);

/* ---- ABI 1.1: optional extensions ----------------------------------------
 *
 * Minor versions add optional functions, in a second table returned by an
 * optional second symbol:
 *
 *     const dp_plugin_ext *deepport_plugin_ext(uint32_t host_abi_minor);
 *
 * A 1.0 plugin does not export it and loads as before, every extension
 * absent; a 1.0 host never looks for it. The host reads only the fields that
 * lie within the table's `struct_size` (a table from an older minor simply
 * lacks the newer functions), and a NULL function is "not supported". The
 * plugin may look at `host_abi_minor` (DEEPPORT_PLUGIN_ABI_MINOR of the host)
 * and return NULL to offer no extensions. Within major version 1,
 * dp_plugin_v1 only grows by op fields appended at its end.
 */
#define DEEPPORT_PLUGIN_ABI_MINOR 1u
#define DEEPPORT_PLUGIN_EXT_ENTRY "deepport_plugin_ext"

typedef struct dp_plugin_ext {
  uint32_t abi_minor;   /* DEEPPORT_PLUGIN_ABI_MINOR the plugin was built with */
  uint32_t struct_size; /* sizeof(dp_plugin_ext) as the plugin was compiled (>= 8) */

  /* 1.1: deferred errors. Non-blocking: DP_OK, or an error that surfaced on
   * the device since the last call (an index out of range found by a kernel,
   * a non-finite value, a fault), with its message through last_error. Each
   * error is reported once. The host calls it after every successful
   * download and synchronize, so an asynchronous plugin may return DP_OK
   * from an op and report what its kernels found here, as the host's
   * contract allows (errors that need device values surface at the next
   * download or synchronize, never lost). */
  dp_status (*poll_error)(void *ctx);

  /* 1.1: stream ordering. Makes the context issue every later op, upload and
   * download on `stream`, the embedding engine's queue (a CUstream,
   * hipStream_t, sycl::queue *, aclrtStream, … as the plugin documents), so
   * that they are ordered with the engine's own work on it; NULL restores the
   * plugin's own stream. `synchronize` still waits for all work of the
   * context. DP_NOT_SUPPORTED (or a NULL pointer) for a plugin without
   * streams. */
  dp_status (*set_stream)(void *ctx, void *stream);
} dp_plugin_ext;

typedef const dp_plugin_ext *(*dp_plugin_ext_fn)(uint32_t host_abi_minor);

#ifdef __cplusplus
}
#endif

#endif /* DEEPPORT_PLUGIN_H */
