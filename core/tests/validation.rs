//! Op argument validation: every op's `validate()`/`check()` rejects bad
//! shapes, dtypes and parameters with the right error variant naming the op
//! and the argument, and accepts a correct set with the right dims. Tensors
//! use a dummy storage, so no backend is involved.

use deepport_core::backend::Storage;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result, Tensor};
use std::any::Any;

struct Dummy;

impl Storage for Dummy {
    fn backend(&self) -> &str {
        "dummy"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn t(dtype: DType, shape: &[usize]) -> Tensor {
    Tensor::new(
        dtype,
        shape,
        Box::new(Dummy),
        deepport_core::backend::InstanceId::fresh(),
    )
}

use DType::{Bool, F8E4M3Fnuz as FNUZ, BF16, F32, F8E4M3 as E4M3, I32, I64};

#[derive(Debug, Clone, Copy, PartialEq)]
enum V {
    Shape,
    DType,
    Invalid,
}

/// Asserts `r` failed with variant `v` naming `op` and `arg`, in the fields
/// and in the Display text.
#[track_caller]
fn assert_err<T: std::fmt::Debug>(r: Result<T>, v: V, op: &str, arg: &str) -> Error {
    let e = match r {
        Ok(x) => panic!("expected {v:?} error for {op}.{arg}, got Ok({x:?})"),
        Err(e) => e,
    };
    let (got_v, got_op, got_arg) = match &e {
        Error::Shape { op, arg, .. } => (V::Shape, *op, *arg),
        Error::DType { op, arg, .. } => (V::DType, *op, *arg),
        Error::Invalid { op, arg, .. } => (V::Invalid, *op, *arg),
        other => panic!("expected {v:?} for {op}.{arg}, got {other:?}"),
    };
    assert_eq!((got_v, got_op, got_arg), (v, op, arg), "{e}");
    let s = e.to_string();
    assert!(
        s.contains(&format!("{op}: argument `{arg}`")),
        "message {s:?} does not name {op} and `{arg}`"
    );
    e
}

// ---- act_quant -----------------------------------------------------------------

fn act_quant(
    x: (DType, &[usize]),
    q: (DType, &[usize]),
    s: (DType, &[usize]),
) -> Result<ActQuantDims> {
    let x = t(x.0, x.1);
    let mut q = t(q.0, q.1);
    let mut s = t(s.0, s.1);
    ActQuant {
        x: &x,
        q: &mut q,
        s: &mut s,
        scale_fmt: ScaleFmt::Float,
    }
    .check()
    .map(|c| {
        assert_eq!(c.kind(), OpKind::ActQuant);
        c.dims().clone()
    })
}

#[test]
fn act_quant_validation() {
    let d = act_quant((BF16, &[4, 256]), (E4M3, &[4, 256]), (F32, &[4, 2])).unwrap();
    assert_eq!((d.m, d.k, d.fp8_max), (4, 256, 448.0));
    let d = act_quant((F32, &[1, 128]), (FNUZ, &[1, 128]), (F32, &[1, 1])).unwrap();
    assert_eq!((d.m, d.k, d.fp8_max), (1, 128, 240.0));

    let e = assert_err(
        act_quant((BF16, &[4, 200]), (E4M3, &[4, 200]), (F32, &[4, 2])),
        V::Invalid,
        "act_quant",
        "x",
    );
    assert!(e.to_string().contains("200"), "{e}");
    assert_err(
        act_quant((BF16, &[4, 256]), (BF16, &[4, 256]), (F32, &[4, 2])),
        V::DType,
        "act_quant",
        "q",
    );
    assert_err(
        act_quant(
            (BF16, &[4, 256]),
            (DType::F8E5M2, &[4, 256]),
            (F32, &[4, 2]),
        ),
        V::DType,
        "act_quant",
        "q",
    );
    assert_err(
        act_quant((I32, &[4, 256]), (E4M3, &[4, 256]), (F32, &[4, 2])),
        V::DType,
        "act_quant",
        "x",
    );
    assert_err(
        act_quant((BF16, &[4, 256]), (E4M3, &[4, 256]), (BF16, &[4, 2])),
        V::DType,
        "act_quant",
        "s",
    );
    assert_err(
        act_quant((BF16, &[4, 256]), (E4M3, &[4, 256]), (F32, &[4, 1])),
        V::Shape,
        "act_quant",
        "s",
    );
    assert_err(
        act_quant((BF16, &[4, 256]), (E4M3, &[4, 128]), (F32, &[4, 2])),
        V::Shape,
        "act_quant",
        "q",
    );
    assert_err(
        act_quant((BF16, &[2, 4, 256]), (E4M3, &[8, 256]), (F32, &[8, 2])),
        V::Shape,
        "act_quant",
        "x",
    );
}

// ---- FP8 GEMMs -----------------------------------------------------------------

struct G<'s> {
    a: (DType, &'s [usize]),
    sa: (DType, &'s [usize]),
    b: (DType, &'s [usize]),
    sb: (DType, &'s [usize]),
    d: (DType, &'s [usize]),
}

fn fp8_gemm(g: G<'_>) -> Result<GemmDims> {
    let (a, sa, b, sb) = (
        t(g.a.0, g.a.1),
        t(g.sa.0, g.sa.1),
        t(g.b.0, g.b.1),
        t(g.sb.0, g.sb.1),
    );
    let mut d = t(g.d.0, g.d.1);
    let op = Fp8Gemm {
        a: &a,
        sa: &sa,
        b: &b,
        sb: &sb,
        d: &mut d,
    };
    assert_eq!(op.dtypes(), vec![g.a.0, g.sa.0, g.b.0, g.sb.0, g.d.0]);
    op.check().map(|c| c.dims().clone())
}

fn good_gemm() -> G<'static> {
    // DeepGEMM shape (n, k) = (576, 7168): 576 rows → 5 row blocks of 128.
    G {
        a: (E4M3, &[64, 7168]),
        sa: (F32, &[64, 56]),
        b: (E4M3, &[576, 7168]),
        sb: (F32, &[5, 56]),
        d: (BF16, &[64, 576]),
    }
}

#[test]
fn fp8_gemm_validation() {
    let d = fp8_gemm(good_gemm()).unwrap();
    assert_eq!((d.groups, d.m, d.n, d.k), (1, 64, 576, 7168));
    let d = fp8_gemm(G {
        d: (F32, &[64, 576]),
        ..good_gemm()
    })
    .unwrap();
    assert_eq!(d.n, 576);
    // fnuz operands on both sides.
    fp8_gemm(G {
        a: (FNUZ, &[64, 7168]),
        b: (FNUZ, &[576, 7168]),
        ..good_gemm()
    })
    .unwrap();
    // Partial K block: k = 200 → 2 blocks.
    let d = fp8_gemm(G {
        a: (E4M3, &[3, 200]),
        sa: (F32, &[3, 2]),
        b: (E4M3, &[130, 200]),
        sb: (F32, &[2, 2]),
        d: (BF16, &[3, 130]),
    })
    .unwrap();
    assert_eq!((d.m, d.n, d.k), (3, 130, 200));

    // sb with 4 row blocks for n = 576 (needs 5).
    let e = assert_err(
        fp8_gemm(G {
            sb: (F32, &[4, 56]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "sb",
    );
    assert!(e.to_string().contains("[5, 56]"), "{e}");
    assert_err(
        fp8_gemm(G {
            sb: (F32, &[6, 56]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "sb",
    );
    assert_err(
        fp8_gemm(G {
            sb: (F32, &[5, 55]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "sb",
    );
    // b with a different k.
    assert_err(
        fp8_gemm(G {
            b: (E4M3, &[576, 7040]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "b",
    );
    assert_err(
        fp8_gemm(G {
            b: (E4M3, &[576]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "b",
    );
    // Mixed FP8 families.
    assert_err(
        fp8_gemm(G {
            b: (FNUZ, &[576, 7168]),
            ..good_gemm()
        }),
        V::DType,
        "fp8_gemm",
        "b",
    );
    assert_err(
        fp8_gemm(G {
            a: (BF16, &[64, 7168]),
            ..good_gemm()
        }),
        V::DType,
        "fp8_gemm",
        "a",
    );
    assert_err(
        fp8_gemm(G {
            sa: (F32, &[64, 57]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "sa",
    );
    assert_err(
        fp8_gemm(G {
            sa: (BF16, &[64, 56]),
            ..good_gemm()
        }),
        V::DType,
        "fp8_gemm",
        "sa",
    );
    assert_err(
        fp8_gemm(G {
            d: (BF16, &[64, 575]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "d",
    );
    assert_err(
        fp8_gemm(G {
            d: (E4M3, &[64, 576]),
            ..good_gemm()
        }),
        V::DType,
        "fp8_gemm",
        "d",
    );
    assert_err(
        fp8_gemm(G {
            a: (E4M3, &[2, 64, 7168]),
            ..good_gemm()
        }),
        V::Shape,
        "fp8_gemm",
        "a",
    );
}

fn grouped_masked(g: G<'_>, masked: (DType, &[usize])) -> Result<GemmDims> {
    let (a, sa, b, sb) = (
        t(g.a.0, g.a.1),
        t(g.sa.0, g.sa.1),
        t(g.b.0, g.b.1),
        t(g.sb.0, g.sb.1),
    );
    let m = t(masked.0, masked.1);
    let mut d = t(g.d.0, g.d.1);
    Fp8GroupedMasked {
        a: &a,
        sa: &sa,
        b: &b,
        sb: &sb,
        masked_m: &m,
        d: &mut d,
    }
    .check()
    .map(|c| c.dims().clone())
}

fn good_masked() -> G<'static> {
    G {
        a: (E4M3, &[4, 32, 256]),
        sa: (F32, &[4, 32, 2]),
        b: (E4M3, &[4, 576, 256]),
        sb: (F32, &[4, 5, 2]),
        d: (BF16, &[4, 32, 576]),
    }
}

#[test]
fn fp8_grouped_masked_validation() {
    let d = grouped_masked(good_masked(), (I32, &[4])).unwrap();
    assert_eq!((d.groups, d.m, d.n, d.k), (4, 32, 576, 256));
    grouped_masked(good_masked(), (I64, &[4])).unwrap();

    // b has 3 groups, a has 4.
    let e = assert_err(
        grouped_masked(
            G {
                b: (E4M3, &[3, 576, 256]),
                sb: (F32, &[3, 5, 2]),
                ..good_masked()
            },
            (I32, &[4]),
        ),
        V::Invalid,
        "fp8_grouped_masked",
        "b",
    );
    assert!(
        e.to_string().contains('3') && e.to_string().contains('4'),
        "{e}"
    );
    assert_err(
        grouped_masked(
            G {
                sb: (F32, &[4, 4, 2]),
                ..good_masked()
            },
            (I32, &[4]),
        ),
        V::Shape,
        "fp8_grouped_masked",
        "sb",
    );
    assert_err(
        grouped_masked(
            G {
                sa: (F32, &[4, 31, 2]),
                ..good_masked()
            },
            (I32, &[4]),
        ),
        V::Shape,
        "fp8_grouped_masked",
        "sa",
    );
    assert_err(
        grouped_masked(
            G {
                d: (BF16, &[4, 32, 512]),
                ..good_masked()
            },
            (I32, &[4]),
        ),
        V::Shape,
        "fp8_grouped_masked",
        "d",
    );
    assert_err(
        grouped_masked(good_masked(), (I32, &[3])),
        V::Shape,
        "fp8_grouped_masked",
        "masked_m",
    );
    assert_err(
        grouped_masked(good_masked(), (F32, &[4])),
        V::DType,
        "fp8_grouped_masked",
        "masked_m",
    );
    assert_err(
        grouped_masked(
            G {
                a: (E4M3, &[128, 256]),
                ..good_masked()
            },
            (I32, &[4]),
        ),
        V::Shape,
        "fp8_grouped_masked",
        "a",
    );
}

fn grouped_contiguous(g: G<'_>, mi: (DType, &[usize])) -> Result<GemmDims> {
    let (a, sa, b, sb) = (
        t(g.a.0, g.a.1),
        t(g.sa.0, g.sa.1),
        t(g.b.0, g.b.1),
        t(g.sb.0, g.sb.1),
    );
    let m = t(mi.0, mi.1);
    let mut d = t(g.d.0, g.d.1);
    Fp8GroupedContiguous {
        a: &a,
        sa: &sa,
        b: &b,
        sb: &sb,
        m_indices: &m,
        d: &mut d,
    }
    .check()
    .map(|c| c.dims().clone())
}

fn good_contiguous() -> G<'static> {
    G {
        a: (E4M3, &[256, 384]),
        sa: (F32, &[256, 3]),
        b: (E4M3, &[2, 512, 384]),
        sb: (F32, &[2, 4, 3]),
        d: (BF16, &[256, 512]),
    }
}

#[test]
fn fp8_grouped_contiguous_validation() {
    let d = grouped_contiguous(good_contiguous(), (I32, &[256])).unwrap();
    assert_eq!((d.groups, d.m, d.n, d.k), (2, 256, 512, 384));
    assert_err(
        grouped_contiguous(good_contiguous(), (I32, &[255])),
        V::Shape,
        "fp8_grouped_contiguous",
        "m_indices",
    );
    assert_err(
        grouped_contiguous(good_contiguous(), (BF16, &[256])),
        V::DType,
        "fp8_grouped_contiguous",
        "m_indices",
    );
    assert_err(
        grouped_contiguous(
            G {
                sb: (F32, &[3, 4, 3]),
                ..good_contiguous()
            },
            (I32, &[256]),
        ),
        V::Shape,
        "fp8_grouped_contiguous",
        "sb",
    );
    assert_err(
        grouped_contiguous(
            G {
                b: (E4M3, &[512, 384]),
                ..good_contiguous()
            },
            (I32, &[256]),
        ),
        V::Shape,
        "fp8_grouped_contiguous",
        "b",
    );
    assert_err(
        grouped_contiguous(
            G {
                b: (E4M3, &[2, 512, 256]),
                ..good_contiguous()
            },
            (I32, &[256]),
        ),
        V::Shape,
        "fp8_grouped_contiguous",
        "b",
    );
}

#[test]
fn gemm_and_weight_dequant_validation() {
    let check = |a: (DType, &[usize]), b: (DType, &[usize]), d: (DType, &[usize])| {
        let (a, b, mut d) = (t(a.0, a.1), t(b.0, b.1), t(d.0, d.1));
        Gemm {
            a: &a,
            b: &b,
            d: &mut d,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = check((BF16, &[3, 16]), (F32, &[5, 16]), (BF16, &[3, 5])).unwrap();
    assert_eq!((d.groups, d.m, d.n, d.k), (1, 3, 5, 16));
    assert_err(
        check((BF16, &[3, 16]), (BF16, &[5, 17]), (BF16, &[3, 5])),
        V::Shape,
        "gemm",
        "b",
    );
    assert_err(
        check((BF16, &[3, 16]), (BF16, &[5, 16]), (BF16, &[5, 3])),
        V::Shape,
        "gemm",
        "d",
    );
    assert_err(
        check((E4M3, &[3, 16]), (BF16, &[5, 16]), (BF16, &[3, 5])),
        V::DType,
        "gemm",
        "a",
    );

    let wd = |w: (DType, &[usize]), s: (DType, &[usize]), o: (DType, &[usize])| {
        let (w, s, mut o) = (t(w.0, w.1), t(s.0, s.1), t(o.0, o.1));
        WeightDequant {
            w: &w,
            s: &s,
            out: &mut o,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = wd((E4M3, &[576, 300]), (F32, &[5, 3]), (BF16, &[576, 300])).unwrap();
    assert_eq!((d.n, d.k), (576, 300));
    assert_err(
        wd((E4M3, &[576, 300]), (F32, &[4, 3]), (BF16, &[576, 300])),
        V::Shape,
        "weight_dequant",
        "s",
    );
    assert_err(
        wd((BF16, &[576, 300]), (F32, &[5, 3]), (BF16, &[576, 300])),
        V::DType,
        "weight_dequant",
        "w",
    );
    assert_err(
        wd((E4M3, &[576, 300]), (F32, &[5, 3]), (BF16, &[300, 576])),
        V::Shape,
        "weight_dequant",
        "out",
    );
}

// ---- MLA -----------------------------------------------------------------------

struct Mla<'s> {
    q: (DType, &'s [usize]),
    kcache: (DType, &'s [usize]),
    block_table: (DType, &'s [usize]),
    seqlens: (DType, &'s [usize]),
    out: (DType, &'s [usize]),
    lse: (DType, &'s [usize]),
    scale: f32,
}

fn good_mla() -> Mla<'static> {
    Mla {
        q: (BF16, &[2, 1, 16, 576]),
        kcache: (BF16, &[10, 64, 2, 576]),
        block_table: (I32, &[2, 4]),
        seqlens: (I32, &[2]),
        out: (BF16, &[2, 1, 16, 512]),
        lse: (F32, &[2, 16, 1]),
        scale: 576f32.powf(-0.5),
    }
}

fn mla_decode(m: Mla<'_>) -> Result<MlaDecodeDims> {
    let (q, k, bt, sl) = (
        t(m.q.0, m.q.1),
        t(m.kcache.0, m.kcache.1),
        t(m.block_table.0, m.block_table.1),
        t(m.seqlens.0, m.seqlens.1),
    );
    let (mut out, mut lse) = (t(m.out.0, m.out.1), t(m.lse.0, m.lse.1));
    MlaDecode {
        q: &q,
        kcache: &k,
        block_table: &bt,
        cache_seqlens: &sl,
        out: &mut out,
        lse: &mut lse,
        softmax_scale: m.scale,
        causal: true,
    }
    .check()
    .map(|c| c.dims().clone())
}

#[test]
fn mla_decode_validation() {
    let d = mla_decode(good_mla()).unwrap();
    assert_eq!(
        (
            d.batch,
            d.s_q,
            d.h_q,
            d.h_kv,
            d.d,
            d.dv,
            d.num_blocks,
            d.block_size,
            d.max_blocks
        ),
        (2, 1, 16, 2, 576, 512, 10, 64, 4)
    );
    // s_q = 2, h_q = 3 over h_kv = 3, out dv = d allowed.
    let d = mla_decode(Mla {
        q: (BF16, &[1, 2, 3, 576]),
        kcache: (BF16, &[4, 64, 3, 576]),
        block_table: (I32, &[1, 1]),
        seqlens: (I32, &[1]),
        out: (BF16, &[1, 2, 3, 576]),
        lse: (F32, &[1, 3, 2]),
        ..good_mla()
    })
    .unwrap();
    assert_eq!((d.s_q, d.h_q, d.h_kv, d.dv), (2, 3, 3, 576));

    // h_q = 15 is not a multiple of h_kv = 2.
    let e = assert_err(
        mla_decode(Mla {
            q: (BF16, &[2, 1, 15, 576]),
            out: (BF16, &[2, 1, 15, 512]),
            lse: (F32, &[2, 15, 1]),
            ..good_mla()
        }),
        V::Invalid,
        "mla_decode",
        "kcache",
    );
    assert!(e.to_string().contains("15"), "{e}");
    assert_err(
        mla_decode(Mla {
            block_table: (I64, &[2, 4]),
            ..good_mla()
        }),
        V::DType,
        "mla_decode",
        "block_table",
    );
    assert_err(
        mla_decode(Mla {
            block_table: (I32, &[3, 4]),
            ..good_mla()
        }),
        V::Shape,
        "mla_decode",
        "block_table",
    );
    assert_err(
        mla_decode(Mla {
            seqlens: (I64, &[2]),
            ..good_mla()
        }),
        V::DType,
        "mla_decode",
        "cache_seqlens",
    );
    assert_err(
        mla_decode(Mla {
            seqlens: (I32, &[1]),
            ..good_mla()
        }),
        V::Shape,
        "mla_decode",
        "cache_seqlens",
    );
    // out head dim 640 exceeds d = 576.
    let e = assert_err(
        mla_decode(Mla {
            out: (BF16, &[2, 1, 16, 640]),
            ..good_mla()
        }),
        V::Invalid,
        "mla_decode",
        "out",
    );
    assert!(e.to_string().contains("640"), "{e}");
    assert_err(
        mla_decode(Mla {
            out: (BF16, &[2, 1, 8, 512]),
            ..good_mla()
        }),
        V::Shape,
        "mla_decode",
        "out",
    );
    // lse must be [b, h_q, s_q], not [b, s_q, h_q].
    assert_err(
        mla_decode(Mla {
            lse: (F32, &[2, 1, 16]),
            ..good_mla()
        }),
        V::Shape,
        "mla_decode",
        "lse",
    );
    assert_err(
        mla_decode(Mla {
            lse: (BF16, &[2, 16, 1]),
            ..good_mla()
        }),
        V::DType,
        "mla_decode",
        "lse",
    );
    assert_err(
        mla_decode(Mla {
            kcache: (F32, &[10, 64, 2, 576]),
            ..good_mla()
        }),
        V::DType,
        "mla_decode",
        "kcache",
    );
    assert_err(
        mla_decode(Mla {
            kcache: (BF16, &[10, 64, 2, 512]),
            ..good_mla()
        }),
        V::Shape,
        "mla_decode",
        "kcache",
    );
    assert_err(
        mla_decode(Mla {
            kcache: (BF16, &[10, 0, 2, 576]),
            ..good_mla()
        }),
        V::Invalid,
        "mla_decode",
        "kcache",
    );
    assert_err(
        mla_decode(Mla {
            q: (BF16, &[2, 16, 576]),
            ..good_mla()
        }),
        V::Shape,
        "mla_decode",
        "q",
    );
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_err(
            mla_decode(Mla {
                scale: s,
                ..good_mla()
            }),
            V::Invalid,
            "mla_decode",
            "softmax_scale",
        );
    }
}

fn mla_prefill(
    t_: usize,
    s: usize,
    h: usize,
    wkv_rows: usize,
    out: &[usize],
) -> Result<MlaPrefillDims> {
    let (dn, dr, dc) = (128, 64, 512);
    let q_nope = t(BF16, &[t_, h, dn]);
    let q_pe = t(BF16, &[t_, h, dr]);
    let latent = t(BF16, &[s, dc]);
    let k_pe = t(BF16, &[s, dr]);
    let wkv_b = t(BF16, &[wkv_rows, dc]);
    let mut o = t(BF16, out);
    MlaPrefill {
        q_nope: &q_nope,
        q_pe: &q_pe,
        latent: &latent,
        k_pe: &k_pe,
        wkv_b: &wkv_b,
        out: &mut o,
        softmax_scale: 0.1,
        form: MlaForm::Absorbed,
    }
    .check()
    .map(|c| c.dims().clone())
}

#[test]
fn mla_prefill_validation() {
    let d = mla_prefill(4, 6, 2, 2 * (128 + 128), &[4, 2, 128]).unwrap();
    assert_eq!(
        (d.t, d.s, d.heads, d.dn, d.dr, d.dc, d.dv),
        (4, 6, 2, 128, 64, 512, 128)
    );
    // S == T is fine (no earlier context).
    mla_prefill(4, 4, 2, 2 * 256, &[4, 2, 128]).unwrap();
    // S < T.
    let e = assert_err(
        mla_prefill(4, 3, 2, 2 * 256, &[4, 2, 128]),
        V::Invalid,
        "mla_prefill",
        "latent",
    );
    assert!(
        e.to_string().contains('3') && e.to_string().contains('4'),
        "{e}"
    );
    // wkv_b rows must be H·(dn + dv).
    assert_err(
        mla_prefill(4, 6, 2, 2 * 256 + 1, &[4, 2, 128]),
        V::Shape,
        "mla_prefill",
        "wkv_b",
    );
    // dv = 64 then needs H·(128 + 64) rows.
    mla_prefill(4, 6, 2, 2 * 192, &[4, 2, 64]).unwrap();
    assert_err(
        mla_prefill(4, 6, 2, 2 * 256, &[4, 3, 128]),
        V::Shape,
        "mla_prefill",
        "out",
    );
}

// ---- row-wise and elementwise ops ----------------------------------------------

#[test]
fn rope_validation() {
    let check = |x: &[usize], pos: (DType, &[usize]), config: RopeConfig| {
        let (xt, p, mut y) = (t(BF16, x), t(pos.0, pos.1), t(BF16, x));
        Rope {
            x: &xt,
            positions: &p,
            y: &mut y,
            config,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = check(&[3, 4, 64], (I64, &[3]), RopeConfig::default()).unwrap();
    assert_eq!((d.tokens, d.heads, d.d), (3, 4, 64));
    let d = check(&[5, 64], (I32, &[5]), RopeConfig::default()).unwrap();
    assert_eq!((d.tokens, d.heads, d.d), (5, 1, 64));
    let e = assert_err(
        check(&[3, 4, 63], (I64, &[3]), RopeConfig::default()),
        V::Invalid,
        "rope",
        "x",
    );
    assert!(e.to_string().contains("63"), "{e}");
    assert_err(
        check(&[64], (I64, &[64]), RopeConfig::default()),
        V::Invalid,
        "rope",
        "x",
    );
    assert_err(
        check(&[3, 4, 64], (I64, &[4]), RopeConfig::default()),
        V::Shape,
        "rope",
        "positions",
    );
    assert_err(
        check(&[3, 4, 64], (F32, &[3]), RopeConfig::default()),
        V::DType,
        "rope",
        "positions",
    );
    assert_err(
        check(
            &[3, 64],
            (I64, &[3]),
            RopeConfig {
                layout: Default::default(),
                theta: 1.0,
                yarn: None,
            },
        ),
        V::Invalid,
        "rope",
        "theta",
    );
    let yarn = Yarn {
        factor: 40.0,
        original_max_position_embeddings: 4096,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 1.0,
    };
    check(
        &[3, 64],
        (I64, &[3]),
        RopeConfig {
            layout: Default::default(),
            theta: 10000.0,
            yarn: Some(yarn),
        },
    )
    .unwrap();
    assert_err(
        check(
            &[3, 64],
            (I64, &[3]),
            RopeConfig {
                layout: Default::default(),
                theta: 10000.0,
                yarn: Some(Yarn {
                    factor: 0.5,
                    ..yarn
                }),
            },
        ),
        V::Invalid,
        "rope",
        "factor",
    );
    assert_err(
        check(
            &[3, 64],
            (I64, &[3]),
            RopeConfig {
                layout: Default::default(),
                theta: 10000.0,
                yarn: Some(Yarn {
                    mscale: f32::NAN,
                    ..yarn
                }),
            },
        ),
        V::Invalid,
        "rope",
        "mscale",
    );
    // y must match x.
    let (xt, p, mut y) = (t(BF16, &[3, 64]), t(I64, &[3]), t(BF16, &[3, 32]));
    assert_err(
        Rope {
            x: &xt,
            positions: &p,
            y: &mut y,
            config: RopeConfig::default(),
        }
        .check(),
        V::Shape,
        "rope",
        "y",
    );
}

#[test]
fn rms_norm_silu_add_validation() {
    let rms = |x: &[usize], w: &[usize], y: &[usize], eps: f32| {
        let (xt, wt, mut yt) = (t(BF16, x), t(F32, w), t(BF16, y));
        RmsNorm {
            x: &xt,
            weight: &wt,
            y: &mut yt,
            eps,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = rms(&[2, 3, 16], &[16], &[2, 3, 16], 1e-6).unwrap();
    assert_eq!((d.rows, d.dim), (6, 16));
    assert_err(
        rms(&[2, 16], &[15], &[2, 16], 1e-6),
        V::Shape,
        "rms_norm",
        "weight",
    );
    assert_err(
        rms(&[2, 16], &[16], &[16, 2], 1e-6),
        V::Shape,
        "rms_norm",
        "y",
    );
    assert_err(
        rms(&[2, 16], &[16], &[2, 16], -1.0),
        V::Invalid,
        "rms_norm",
        "eps",
    );
    assert_err(rms(&[], &[16], &[], 1e-6), V::Invalid, "rms_norm", "x");

    let (g, u, mut o) = (t(BF16, &[4, 8]), t(BF16, &[4, 8]), t(BF16, &[4, 8]));
    let c = SiluMul {
        gate: &g,
        up: &u,
        out: &mut o,
    }
    .check()
    .unwrap();
    assert_eq!(c.dims().numel, 32);
    let (g, u, mut o) = (t(BF16, &[4, 8]), t(BF16, &[8, 4]), t(BF16, &[4, 8]));
    assert_err(
        SiluMul {
            gate: &g,
            up: &u,
            out: &mut o,
        }
        .check(),
        V::Shape,
        "silu_mul",
        "up",
    );
    let (a, b, mut o) = (t(F32, &[4, 8]), t(F32, &[4, 8]), t(I32, &[4, 8]));
    assert_err(
        Add {
            a: &a,
            b: &b,
            out: &mut o,
        }
        .check(),
        V::DType,
        "add",
        "out",
    );
}

// ---- MoE gate ------------------------------------------------------------------

struct Gate {
    experts: usize,
    bias: Option<(DType, Vec<usize>)>,
    idx_shape: Vec<usize>,
    n_group: usize,
    topk_group: usize,
    topk: usize,
    route_scale: f32,
}

fn good_gate() -> Gate {
    Gate {
        experts: 256,
        bias: Some((F32, vec![256])),
        idx_shape: vec![5, 8],
        n_group: 8,
        topk_group: 4,
        topk: 8,
        route_scale: 2.5,
    }
}

fn moe_gate(g: Gate) -> Result<MoeGateDims> {
    let x = t(BF16, &[5, 64]);
    let w = t(BF16, &[g.experts, 64]);
    let bias = g.bias.as_ref().map(|(d, s)| t(*d, s));
    let mut idx = t(I64, &g.idx_shape);
    let mut wt = t(F32, &g.idx_shape);
    MoeGate {
        x: &x,
        weight: &w,
        bias: bias.as_ref(),
        topk_idx: &mut idx,
        topk_weights: &mut wt,
        n_group: g.n_group,
        topk_group: g.topk_group,
        topk: g.topk,
        route_scale: g.route_scale,
    }
    .check()
    .map(|c| c.dims().clone())
}

#[test]
fn moe_gate_validation() {
    let d = moe_gate(good_gate()).unwrap();
    assert_eq!((d.tokens, d.dim, d.experts), (5, 64, 256));
    moe_gate(Gate {
        bias: None,
        ..good_gate()
    })
    .unwrap();
    // topk_group = 1 keeps 32 experts: topk = 32 passes, 33 fails.
    moe_gate(Gate {
        topk_group: 1,
        topk: 32,
        idx_shape: vec![5, 32],
        ..good_gate()
    })
    .unwrap();
    let e = assert_err(
        moe_gate(Gate {
            topk_group: 1,
            topk: 33,
            idx_shape: vec![5, 33],
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "topk",
    );
    assert!(e.to_string().contains("32"), "{e}");
    assert_err(
        moe_gate(Gate {
            topk: 0,
            idx_shape: vec![5, 0],
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "topk",
    );
    // n_group must divide E.
    assert_err(
        moe_gate(Gate {
            n_group: 7,
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "n_group",
    );
    assert_err(
        moe_gate(Gate {
            n_group: 0,
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "n_group",
    );
    // One expert per group: no top-2 group score.
    assert_err(
        moe_gate(Gate {
            n_group: 256,
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "n_group",
    );
    assert_err(
        moe_gate(Gate {
            topk_group: 9,
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "topk_group",
    );
    assert_err(
        moe_gate(Gate {
            topk_group: 0,
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "topk_group",
    );
    assert_err(
        moe_gate(Gate {
            bias: Some((F32, vec![255])),
            ..good_gate()
        }),
        V::Shape,
        "moe_gate",
        "bias",
    );
    assert_err(
        moe_gate(Gate {
            bias: Some((BF16, vec![256])),
            ..good_gate()
        }),
        V::DType,
        "moe_gate",
        "bias",
    );
    assert_err(
        moe_gate(Gate {
            idx_shape: vec![5, 9],
            ..good_gate()
        }),
        V::Shape,
        "moe_gate",
        "topk_idx",
    );
    assert_err(
        moe_gate(Gate {
            route_scale: f32::INFINITY,
            ..good_gate()
        }),
        V::Invalid,
        "moe_gate",
        "route_scale",
    );
}

#[test]
fn embedding_validation() {
    let check = |ids: (DType, &[usize]), out: &[usize]| {
        let (table, ids, mut o) = (t(BF16, &[100, 16]), t(ids.0, ids.1), t(BF16, out));
        Embedding {
            table: &table,
            ids: &ids,
            out: &mut o,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = check((I32, &[7]), &[7, 16]).unwrap();
    assert_eq!((d.vocab, d.dim, d.tokens), (100, 16, 7));
    assert_err(
        check((I32, &[2, 3]), &[6, 16]),
        V::Shape,
        "embedding",
        "ids",
    );
    assert_err(check((I32, &[]), &[1, 16]), V::Shape, "embedding", "ids");
    assert_err(check((F32, &[7]), &[7, 16]), V::DType, "embedding", "ids");
    assert_err(check((I64, &[7]), &[7, 15]), V::Shape, "embedding", "out");
}

// ---- expert parallelism --------------------------------------------------------

#[test]
fn get_dispatch_layout_validation() {
    let check = |world: usize, experts: usize, rank_shape: &[usize], in_rank: (DType, &[usize])| {
        let idx = t(I64, &[6, 8]);
        let (mut r, mut e, mut ir) = (
            t(I32, rank_shape),
            t(I32, &[experts]),
            t(in_rank.0, in_rank.1),
        );
        GetDispatchLayout {
            topk_idx: &idx,
            num_tokens_per_rank: &mut r,
            num_tokens_per_expert: &mut e,
            is_token_in_rank: &mut ir,
            num_experts: experts,
            world_size: world,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = check(4, 32, &[4], (Bool, &[6, 4])).unwrap();
    assert_eq!(
        (d.tokens, d.topk, d.num_experts, d.world_size),
        (6, 8, 32, 4)
    );
    assert_err(
        check(3, 32, &[3], (Bool, &[6, 3])),
        V::Invalid,
        "get_dispatch_layout",
        "num_experts",
    );
    assert_err(
        check(0, 32, &[0], (Bool, &[6, 0])),
        V::Invalid,
        "get_dispatch_layout",
        "world_size",
    );
    assert_err(
        check(4, 32, &[4], (I32, &[6, 4])),
        V::DType,
        "get_dispatch_layout",
        "is_token_in_rank",
    );
    assert_err(
        check(4, 32, &[5], (Bool, &[6, 4])),
        V::Shape,
        "get_dispatch_layout",
        "num_tokens_per_rank",
    );
}

fn dispatch(
    x: (DType, &[usize]),
    scales: Option<(DType, &[usize])>,
    idx: &[usize],
    w: &[usize],
) -> Result<DispatchDims> {
    let xt = t(x.0, x.1);
    let st = scales.map(|(d, s)| t(d, s));
    let (it, wt) = (t(I64, idx), t(F32, w));
    Dispatch {
        x: &xt,
        x_scales: st.as_ref(),
        topk_idx: &it,
        topk_weights: &wt,
        num_experts: 16,
        expert_alignment: 1,
    }
    .check()
    .map(|c| c.dims().clone())
}

#[test]
fn dispatch_validation() {
    let d = dispatch((BF16, &[8, 256]), None, &[8, 4], &[8, 4]).unwrap();
    assert_eq!((d.tokens, d.hidden, d.topk, d.num_experts), (8, 256, 4, 16));
    let d = dispatch((E4M3, &[8, 256]), Some((F32, &[8, 2])), &[8, 4], &[8, 4]).unwrap();
    assert_eq!(d.hidden, 256);
    // FP8 payload with scales of the wrong shape.
    let e = assert_err(
        dispatch((E4M3, &[8, 256]), Some((F32, &[8, 3])), &[8, 4], &[8, 4]),
        V::Shape,
        "dispatch",
        "x_scales",
    );
    assert!(e.to_string().contains("[8, 2]"), "{e}");
    assert_err(
        dispatch((E4M3, &[8, 256]), Some((F32, &[2, 8])), &[8, 4], &[8, 4]),
        V::Shape,
        "dispatch",
        "x_scales",
    );
    assert_err(
        dispatch((E4M3, &[8, 256]), Some((BF16, &[8, 2])), &[8, 4], &[8, 4]),
        V::DType,
        "dispatch",
        "x_scales",
    );
    // FP8 payload without any scales.
    assert_err(
        dispatch((E4M3, &[8, 256]), None, &[8, 4], &[8, 4]),
        V::DType,
        "dispatch",
        "x",
    );
    // bf16 payload with scales.
    assert_err(
        dispatch((BF16, &[8, 256]), Some((F32, &[8, 2])), &[8, 4], &[8, 4]),
        V::DType,
        "dispatch",
        "x",
    );
    assert_err(
        dispatch((E4M3, &[8, 200]), Some((F32, &[8, 2])), &[8, 4], &[8, 4]),
        V::Invalid,
        "dispatch",
        "x",
    );
    assert_err(
        dispatch((BF16, &[8, 256]), None, &[7, 4], &[8, 4]),
        V::Shape,
        "dispatch",
        "topk_idx",
    );
    assert_err(
        dispatch((BF16, &[8, 256]), None, &[8, 4], &[8, 3]),
        V::Shape,
        "dispatch",
        "topk_weights",
    );
}

#[test]
fn combine_validation() {
    let handle = DispatchHandle {
        rank: 0,
        world_size: 2,
        num_tokens: 5,
        recv_src: vec![(0, 0), (0, 3), (1, 2)],
        send_plan: vec![vec![0, 3], vec![1]],
        state: Default::default(),
    };
    let check = |x: &[usize], out: &[usize]| {
        let (xt, mut o) = (t(BF16, x), t(BF16, out));
        Combine {
            x: &xt,
            handle: &handle,
            out: &mut o,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = check(&[3, 64], &[5, 64]).unwrap();
    assert_eq!((d.num_recv, d.hidden, d.tokens), (3, 64, 5));
    assert_err(check(&[4, 64], &[5, 64]), V::Invalid, "combine", "x");
    assert_err(check(&[3, 64], &[3, 64]), V::Shape, "combine", "out");
}

fn ll_dispatch(
    n: usize,
    hidden: usize,
    max_tokens: usize,
    use_fp8: bool,
) -> Result<LowLatencyDims> {
    let (x, idx) = (t(BF16, &[n, hidden]), t(I64, &[n, 8]));
    LowLatencyDispatch {
        x: &x,
        topk_idx: &idx,
        num_experts: 32,
        max_tokens_per_rank: max_tokens,
        use_fp8,
        ue8m0: false,
    }
    .check()
    .map(|c| c.dims().clone())
}

#[test]
fn low_latency_validation() {
    let d = ll_dispatch(8, 256, 8, true).unwrap();
    assert_eq!((d.tokens, d.hidden, d.topk, d.num_experts), (8, 256, 8, 32));
    ll_dispatch(0, 256, 8, false).unwrap();
    let e = assert_err(
        ll_dispatch(9, 256, 8, false),
        V::Invalid,
        "low_latency_dispatch",
        "x",
    );
    assert!(e.to_string().contains("max_tokens_per_rank"), "{e}");
    // FP8 needs hidden % 128 == 0; bf16 does not.
    ll_dispatch(4, 200, 8, false).unwrap();
    assert_err(
        ll_dispatch(4, 200, 8, true),
        V::Invalid,
        "low_latency_dispatch",
        "x",
    );

    let handle = LowLatencyHandle {
        rank: 1,
        world_size: 2,
        num_experts: 8,
        num_tokens: 3,
        max_tokens_per_rank: 4,
        hidden: 128,
        recv_src: vec![vec![]; 4],
        state: Default::default(),
    };
    let check = |x: &[usize], idx: &[usize], w: &[usize], out: &[usize]| {
        let (xt, it, wt, mut o) = (t(BF16, x), t(I64, idx), t(F32, w), t(BF16, out));
        LowLatencyCombine {
            x: &xt,
            topk_idx: &it,
            topk_weights: &wt,
            handle: &handle,
            out: &mut o,
        }
        .check()
        .map(|c| c.dims().clone())
    };
    let d = check(&[4, 8, 128], &[3, 2], &[3, 2], &[3, 128]).unwrap();
    assert_eq!((d.tokens, d.hidden, d.topk, d.num_experts), (3, 128, 2, 8));
    assert_err(
        check(&[4, 4, 128], &[3, 2], &[3, 2], &[3, 128]),
        V::Shape,
        "low_latency_combine",
        "x",
    );
    assert_err(
        check(&[4, 8, 128], &[4, 2], &[4, 2], &[3, 128]),
        V::Shape,
        "low_latency_combine",
        "topk_idx",
    );
    assert_err(
        check(&[4, 8, 128], &[3, 2], &[3, 1], &[3, 128]),
        V::Shape,
        "low_latency_combine",
        "topk_weights",
    );
    assert_err(
        check(&[4, 8, 128], &[3, 2], &[3, 2], &[3, 64]),
        V::Shape,
        "low_latency_combine",
        "out",
    );
}

#[test]
fn op_kind_names_round_trip() {
    for k in OpKind::ALL {
        assert_eq!(OpKind::parse(k.name()), Some(k));
        assert_eq!(OpKind::parse(&k.name().replace('_', "-")), Some(k));
    }
    assert_eq!(OpKind::parse("no_such_op"), None);
    assert_eq!(blocks128(576), 5);
    assert_eq!(blocks128(512), 4);
    assert_eq!(blocks128(0), 0);
    assert_eq!(blocks128(1), 1);
}

/// `tensors()` lists exactly the declared tensors, in declaration order
/// (an in-place tensor once, an absent optional one not at all).
#[track_caller]
fn assert_tensors_match_decl<A: OpArgs>(op: &A, absent: &[&str]) {
    let mut want: Vec<&str> = Vec::new();
    for t in A::DECL.tensors {
        if !want.contains(&t.name) && !absent.contains(&t.name) {
            want.push(t.name);
        }
    }
    let got: Vec<&str> = op.tensors().iter().map(|(n, _)| *n).collect();
    assert_eq!(got, want, "{}", A::KIND);
    assert_eq!(op.dtypes().len(), got.len());
}

#[test]
fn tensor_lists_follow_the_declarations() {
    let x = t(BF16, &[4, 16]);
    let w = t(BF16, &[16, 16]);
    let b = t(F32, &[16]);
    let mut idx = t(I64, &[4, 4]);
    let mut wt = t(F32, &[4, 4]);
    let mut gate = MoeGate {
        x: &x,
        weight: &w,
        bias: Some(&b),
        topk_idx: &mut idx,
        topk_weights: &mut wt,
        n_group: 4,
        topk_group: 2,
        topk: 4,
        route_scale: 1.0,
    };
    assert_tensors_match_decl(&gate, &[]);
    assert_eq!(gate.outputs_mut().len(), 2);
    gate.bias = None;
    assert_tensors_match_decl(&gate, &["bias"]);

    let src = t(F32, &[4, 16]);
    let mut dst = t(BF16, &[4, 16]);
    let copy = CopyWindow {
        src: &src,
        dst: &mut dst,
        src_origin: (0, 0),
        dst_origin: (0, 0),
        size: (4, 16),
    };
    assert_tensors_match_decl(&copy, &[]);

    let q = t(BF16, &[1, 1, 2, 576]);
    let kc = t(BF16, &[2, 64, 1, 576]);
    let bt = t(I32, &[1, 2]);
    let sl = t(I32, &[1]);
    let mut out = t(BF16, &[1, 1, 2, 512]);
    let mut lse = t(F32, &[1, 2, 1]);
    let dec = MlaDecode {
        q: &q,
        kcache: &kc,
        block_table: &bt,
        cache_seqlens: &sl,
        out: &mut out,
        lse: &mut lse,
        softmax_scale: 0.1,
        causal: false,
    };
    assert_tensors_match_decl(&dec, &[]);
    assert!(dec.check().is_ok());
    for k in OpKind::ALL {
        assert_eq!(k.decl().kind, k);
    }
}
