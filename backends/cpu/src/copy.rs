//! Reference window copy.

use crate::util::{f32s, put_f32};
use deepport_core::ops::*;
use deepport_core::Result;

/// Copies the window element by element through f32 (exact for every
/// accepted source dtype), rounding once to the destination dtype. The
/// destination keeps its other elements: it is read, patched and written.
pub(crate) fn copy_window(op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let src = f32s(args.src)?;
    let mut dst = f32s(args.dst)?;
    let (rows, cols) = args.size;
    let (sr, sc) = args.src_origin;
    let (dr, dc) = args.dst_origin;
    for r in 0..rows {
        for c in 0..cols {
            dst[(dr + r) * dims.dst.1 + dc + c] = src[(sr + r) * dims.src.1 + sc + c];
        }
    }
    put_f32(args.dst, &dst)
}
