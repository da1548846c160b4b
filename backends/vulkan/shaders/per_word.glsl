// The entry point of a kernel with one invocation per output word: the
// kernel defines `uint lane(uint i)` (the lane bits of output element i),
// `OUT_DT`, the output array `o[]` and `#define PW_TOTAL` (output elements).
// Packed 16/8-bit outputs are assembled per word, so no word has two writers.
void main() {
    uint w = inv_lin();
    uint per = dt_per_word(OUT_DT);
    if (w * per >= PW_TOTAL) return;
    if (per == 1u) {
        o[w] = lane(w);
        return;
    }
    uint bits = 32u / per;
    uint word = o[w];
    for (uint j = 0u; j < per; j++) {
        uint i = w * per + j;
        if (i < PW_TOTAL) {
            uint m = ((1u << bits) - 1u) << (j * bits);
            word = (word & ~m) | ((lane(i) << (j * bits)) & m);
        }
    }
    o[w] = word;
}
