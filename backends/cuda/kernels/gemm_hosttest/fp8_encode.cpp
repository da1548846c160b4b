// Exhaustive host test (see run.sh --all): the f32 -> e4m3 / e4m3fnuz encoders of
// port.cuh / gemm.cuh against an f64 re-implementation of deepport-core formats.rs.
#include <cstdio>
#include <cstring>
#include <cmath>
#include <cstdint>
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __shfl_xor_sync(a,b,c) (b)
static inline float __int_as_float(int i){float f; memcpy(&f,&i,4); return f;}
static inline int __float_as_int(float f){int i; memcpy(&i,&f,4); return i;}
static inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v){auto o=*p; if(v>o)*p=v; return o;}
#include "../gemm.cuh"
// Reference: formats.rs Minifloat::encode for E4M3FNUZ, in f64.
static int floor_log2(double a){int e; frexp(a,&e); return e-1;}
static uint8_t ref_fnuz(float x){
  if (std::isnan(x)) return 0x80;
  bool neg = std::signbit(x);
  double a = fabs((double)x);
  auto mag = [&](double q)->uint8_t{ int e=floor_log2(q); if(e< -7){ return (uint8_t)(q/ldexp(1.0,-10)); } double m=q/ldexp(1.0,e-3)-8; return (uint8_t)(((e+8)<<3)|(int)m); };
  if (std::isinf(a)) return mag(240.0) | (neg?0x80:0);
  if (a==0) return 0;
  int e = floor_log2(a); if (e < -7) e = -7;
  double quantum = ldexp(1.0, e-3);
  double q = nearbyint(a/quantum)*quantum; // ties even (default rounding mode)
  if (q > 240.0) return mag(240.0) | (neg?0x80:0);
  if (q == 0) return 0;
  return mag(q) | (neg?0x80:0);
}
static uint8_t ref_e4m3(float x){
  if (std::isnan(x)) return std::signbit(x)?0xff:0x7f;
  bool neg = std::signbit(x);
  double a = fabs((double)x);
  auto mag = [&](double q)->uint8_t{ int e=floor_log2(q); if(e< -6){ return (uint8_t)(q/ldexp(1.0,-9)); } double m=q/ldexp(1.0,e-3)-8; return (uint8_t)(((e+7)<<3)|(int)m); };
  uint8_t sb = neg?0x80:0;
  if (std::isinf(a)) return mag(448.0) | sb;
  if (a==0) return sb;
  int e = floor_log2(a); if (e < -6) e = -6;
  double quantum = ldexp(1.0, e-3);
  double q = nearbyint(a/quantum)*quantum;
  if (q > 448.0) return mag(448.0) | sb;
  if (q == 0) return sb;
  return mag(q) | sb;
}
int main(){
  unsigned long long bad=0, bad2=0;
  for (uint64_t b=0; b<=0xffffffffull; b+=1){
    float x = __int_as_float((int)(uint32_t)b);
    uint8_t g = gemm_f32_to_e4m3fnuz(x), r = ref_fnuz(x);
    if (g!=r && bad++<5) printf("fnuz %08llx %g: got %02x want %02x\n",(unsigned long long)b,x,g,r);
    uint8_t g2 = dp_f32_to_e4m3(x), r2 = ref_e4m3(x);
    if (g2!=r2 && bad2++<5) printf("e4m3 %08llx %g: got %02x want %02x\n",(unsigned long long)b,x,g2,r2);
  }
  printf("mismatches fnuz %llu e4m3 %llu\n", bad, bad2);
  // decode roundtrip of every fnuz code
  int rt=0; for(int c=0;c<256;c++){ if(c==0x80) continue; float v=dp_e4m3fnuz_to_f32(c); if(gemm_f32_to_e4m3fnuz(v)!=c) {rt++; printf("rt %02x\n",c);} }
  printf("roundtrip fails %d\n", rt);
}
