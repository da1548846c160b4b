//! A host-memory [`Runtime`] for the tests: allocations are `Vec`s at
//! fake device addresses, copies and fills are real, a module is the list
//! of kernels of its code object (a real hiprtc ELF, read with
//! [`crate::elf`], or a `FAKE` list), and a launch is recorded after
//! checking that its function exists and every parameter pointer is
//! readable. Nothing executes; the tests check what reaches the runtime.

use crate::hip::{dev_err, DeviceDesc};
use crate::runtime::Runtime;
use crate::Rocm;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};
use deepport_cuda::launch::KernelSource;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct Launch {
    pub entry: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
    pub params: usize,
}

#[derive(Default)]
struct State {
    mem: BTreeMap<u64, Vec<u8>>,
    next: u64,
    allocs: Vec<u64>,
    freed: Vec<u64>,
    modules: Vec<Vec<String>>,
    unloaded: Vec<usize>,
    functions: Vec<String>,
    launches: Vec<Launch>,
    syncs: usize,
}

#[derive(Default)]
pub struct Fake(Mutex<State>);

impl Fake {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn launches(&self) -> Vec<Launch> {
        self.st().launches.clone()
    }
    pub fn allocs(&self) -> Vec<u64> {
        self.st().allocs.clone()
    }
    pub fn freed(&self) -> Vec<u64> {
        self.st().freed.clone()
    }
    pub fn modules_loaded(&self) -> usize {
        self.st().modules.len()
    }
    pub fn live(&self) -> usize {
        self.st().mem.len()
    }
    /// Writes device memory directly (what a kernel would have written).
    pub fn poke(&self, addr: u64, bytes: &[u8]) {
        let mut st = self.st();
        let (base, buf) = st
            .mem
            .range_mut(..=addr)
            .next_back()
            .expect("poke outside any allocation");
        let off = (addr - base) as usize;
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }
    fn with<T>(&self, addr: u64, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> Result<T> {
        let mut st = self.st();
        let Some((base, buf)) = st.mem.range_mut(..=addr).next_back() else {
            return Err(dev_err(format!("fake: {addr:#x} is not device memory")));
        };
        let off = (addr - base) as usize;
        match buf.get_mut(off..off + len) {
            Some(s) => Ok(f(s)),
            None => Err(dev_err(format!(
                "fake: [{addr:#x}, +{len}) outside its {}-byte allocation",
                buf.len()
            ))),
        }
    }
}

impl Runtime for Fake {
    fn set_device(&self, device: usize) -> Result<()> {
        if device == 0 {
            Ok(())
        } else {
            Err(dev_err("fake: one device"))
        }
    }
    fn malloc(&self, bytes: usize) -> Result<u64> {
        let mut st = self.st();
        let base = 0x7f00_0000_0000 + st.next;
        st.next += (bytes as u64).div_ceil(4096) * 4096 + 4096;
        st.mem.insert(base, vec![0xa5; bytes]);
        st.allocs.push(base);
        Ok(base)
    }
    fn free(&self, ptr: u64) -> Result<()> {
        let mut st = self.st();
        match st.mem.remove(&ptr) {
            Some(_) => {
                st.freed.push(ptr);
                Ok(())
            }
            None => Err(dev_err(format!("fake: free of {ptr:#x}"))),
        }
    }
    unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        self.with(ptr, bytes, |s| s.fill(value))
    }
    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.with(dst, src.len(), |s| s.copy_from_slice(src))
    }
    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.with(src, dst.len(), |s| dst.copy_from_slice(s))
    }
    fn synchronize(&self) -> Result<()> {
        self.st().syncs += 1;
        Ok(())
    }
    fn load(&self, code: &[u8]) -> Result<usize> {
        let kernels = if let Some(list) = code.strip_prefix(b"FAKE\n") {
            String::from_utf8_lossy(list)
                .lines()
                .map(str::to_string)
                .collect()
        } else {
            crate::elf::parse(code)?.kernels
        };
        let mut st = self.st();
        st.modules.push(kernels);
        Ok(st.modules.len() - 1)
    }
    fn unload(&self, module: usize) -> Result<()> {
        self.st().unloaded.push(module);
        Ok(())
    }
    fn function(&self, module: usize, name: &str) -> Result<usize> {
        let mut st = self.st();
        let found = st
            .modules
            .get(module)
            .is_some_and(|k| k.iter().any(|k| k == name));
        if !found {
            return Err(dev_err(format!(
                "fake: no kernel {name} in module {module}"
            )));
        }
        st.functions.push(name.to_string());
        Ok(st.functions.len() - 1)
    }
    unsafe fn launch(
        &self,
        function: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        for &p in params.iter() {
            // SAFETY: the launch contract: each pointer addresses a live
            // parameter value of at least 4 bytes (the slots are 8).
            let _ = unsafe { std::ptr::read_volatile(p as *const u32) };
        }
        let mut st = self.st();
        let entry = st
            .functions
            .get(function)
            .cloned()
            .ok_or_else(|| dev_err("fake: unknown function"))?;
        st.launches.push(Launch {
            entry,
            grid,
            block,
            smem,
            params: params.len(),
        });
        Ok(())
    }
}

/// A code object that lists the source's declared entries.
pub fn fake_compiler(src: &'static KernelSource, _gfx: &str) -> Result<Arc<Vec<u8>>> {
    let mut v = b"FAKE\n".to_vec();
    v.extend_from_slice(src.entries.join("\n").as_bytes());
    Ok(Arc::new(v))
}

pub fn desc(gfx: &str) -> DeviceDesc {
    DeviceDesc {
        name: "fake MI".into(),
        gfx: gfx.into(),
        compute_units: 104,
        warp_size: 64,
        smem_per_block: 64 * 1024,
        cc: (9, 0),
    }
}

pub fn backend(gfx: &str, compiler: crate::device::Compiler) -> (Arc<Fake>, Rocm) {
    let fake = Arc::new(Fake::default());
    let b = Rocm::with_runtime(fake.clone(), 0, desc(gfx), compiler).unwrap();
    (fake, b)
}

fn up(b: &Rocm, dtype: DType, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect();
    b.upload(&HostTensor::from_f32(dtype, shape, &vals))
        .unwrap()
}

fn ids(b: &Rocm, shape: &[usize], v: &[i32]) -> Tensor {
    b.upload(&HostTensor::from_i32(shape, v)).unwrap()
}

/// Runs every local op (both FP8 formats, both MLA prefill forms) through the
/// CUDA glue on `b`; returns the errors of those that failed.
pub fn run_ops(b: &Rocm) -> Vec<String> {
    let mut errs = Vec::new();
    let mut note = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            errs.push(format!("{what}: {e}"));
        }
    };
    let (m, n, k) = (5, 200, 384);
    let x = up(b, DType::BF16, &[m, k]);
    let w = up(b, DType::F32, &[k]);
    let mut y = b.alloc(DType::BF16, &[m, k]).unwrap();
    note(
        "rms_norm",
        run(
            b,
            RmsNorm {
                x: &x,
                weight: &w,
                y: &mut y,
                eps: 1e-6,
            },
        ),
    );
    let mut sum = b.alloc(DType::BF16, &[m, k]).unwrap();
    note(
        "add",
        run(
            b,
            Add {
                a: &x,
                b: &y,
                out: &mut sum,
            },
        ),
    );
    note(
        "silu_mul",
        run(
            b,
            SiluMul {
                gate: &x,
                up: &y,
                out: &mut sum,
            },
        ),
    );
    let bw = up(b, DType::BF16, &[n, k]);
    let mut d = b.alloc(DType::BF16, &[m, n]).unwrap();
    note(
        "gemm",
        run(
            b,
            Gemm {
                a: &x,
                b: &bw,
                d: &mut d,
            },
        ),
    );
    for fp8 in [DType::F8E4M3, DType::F8E4M3Fnuz] {
        let mut q = b.alloc(fp8, &[m, k]).unwrap();
        let mut s = b.alloc(DType::F32, &[m, k.div_ceil(128)]).unwrap();
        note(
            "act_quant",
            run(
                b,
                ActQuant {
                    x: &x,
                    q: &mut q,
                    s: &mut s,
                    scale_fmt: ScaleFmt::Float,
                },
            ),
        );
        let qb = b.alloc(fp8, &[n, k]).unwrap();
        let sb = up(b, DType::F32, &[n.div_ceil(128), k.div_ceil(128)]);
        note(
            "fp8_gemm",
            run(
                b,
                Fp8Gemm {
                    a: &q,
                    sa: &s,
                    b: &qb,
                    sb: &sb,
                    d: &mut d,
                },
            ),
        );
        let mut deq = b.alloc(DType::BF16, &[n, k]).unwrap();
        note(
            "weight_dequant",
            run(
                b,
                WeightDequant {
                    w: &qb,
                    s: &sb,
                    out: &mut deq,
                },
            ),
        );
    }
    let table = up(b, DType::BF16, &[50, 64]);
    let tok = ids(b, &[4], &[1, 2, 3, 49]);
    let mut emb = b.alloc(DType::BF16, &[4, 64]).unwrap();
    note(
        "embedding",
        run(
            b,
            Embedding {
                table: &table,
                ids: &tok,
                out: &mut emb,
            },
        ),
    );
    let mut rows = b.alloc(DType::BF16, &[4, k]).unwrap();
    let idx = ids(b, &[4], &[0, 4, 2, 1]);
    note(
        "gather_rows",
        run(
            b,
            GatherRows {
                src: &x,
                index: &idx,
                dst: &mut rows,
            },
        ),
    );
    let mut red = b.alloc(DType::BF16, &[2, k]).unwrap();
    let ridx = ids(b, &[2, 2], &[0, 1, 3, -1]);
    note(
        "reduce_rows",
        run(
            b,
            ReduceRows {
                src: &x,
                index: &ridx,
                weights: None,
                out: &mut red,
            },
        ),
    );
    let mut win = b.alloc(DType::BF16, &[8, k]).unwrap();
    note(
        "copy_window",
        run(
            b,
            CopyWindow {
                src: &x,
                dst: &mut win,
                src_origin: (1, 0),
                dst_origin: (2, 128),
                size: (3, 200),
            },
        ),
    );
    let pos = ids(b, &[m], &[0, 1, 2, 3, 4]);
    let xr = up(b, DType::BF16, &[m, 4, 64]);
    let mut yr = b.alloc(DType::BF16, &[m, 4, 64]).unwrap();
    note(
        "rope",
        run(
            b,
            Rope {
                x: &xr,
                positions: &pos,
                y: &mut yr,
                config: RopeConfig::default(),
            },
        ),
    );
    let experts = 64;
    let gw = up(b, DType::BF16, &[experts, k]);
    let bias = up(b, DType::F32, &[experts]);
    let mut tk = b.alloc(DType::I64, &[m, 8]).unwrap();
    let mut tw = b.alloc(DType::F32, &[m, 8]).unwrap();
    note(
        "moe_gate",
        run(
            b,
            MoeGate {
                x: &x,
                weight: &gw,
                bias: Some(&bias),
                topk_idx: &mut tk,
                topk_weights: &mut tw,
                n_group: 8,
                topk_group: 4,
                topk: 8,
                route_scale: 2.5,
            },
        ),
    );
    let mut per_rank = b.alloc(DType::I32, &[4]).unwrap();
    let mut per_expert = b.alloc(DType::I32, &[experts]).unwrap();
    let mut in_rank = b.alloc(DType::Bool, &[m, 4]).unwrap();
    note(
        "get_dispatch_layout",
        run(
            b,
            GetDispatchLayout {
                topk_idx: &tk,
                num_tokens_per_rank: &mut per_rank,
                num_tokens_per_expert: &mut per_expert,
                is_token_in_rank: &mut in_rank,
                num_experts: experts,
                world_size: 4,
            },
        ),
    );
    // Grouped GEMMs: 3 groups; contiguous rows tagged per group (-1 pads).
    let g = 3;
    let gb = up(b, DType::BF16, &[g, n, k]);
    let mi = ids(b, &[m], &[0, 0, 2, -1, 1]);
    let mut gd = b.alloc(DType::BF16, &[m, n]).unwrap();
    note(
        "gemm_grouped_contiguous",
        run(
            b,
            GemmGroupedContiguous {
                a: &x,
                b: &gb,
                m_indices: &mi,
                d: &mut gd,
            },
        ),
    );
    let xm = up(b, DType::BF16, &[g, m, k]);
    let mm = ids(b, &[g], &[5, 0, 3]);
    let mut md = b.alloc(DType::BF16, &[g, m, n]).unwrap();
    note(
        "gemm_grouped_masked",
        run(
            b,
            GemmGroupedMasked {
                a: &xm,
                b: &gb,
                masked_m: &mm,
                d: &mut md,
            },
        ),
    );
    for fp8 in [DType::F8E4M3, DType::F8E4M3Fnuz] {
        let kb = k.div_ceil(128);
        let qa = b.alloc(fp8, &[m, k]).unwrap();
        let sa = up(b, DType::F32, &[m, kb]);
        let qb = b.alloc(fp8, &[g, n, k]).unwrap();
        let sb = up(b, DType::F32, &[g, n.div_ceil(128), kb]);
        note(
            "fp8_grouped_contiguous",
            run(
                b,
                Fp8GroupedContiguous {
                    a: &qa,
                    sa: &sa,
                    b: &qb,
                    sb: &sb,
                    m_indices: &mi,
                    d: &mut gd,
                },
            ),
        );
        let qam = b.alloc(fp8, &[g, m, k]).unwrap();
        let sam = up(b, DType::F32, &[g, m, kb]);
        note(
            "fp8_grouped_masked",
            run(
                b,
                Fp8GroupedMasked {
                    a: &qam,
                    sa: &sam,
                    b: &qb,
                    sb: &sb,
                    masked_m: &mm,
                    d: &mut md,
                },
            ),
        );
    }
    // MLA prefill, both forms: T = 5 queries over S = 7 latent rows.
    let (t, s_len, heads, dn, dr, dc, dvh) = (5, 7, 2, 128, 64, 512, 128);
    let qn = up(b, DType::BF16, &[t, heads, dn]);
    let qp = up(b, DType::BF16, &[t, heads, dr]);
    let lat = up(b, DType::BF16, &[s_len, dc]);
    let kp = up(b, DType::BF16, &[s_len, dr]);
    let wkv = up(b, DType::BF16, &[heads * (dn + dvh), dc]);
    for form in [MlaForm::Naive, MlaForm::Absorbed] {
        let mut po = b.alloc(DType::BF16, &[t, heads, dvh]).unwrap();
        note(
            "mla_prefill",
            run(
                b,
                MlaPrefill {
                    q_nope: &qn,
                    q_pe: &qp,
                    latent: &lat,
                    k_pe: &kp,
                    wkv_b: &wkv,
                    out: &mut po,
                    softmax_scale: 0.07,
                    form,
                },
            ),
        );
    }
    let (bsz, h, dk, dv, bs, blocks) = (2, 16, 576, 512, 64, 3);
    let q = up(b, DType::BF16, &[bsz, 1, h, dk]);
    let kc = up(b, DType::BF16, &[6, bs, 1, dk]);
    let bt = ids(b, &[bsz, blocks], &[0, 1, 2, 3, 4, 5]);
    let lens = ids(b, &[bsz], &[100, 150]);
    let mut out = b.alloc(DType::BF16, &[bsz, 1, h, dv]).unwrap();
    let mut lse = b.alloc(DType::F32, &[bsz, h, 1]).unwrap();
    note(
        "mla_decode",
        run(
            b,
            MlaDecode {
                q: &q,
                kcache: &kc,
                block_table: &bt,
                cache_seqlens: &lens,
                out: &mut out,
                lse: &mut lse,
                softmax_scale: 0.1,
                causal: true,
            },
        ),
    );
    errs
}

/// The status entries' base: the first allocation of a fresh backend.
pub fn status_of(fake: &Fake) -> u64 {
    fake.allocs()[0]
}
