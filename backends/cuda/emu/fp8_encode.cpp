// fp8_encode.cpp — the f32 -> e4m3 (port.cuh dp_f32_to_e4m3) and
// f32 -> e4m3fnuz (gemm.cuh gemm_f32_to_e4m3fnuz) encoders against the
// independent f64 encoder of fp8_ref.h, and the decode -> encode round trip
// of every code. Default (tests/emulate.rs): a sample of the f32 bit
// patterns — every 4099th, and for each of the 65536 high halves the low
// halves 0x0000, 0x0001 and 0xffff (exact ties of both formats and their
// neighbours, every exponent, both signs, inf, NaNs) — in well under a
// second. -DEMU_FP8_EXHAUSTIVE checks all 2^32 patterns (minutes). By hand:
//   g++ -std=c++20 -O2 -pthread backends/cuda/emu/fp8_encode.cpp -o /tmp/o && /tmp/o
//   g++ -std=c++20 -O2 -pthread -DEMU_FP8_EXHAUSTIVE backends/cuda/emu/fp8_encode.cpp -o /tmp/o && /tmp/o
#include "emu.h"
#include "../kernels/gemm.cuh"
#include "fp8_ref.h"
#include <cstdio>

static unsigned long long tested = 0;
static void one(uint32_t b) {
  ++tested;
  const float x = __uint_as_float(b);
  const uint8_t g = dp_f32_to_e4m3(x), r = ref_fp8(x, 0);
  const uint8_t gf = gemm_f32_to_e4m3fnuz(x), rf = ref_fp8(x, 1);
  CHECK(g == r && gf == rf, "%08x (%g): e4m3 %02x want %02x, fnuz %02x want %02x", b, x, g, r, gf, rf);
}

int main() {
#ifdef EMU_FP8_EXHAUSTIVE
  for (uint64_t b = 0; b <= 0xffffffffull; ++b) one((uint32_t)b);
#else
  for (uint64_t b = 0; b <= 0xffffffffull; b += 4099) one((uint32_t)b);
  for (uint32_t h = 0; h < 65536; ++h)
    for (uint32_t lo : {0x0000u, 0x0001u, 0xffffu}) one(h << 16 | lo);
#endif
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) != 0x7f) {
      const float v = dp_e4m3_to_f32((u8)c);
      CHECK(dp_f32_to_e4m3(v) == c, "e4m3 round trip %02x", c);
    }
    if (c != 0x80) {
      const float v = dp_e4m3fnuz_to_f32((u8)c);
      CHECK(gemm_f32_to_e4m3fnuz(v) == c, "fnuz round trip %02x", c);
    }
  }
  printf("%llu f32 patterns\n", tested);
  return emu_summary("fp8_encode");
}
