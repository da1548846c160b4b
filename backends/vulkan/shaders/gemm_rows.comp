#version 450
#extension GL_GOOGLE_include_directive : require
#include "gemm_rows.glsl"
