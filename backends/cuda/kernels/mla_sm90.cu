#include "mla.cuh"
extern "C" __global__ void mla_decode_sm90() {}
