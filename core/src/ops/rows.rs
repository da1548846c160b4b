//! Row movement and weighted row reduction: the device kernels of the
//! expert-parallel protocol ([`crate::ep`]). Packing the rows a rank sends,
//! placing the rows it receives and the weighted sum of a combine are all
//! one of these two ops, so a backend that has them gets every
//! expert-parallel op from core.

use super::decl::*;
use super::*;

/// `dst[i] = src[index[i]]` for every row `i` (a row is everything after
/// the first dimension); `index[i] = -1` writes a row of zero bytes. Any
/// dtype; bit-exact.
///
/// `src [S, ...]`, `index [M]` i32/i64 in `[0, S)` or −1, `dst [M, ...]`
/// (same dtype and row shape as `src`).
#[derive(Debug)]
pub struct GatherRows<'a> {
    pub src: &'a Tensor,
    pub index: &'a Tensor,
    pub dst: &'a mut Tensor,
}

/// Dims of [`GatherRows`].
#[derive(Clone, Debug)]
pub struct GatherDims {
    /// Rows of `src`.
    pub src_rows: usize,
    /// Rows of `dst` (entries of `index`).
    pub rows: usize,
    /// Elements per row.
    pub row: usize,
}

fn rows_of(t: &Tensor) -> (usize, usize) {
    match t.shape().split_first() {
        Some((&r, rest)) => (r, rest.iter().product()),
        None => (0, 0),
    }
}

impl OpArgs for GatherRows<'_> {
    type Dims = GatherDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::GatherRows,
        summary: "dst[i] = src[index[i]] row by row (−1: a zero row), bit-exact; packs and places expert-parallel payloads",
        tensors: &[
            input("src", &DType::ALL, "[S, ...] any dtype; a row is everything after the first dim"),
            input("index", INDEX_DTYPES, "[M] i32/i64 in [0, S) or −1"),
            output("dst", &DType::ALL, "[M, ...] src's dtype and row shape"),
        ],
        params: &[],
    };
    fn validate(&self) -> Result<GatherDims> {
        const OP: &str = "gather_rows";
        ensure(!self.src.shape().is_empty(), OP, "src", || {
            "must have at least one dimension (rows)".into()
        })?;
        expect_dtype(OP, "index", self.index, INDEX_DTYPES)?;
        let m = expect_rank(OP, "index", self.index, 1, "[M]")?[0];
        expect_dtype(OP, "dst", self.dst, &[self.src.dtype()])?;
        let mut shape = vec![m];
        shape.extend_from_slice(&self.src.shape()[1..]);
        expect_shape(OP, "dst", self.dst, &shape, "[M, ...] (rows of src)")?;
        let (s, row) = rows_of(self.src);
        Ok(GatherDims {
            src_rows: s,
            rows: m,
            row,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("src", self.src),
            ("index", self.index),
            ("dst", &*self.dst),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("dst", &mut *self.dst)]
    }
}

/// Weighted sum of gathered rows, in a fixed order:
/// `out[t] = round(Σ_{j=0..K} w[t,j] · src[index[t,j]])`, accumulated in
/// f32 or wider in `j` order (−1 entries skipped), rounded once to `out`'s
/// dtype. Without `weights` every weight is 1. An all-skipped row is 0.
///
/// `src [S, h]` bf16/f32, `index [N, K]` i32/i64 in `[0, S)` or −1,
/// `weights [N, K]` f32 (optional), `out [N, h]` bf16/f32.
///
/// The order is part of the contract: a backend's result is then the same
/// bit for bit from run to run and whatever the number of ranks that
/// produced `src` (SPEC.md §7).
#[derive(Debug)]
pub struct ReduceRows<'a> {
    pub src: &'a Tensor,
    pub index: &'a Tensor,
    pub weights: Option<&'a Tensor>,
    pub out: &'a mut Tensor,
}

/// Dims of [`ReduceRows`].
#[derive(Clone, Debug)]
pub struct ReduceDims {
    pub src_rows: usize,
    pub tokens: usize,
    pub k: usize,
    pub hidden: usize,
}

impl OpArgs for ReduceRows<'_> {
    type Dims = ReduceDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::ReduceRows,
        summary: "out[t] = Σ_j w[t,j]·src[index[t,j]] in j order (−1 skipped), f32 or wider, one rounding; the expert-parallel combines",
        tensors: &[
            input("src", &[DType::BF16, DType::F32], "[S, h] bf16/f32"),
            input("index", INDEX_DTYPES, "[N, K] i32/i64 in [0, S) or −1"),
            optional_input("weights", &[DType::F32], "[N, K] f32 (absent: every weight is 1)"),
            output("out", &[DType::BF16, DType::F32], "[N, h] bf16/f32"),
        ],
        params: &[param("out_dtype", super::dense::OUT_BF16_F32, "bf16", "dtype of out")],
    };
    fn validate(&self) -> Result<ReduceDims> {
        const OP: &str = "reduce_rows";
        expect_dtype(OP, "src", self.src, &[DType::BF16, DType::F32])?;
        let s = expect_rank(OP, "src", self.src, 2, "[S, h]")?;
        let (src_rows, hidden) = (s[0], s[1]);
        expect_dtype(OP, "index", self.index, INDEX_DTYPES)?;
        let i = expect_rank(OP, "index", self.index, 2, "[N, K]")?;
        let (n, k) = (i[0], i[1]);
        if let Some(w) = self.weights {
            expect_dtype(OP, "weights", w, &[DType::F32])?;
            expect_shape(OP, "weights", w, &[n, k], "[N, K]")?;
        }
        expect_dtype(OP, "out", self.out, &[DType::BF16, DType::F32])?;
        expect_shape(OP, "out", self.out, &[n, hidden], "[N, h]")?;
        Ok(ReduceDims {
            src_rows,
            tokens: n,
            k,
            hidden,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("src", self.src), ("index", self.index)];
        if let Some(w) = self.weights {
            v.push(("weights", w));
        }
        v.push(("out", &*self.out));
        v
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}
