#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_arithmetic : require
// mla_decode with subgroup reductions (reduce.glsl).
#define DP_SUBGROUP 1
#include "mla_decode.glsl"
