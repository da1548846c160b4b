//! The scalar parameters of each op as the header lists them: (name,
//! value) pairs, every value an f64 (integers and booleans exact, choices
//! by index).

use deepport_core::ops::*;
use std::ffi::CStr;

pub type Params = Vec<(&'static CStr, f64)>;

/// The parameters an op passes to a plugin.
pub trait PluginParams {
    fn params(&self) -> Params {
        Vec::new()
    }
}

macro_rules! none {
    ($($t:ident),*) => {$(impl PluginParams for $t<'_> {})*};
}
none!(
    WeightDequant,
    Fp8Gemm,
    Fp8GroupedContiguous,
    Fp8GroupedMasked,
    Gemm,
    GemmGroupedContiguous,
    GemmGroupedMasked,
    SiluMul,
    Embedding,
    Add,
    GatherRows,
    ReduceRows,
    IndexerLogits
);

impl PluginParams for IndexerTopk<'_> {
    fn params(&self) -> Params {
        vec![(
            c"topk",
            self.indices.shape().get(1).copied().unwrap_or(0) as f64,
        )]
    }
}

impl PluginParams for SparseMlaDecode<'_> {
    fn params(&self) -> Params {
        vec![(c"softmax_scale", self.softmax_scale as f64)]
    }
}

impl PluginParams for SparseMlaPrefill<'_> {
    fn params(&self) -> Params {
        vec![(c"softmax_scale", self.softmax_scale as f64)]
    }
}

impl PluginParams for CacheQuant<'_> {
    fn params(&self) -> Params {
        let layout = match self.layout {
            CacheLayout::Index => 0.0,
            CacheLayout::Latent => 1.0,
        };
        vec![
            (c"layout", layout),
            (c"ue8m0", if self.ue8m0 { 1.0 } else { 0.0 }),
        ]
    }
}

impl PluginParams for ActQuant<'_> {
    fn params(&self) -> Params {
        let fmt = match self.scale_fmt {
            ScaleFmt::Float => 0.0,
            ScaleFmt::Ue8m0 => 1.0,
        };
        vec![(c"scale_fmt", fmt)]
    }
}

impl PluginParams for RmsNorm<'_> {
    fn params(&self) -> Params {
        vec![(c"eps", self.eps as f64)]
    }
}

impl PluginParams for Rope<'_> {
    fn params(&self) -> Params {
        let c = &self.config;
        let mut v = vec![(c"theta", c.theta as f64)];
        match &c.yarn {
            None => v.push((c"yarn", 0.0)),
            Some(y) => v.extend([
                (c"yarn", 1.0),
                (c"yarn_factor", y.factor as f64),
                (
                    c"yarn_original_max_position_embeddings",
                    y.original_max_position_embeddings as f64,
                ),
                (c"yarn_beta_fast", y.beta_fast as f64),
                (c"yarn_beta_slow", y.beta_slow as f64),
                (c"yarn_mscale", y.mscale as f64),
                (c"yarn_mscale_all_dim", y.mscale_all_dim as f64),
            ]),
        }
        let layout = match c.layout {
            RopeLayout::Interleaved => 0.0,
            RopeLayout::Half => 1.0,
        };
        v.push((c"layout", layout));
        v
    }
}

impl PluginParams for MoeGate<'_> {
    fn params(&self) -> Params {
        vec![
            (c"n_group", self.n_group as f64),
            (c"topk_group", self.topk_group as f64),
            (c"topk", self.topk as f64),
            (c"route_scale", self.route_scale as f64),
        ]
    }
}

impl PluginParams for MlaDecode<'_> {
    fn params(&self) -> Params {
        vec![
            (c"softmax_scale", self.softmax_scale as f64),
            (c"causal", if self.causal { 1.0 } else { 0.0 }),
        ]
    }
}

impl PluginParams for MlaPrefill<'_> {
    fn params(&self) -> Params {
        let form = match self.form {
            MlaForm::Naive => 0.0,
            MlaForm::Absorbed => 1.0,
        };
        vec![
            (c"softmax_scale", self.softmax_scale as f64),
            (c"form", form),
        ]
    }
}

impl PluginParams for CopyWindow<'_> {
    fn params(&self) -> Params {
        vec![
            (c"src_row", self.src_origin.0 as f64),
            (c"src_col", self.src_origin.1 as f64),
            (c"dst_row", self.dst_origin.0 as f64),
            (c"dst_col", self.dst_origin.1 as f64),
            (c"rows", self.size.0 as f64),
            (c"cols", self.size.1 as f64),
        ]
    }
}

impl PluginParams for GetDispatchLayout<'_> {
    fn params(&self) -> Params {
        vec![
            (c"num_experts", self.num_experts as f64),
            (c"world_size", self.world_size as f64),
        ]
    }
}
