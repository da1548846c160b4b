/*
 * device_ops.c: an engine's view of deepport's C ABI. Tensors stay on the
 * device; ops run on them by name through deepport_op_launch (any declared
 * local op), and bad calls come back as status codes with messages.
 *
 *   cc device_ops.c -I capi/include -L target/release -ldeepport -o device_ops
 *   LD_LIBRARY_PATH=target/release ./device_ops cpu
 *
 * Checks the device path against the host path (deepport_op_run) byte for
 * byte, prints one "ok: ..." line per check and exits 0 when all hold.
 */
#include "deepport.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

static void expect(DeepportStatus got, DeepportStatus want, const char *needle, const char *what) {
  const char *msg = got == DEEPPORT_STATUS_OK ? "" : deepport_last_error();
  if (got != want || (needle && !strstr(msg, needle))) {
    fprintf(stderr, "FAIL %s: status %d (want %d): %s\n", what, (int)got, (int)want, msg);
    failures++;
  } else {
    printf("ok: %s\n", what);
  }
}

static DeepportTensor *upload(DeepportBackend *b, const size_t *shape, size_t ndim,
                              const float *v) {
  size_t n = 1;
  for (size_t i = 0; i < ndim; i++) n *= shape[i];
  DeepportTensor *t = NULL;
  expect(deepport_tensor_upload(b, DEEPPORT_D_TYPE_F32, shape, ndim, v, n * sizeof(float), &t),
         DEEPPORT_STATUS_OK, NULL, "upload");
  return t;
}

int main(int argc, char **argv) {
  const char *spec = argc > 1 ? argv[1] : "cpu";
  DeepportBackend *b = NULL;
  if (deepport_backend_create(spec, &b) != DEEPPORT_STATUS_OK) {
    fprintf(stderr, "backend %s: %s\n", spec, deepport_last_error());
    return 2;
  }
  const size_t xs[2] = {2, 4}, ws[1] = {4};
  const float x[8] = {1, -2, 3, 0.5f, 4, 4, -4, 0.25f};
  const float w[4] = {1, 0.5f, 2, -1};
  DeepportTensor *tx = upload(b, xs, 2, x), *tw = upload(b, ws, 1, w);
  DeepportTensor *ty = NULL, *h1 = NULL, *ts = NULL;
  expect(deepport_tensor_alloc(b, DEEPPORT_D_TYPE_F32, xs, 2, &ty), DEEPPORT_STATUS_OK, NULL,
         "alloc");

  /* rms_norm on device tensors, then silu_mul(y, x) into another: the
   * intermediate never leaves the device. */
  const char *names[3] = {"x", "weight", "y"};
  const DeepportTensor *ts3[3] = {tx, tw, ty};
  expect(deepport_op_launch(b, "rms_norm", names, ts3, 3, "eps=1e-5"), DEEPPORT_STATUS_OK, NULL,
         "rms_norm launched on device tensors");
  expect(deepport_tensor_alloc(b, DEEPPORT_D_TYPE_F32, xs, 2, &ts), DEEPPORT_STATUS_OK, NULL,
         "alloc");
  const char *sn[3] = {"gate", "up", "out"};
  const DeepportTensor *st[3] = {ty, tx, ts};
  expect(deepport_op_launch(b, "silu-mul", sn, st, 3, NULL), DEEPPORT_STATUS_OK, NULL,
         "silu_mul launched on rms_norm's output");
  float y[8], s[8];
  expect(deepport_tensor_download(b, ty, y, sizeof y), DEEPPORT_STATUS_OK, NULL, "download y");
  expect(deepport_tensor_download(b, ts, s, sizeof s), DEEPPORT_STATUS_OK, NULL, "download out");

  /* The same through the host path: the same bytes. */
  DeepportHostTensor in[2] = {
      {"x", DEEPPORT_D_TYPE_F32, 2, xs, x, sizeof x},
      {"weight", DEEPPORT_D_TYPE_F32, 1, ws, w, sizeof w},
  };
  const char *params[1] = {"eps=1e-5"};
  DeepportOutputs *outs = NULL;
  expect(deepport_op_run(b, "rms_norm", in, 2, params, 1, &outs), DEEPPORT_STATUS_OK, NULL,
         "rms_norm on host tensors");
  const void *data = NULL;
  size_t nbytes = 0;
  expect(deepport_outputs_get(outs, 0, NULL, NULL, NULL, NULL, &data, &nbytes),
         DEEPPORT_STATUS_OK, NULL, "outputs_get");
  if (nbytes != sizeof y || memcmp(data, y, sizeof y) != 0) {
    fprintf(stderr, "FAIL: the device path and the host path differ\n");
    failures++;
  } else {
    printf("ok: device path == host path, byte for byte\n");
  }
  deepport_outputs_free(outs);
  for (int i = 0; i < 8; i++) {
    double g = y[i], want = g / (1.0 + exp(-g)) * x[i];
    if (fabs(s[i] - want) > 1e-5 * (1 + fabs(want))) {
      fprintf(stderr, "FAIL: silu_mul[%d] = %g, want %g\n", i, s[i], want);
      failures++;
    }
  }

  /* Errors: codes and messages, never a crash. */
  const size_t small_shape[2] = {2, 3};
  expect(deepport_tensor_alloc(b, DEEPPORT_D_TYPE_F32, small_shape, 2, &h1), DEEPPORT_STATUS_OK,
         NULL, "alloc");
  const DeepportTensor *bad[3] = {tx, tw, h1};
  expect(deepport_op_launch(b, "rms_norm", names, bad, 3, NULL), DEEPPORT_STATUS_INVALID,
         "output `y` is f32 [2, 3], but the op makes f32 [2, 4]", "a wrong output shape");
  const char *wrong[3] = {"x", "w", "y"};
  expect(deepport_op_launch(b, "rms_norm", wrong, ts3, 3, NULL),
         DEEPPORT_STATUS_INVALID_ARGUMENT, "rms_norm has no tensor `w`", "an unknown tensor name");
  expect(deepport_op_launch(b, "rms_norm", names, ts3, 3, "eps=x"),
         DEEPPORT_STATUS_INVALID_ARGUMENT, "parameter `eps` got `x`", "a malformed parameter");
  expect(deepport_op_launch(b, "rms_norm", names, ts3, 2, NULL),
         DEEPPORT_STATUS_INVALID_ARGUMENT, "output `y`", "a missing output");
  expect(deepport_op_launch(b, NULL, names, ts3, 3, NULL), DEEPPORT_STATUS_INVALID_ARGUMENT,
         "op is NULL", "a NULL op name");
  expect(deepport_op_launch(b, "no_such_op", NULL, NULL, 0, NULL),
         DEEPPORT_STATUS_INVALID_ARGUMENT, "unknown op", "an unknown op");
  expect(deepport_op_launch(b, "dispatch", names, ts3, 1, NULL), DEEPPORT_STATUS_NOT_SUPPORTED,
         "expert-parallel", "an expert-parallel op");

  deepport_tensor_free(tx);
  deepport_tensor_free(tw);
  deepport_tensor_free(ty);
  deepport_tensor_free(ts);
  deepport_tensor_free(h1);
  deepport_backend_free(b);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("all checks passed\n");
  return 0;
}
