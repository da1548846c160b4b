//! `cache_quant` (spec-v32 §9.4): the writers of DeepSeek-V3.2's FP8
//! caches, bit-exact with cpu-ref. Pass 1 (`cache_scale.wgsl`) computes
//! each group's scale (and the index layout's reciprocal) into scratch;
//! pass 2 (`cache_quant.wgsl`) writes every word of the cache from them.
//! Non-finite keys are reported by the deferred finite check.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const SCALE: &str = include_str!("../shaders/cache_scale.wgsl");
const QUANT: &str = include_str!("../shaders/cache_quant.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.cache_quant = Some(cache_quant);
}

fn cache_quant(w: &Wgpu, op: &mut Checked<CacheQuant<'_>>) -> Result<()> {
    const OP: &str = "cache_quant";
    let (a, d) = op.parts();
    let tokens = d.num_blocks * d.block_size;
    let latent = a.layout == CacheLayout::Latent;
    let (per_token, glen) = if latent {
        (V32_NOPE / QBLOCK, QBLOCK)
    } else {
        (1, d.d)
    };
    let ngroups = u32_of(OP, "groups", tokens.saturating_mul(per_token))?;
    u32_of(OP, "x (elements)", tokens.saturating_mul(d.d))?;
    let bytes = u32_of(
        OP,
        "cache (bytes)",
        tokens.saturating_mul(d.token_bytes).saturating_add(3),
    )?;
    let mut rec = w.ctx.begin(OP)?;
    // A NaN or inf would poison its group's scale without a trace.
    rec.check_finite("x", a.x)?;
    if ngroups > 0 {
        let sc = rec.scratch(ngroups as u64 * 8)?;
        let sh = Shader::new("cache_scale", SCALE)
            .input("x", a.x.dtype())
            .raw("sc", true);
        let p = Params::new()
            .u32(ngroups)
            .u32(glen as u32)
            .u32(per_token as u32)
            .u32(d.d as u32)
            .u32(latent as u32)
            .u32(a.ue8m0 as u32);
        rec.dispatch(
            &sh,
            p,
            &[buffer(a.x)?, &sc],
            groups(ngroups, 256),
        )?;
        let bytes = bytes - 3;
        let words = bytes.div_ceil(4);
        let sh = Shader::new(OP, QUANT)
            .input("x", a.x.dtype())
            .raw("sc", false)
            .raw("cache", true);
        let p = Params::new()
            .u32(words)
            .u32(bytes)
            .u32(d.d as u32)
            .u32(d.block_size as u32)
            .u32(latent as u32);
        rec.dispatch(
            &sh,
            p,
            &[buffer(a.x)?, &sc, buffer(a.cache)?],
            groups(words, 256),
        )?;
    }
    rec.finish()
}
