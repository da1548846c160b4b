//! Window copy: the one data-movement op (split, concat, cast, cache write).

use super::decl::*;
use super::*;

/// Copies a `rows × cols` window of `src` (viewed as a matrix of its last
/// dim by everything before it) to a window of `dst`, converting dtype with
/// one rounding. Columns and rows of `dst` outside the window are left
/// untouched. This single op covers narrowing (`q → q_nope, q_pe`),
/// concatenation (`[q_lat ‖ q_pe]`), casts (f32 → bf16) and latent-cache
/// writes (rows of a `[num_blocks·64, 576]` view of the paged cache).
#[derive(Debug)]
pub struct CopyWindow<'a> {
    pub src: &'a Tensor,
    pub dst: &'a mut Tensor,
    /// (row, col) of the window's origin in `src`.
    pub src_origin: (usize, usize),
    /// (row, col) of the window's origin in `dst`.
    pub dst_origin: (usize, usize),
    /// (rows, cols) of the window.
    pub size: (usize, usize),
}

#[derive(Clone, Debug)]
pub struct CopyDims {
    /// `src` as a matrix: (rows, cols).
    pub src: (usize, usize),
    /// `dst` as a matrix: (rows, cols).
    pub dst: (usize, usize),
}

/// A tensor's shape as (rows, cols): cols = last dim, rows = the rest.
pub fn as_matrix(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        None => (1, 1),
        Some((&c, rest)) => (rest.iter().product(), c),
    }
}

impl OpArgs for CopyWindow<'_> {
    type Dims = CopyDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::CopyWindow,
        summary: "copy a rows×cols window of src into dst, converting dtype (one rounding)",
        tensors: &[
            input(
                "src",
                ACT_DTYPES,
                "any shape f32/bf16/f16, viewed as [rows, last dim]",
            ),
            input(
                "dst",
                ACT_DTYPES,
                "any shape f32/bf16/f16, viewed as [rows, last dim]",
            ),
            output(
                "dst",
                ACT_DTYPES,
                "dst with the window overwritten (elements outside it kept)",
            ),
        ],
        params: &[
            param("src_row", ParamKind::Int, "0", "window origin in src: row"),
            param(
                "src_col",
                ParamKind::Int,
                "0",
                "window origin in src: column",
            ),
            param("dst_row", ParamKind::Int, "0", "window origin in dst: row"),
            param(
                "dst_col",
                ParamKind::Int,
                "0",
                "window origin in dst: column",
            ),
            computed(
                "rows",
                ParamKind::Int,
                "the rest of src below src_row",
                "window rows",
            ),
            computed(
                "cols",
                ParamKind::Int,
                "the rest of src right of src_col",
                "window columns",
            ),
        ],
    };
    fn validate(&self) -> Result<CopyDims> {
        const OP: &str = "copy_window";
        let s = as_matrix(self.src.shape());
        let d = as_matrix(self.dst.shape());
        let (rows, cols) = self.size;
        let fits = |o: (usize, usize), m: (usize, usize)| {
            o.0.checked_add(rows).is_some_and(|r| r <= m.0)
                && o.1.checked_add(cols).is_some_and(|c| c <= m.1)
        };
        ensure(fits(self.src_origin, s), OP, "src", || {
            format!(
                "window {:?} at {:?} exceeds src viewed as {s:?}",
                self.size, self.src_origin
            )
        })?;
        ensure(fits(self.dst_origin, d), OP, "dst", || {
            format!(
                "window {:?} at {:?} exceeds dst viewed as {d:?}",
                self.size, self.dst_origin
            )
        })?;
        Ok(CopyDims { src: s, dst: d })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("src", self.src), ("dst", &*self.dst)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("dst", &mut *self.dst)]
    }
}
