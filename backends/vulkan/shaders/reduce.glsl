// Workgroup reductions of one float per invocation, every invocation gets
// the result. Define WG_RED (the workgroup size, a power of two) before
// including. Two implementations, chosen per device by the host:
// * DP_SUBGROUP (the `*_sg` kernels, used when the device has subgroup
//   arithmetic in compute shaders): subgroupAdd/subgroupMax, one partial per
//   subgroup in shared memory (sized by spec constant 0, the device's
//   subgroup size), combined in subgroup order;
// * otherwise a tree over shared memory (no subgroup size assumed).
// Max is exact in any order; a sum's rounding depends on the order, so
// the two paths may differ in the last bits (within SPEC tolerances).
#ifdef DP_SUBGROUP
shared float dp_part[(WG_RED + SUBGROUP_SIZE - 1u) / SUBGROUP_SIZE];
float dp_reduce(float v, bool is_max) {
    float s = is_max ? subgroupMax(v) : subgroupAdd(v);
    if (subgroupElect()) dp_part[gl_SubgroupID] = s;
    barrier();
    uint n = min(gl_NumSubgroups, (WG_RED + SUBGROUP_SIZE - 1u) / SUBGROUP_SIZE);
    float r = dp_part[0];
    for (uint i = 1u; i < n; i++) r = is_max ? max(r, dp_part[i]) : r + dp_part[i];
    barrier();
    return r;
}
#else
shared float dp_red[WG_RED];
float dp_reduce(float v, bool is_max) {
    uint lid = gl_LocalInvocationID.x;
    dp_red[lid] = v;
    barrier();
    for (uint h = WG_RED / 2u; h > 0u; h >>= 1u) {
        if (lid < h) dp_red[lid] = is_max ? max(dp_red[lid], dp_red[lid + h]) : dp_red[lid] + dp_red[lid + h];
        barrier();
    }
    float r = dp_red[0];
    barrier();
    return r;
}
#endif
float dp_sum(float v) { return dp_reduce(v, false); }
float dp_max(float v) { return dp_reduce(v, true); }
