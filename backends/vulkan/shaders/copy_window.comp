#version 450
#extension GL_GOOGLE_include_directive : require
// Copies a rows × cols window of src (as a matrix) into dst, converting
// dtype. One invocation per (window row, dst word): a word is written by the
// invocation of the window row that owns its first in-window element, which
// reads the word, replaces the in-window lanes and writes it back, so
// elements outside the window keep their bits and no word has two writers.
#include "common.glsl"
layout(constant_id = 2) const uint SRC_DT = 0u;
layout(constant_id = 3) const uint DST_DT = 0u;
layout(push_constant) uniform Push {
    uint rows; uint cols; uint src_cols; uint dst_cols; uint src_row; uint src_col;
    uint dst_row; uint dst_col; uint words_per_row;
} P;
layout(std430, set = 0, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, set = 0, binding = 1) buffer Dst { uint dst[]; };

// (window row + 1, window col) of dst element e, or (0, 0) outside.
uvec2 in_window(uint e) {
    uint r = e / P.dst_cols;
    uint c = e % P.dst_cols;
    if (r >= P.dst_row && r < P.dst_row + P.rows && c >= P.dst_col && c < P.dst_col + P.cols) {
        return uvec2(r - P.dst_row + 1u, c - P.dst_col);
    }
    return uvec2(0u, 0u);
}

void main() {
    uint t = inv_lin();
    uint r = t / P.words_per_row;
    uint wi = t % P.words_per_row;
    if (r >= P.rows) return;
    uint per = dt_per_word(DST_DT);
    uint row_start = (P.dst_row + r) * P.dst_cols + P.dst_col;
    uint w = row_start / per + wi;
    uint first = w * per;
    if (first >= row_start + P.cols) return;
    uint owner = 0u;
    bool full = true;
    for (uint l = 0u; l < per; l++) {
        uvec2 win = in_window(first + l);
        if (win.x == 0u) {
            full = false;
        } else if (owner == 0u) {
            owner = win.x;
        }
    }
    if (owner != r + 1u) return;
    uint bits = 32u / per;
    uint mask = bits == 32u ? 0xffffffffu : ((1u << bits) - 1u);
    uint word = full ? 0u : dst[w];
    for (uint l = 0u; l < per; l++) {
        uvec2 win = in_window(first + l);
        if (win.x != 0u) {
            uint sr = P.src_row + win.x - 1u;
            uint sc = P.src_col + win.y;
            uint e = sr * P.src_cols + sc;
            uint v;
            if (SRC_DT == DST_DT) {
                v = dt_lane(SRC_DT, src[e / dt_per_word(SRC_DT)], e);
            } else {
                v = dt_encode(DST_DT, LDF(src, SRC_DT, e));
            }
            uint sh = l * bits;
            word = (word & ~(mask << sh)) | ((v & mask) << sh);
        }
    }
    dst[w] = word;
}
