#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_arithmetic : require
// act_quant with subgroup reductions (reduce.glsl).
#define DP_SUBGROUP 1
#include "act_quant.glsl"
