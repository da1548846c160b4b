//! Kernels: the WGSL body plus the bindings, constants and typed accessors
//! the host generates in front of it, the uniform parameters, and the
//! pipeline cache (one pipeline per shader name and generated header).

use super::device::{pop_scopes, push_scopes};
use super::{dev_err, Ctx, State, BACKEND};
use deepport_core::{DType, Error, Result};
use std::sync::Arc;

/// The generated entry point (`{call}` runs the kernel).
const ENTRY: &str = "\
@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    {call};
}
";

/// The generated kernel of [`Shader::per_word`]: one output word per
/// invocation, its lanes from the body's `lane(i)`.
const PER_WORD: &str = "\
fn per_invocation(w: u32) {
    let first = w * {OUT}_PER;
    if first >= {count} {
        return;
    }
    let bits = 32u / {OUT}_PER;
    let mask = dt_lane_mask({OUT}_DT);
    var word = 0u;
    for (var l = 0u; l < {OUT}_PER; l = l + 1u) {
        let i = first + l;
        if i < {count} {
            word = word | ((lane(i) & mask) << (l * bits));
        }
    }
    stw_{out}(w, word);
}
";

/// `store4_x` of an atomic output (see [`Shader`]).
const STORE4: &str = "\
fn store4_{n}(base: u32, c0: u32, n: u32, v: vec4<f32>) {
    var j = 0u;
    loop {
        if j >= 4u {
            break;
        }
        let c = c0 + j;
        if c >= n {
            break;
        }
        let e = base + c;
        if {N}_PER == 1u {
            stw_{n}(e, enc_{n}(v[j]));
            j = j + 1u;
        } else if (e & 1u) == 0u && j < 3u && c + 1u < n {
            // Both elements of this word are ours.
            stw_{n}(e / 2u, (enc_{n}(v[j]) & 0xffffu) | (enc_{n}(v[j + 1u]) << 16u));
            j = j + 2u;
        } else {
            st_{n}(e, v[j]);
            j = j + 1u;
        }
    }
}
";

/// The WGSL library prepended to every kernel.
pub(crate) const COMMON_WGSL: &str = include_str!("../shaders/common.wgsl");

/// The dtype code used by `common.wgsl`.
pub(crate) fn dtype_code(d: DType) -> Result<u32> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F8E4M3 => 3,
        DType::F8E4M3Fnuz => 4,
        DType::I32 => 5,
        DType::I64 => 6,
        DType::U8 | DType::Bool => 7,
        other => {
            return Err(Error::not_supported(
                BACKEND,
                "storage",
                format!("dtype {other} has no WGSL accessor"),
            ))
        }
    })
}

/// How a kernel binds a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `var<storage, read> b_NAME: array<u32>` and `ld_NAME(i)`.
    Read,
    /// `var<storage, read_write> b_NAME: array<u32>`: whole-word stores
    /// (`stw_NAME`), loads (`ld_NAME`, `ldw_NAME`).
    ReadWrite,
    /// `var<storage, read_write> b_NAME: array<atomic<u32>>`: per-element
    /// stores into shared words (`st_NAME(i, v)`), whole words (`stw_NAME`).
    Atomic,
    /// The op's status slot (`flag(entry, index)`); bound by [`Rec`].
    Status,
}

#[derive(Clone, Debug)]
pub(super) struct Bind {
    name: String,
    pub(super) access: Access,
    dtype: Option<DType>,
}

/// A WGSL kernel: a body (a `struct Params` and the kernel) plus the
/// bindings, constants, accessors and entry point the host generates in
/// front of it, so that no shader file repeats them.
///
/// The entry point `main` (workgroup size [`Shader::workgroup_size`],
/// default 256, also `WG_SIZE` in WGSL) is generated when the body defines
/// one of these, and is the body's own `main` otherwise:
///
/// * `fn per_invocation(i: u32)`: called with the linear invocation index
///   (`wg_lin(wid, nwg) * WG_SIZE + lid`); the kernel returns early past
///   its range;
/// * `fn per_workgroup(g: u32, lid: u32)`: called with the linear
///   workgroup index (uniform, so barriers may follow a uniform early
///   return) and `local_invocation_index`;
/// * with [`Shader::per_word`], `fn lane(i: u32) -> u32` (the output
///   bits of element `i`): the generated `per_invocation` packs the lanes
///   of one output word per invocation (no atomics for 8/16-bit outputs).
///
/// Binding 0 is `var<uniform> P: Params`; the buffers follow in the order
/// they were added. For a binding `x` with a dtype the header defines
/// `X_DT`, `X_PER` (elements per word) and accessors:
///
/// * float dtypes: `ld_x(i) -> f32`, and for outputs `enc_x(v) -> u32`
///   (lane bits), `stw_x(word, bits)`, `ldw_x(word)`; atomic outputs also
///   `st_x(i, v)` (one element, safe when other invocations write the other
///   lanes of its word);
///   Atomic outputs also get `store4_x(base, c0, n, v)`: stores the
///   elements `c0 + j < n` (j < 4) of `v` at `base + c0 + j`, whole words
///   where both 16-bit lanes are its own (the tiled GEMMs' row stores);
/// * index dtypes (i32/i64): `ldi_x(i) -> vec2<u32>` (lo, hi; i32 sign
///   extended), and for outputs `sti_x(i, v)`.
#[derive(Clone, Debug)]
pub(crate) struct Shader {
    pub(crate) name: &'static str,
    body: &'static str,
    pub(super) binds: Vec<Bind>,
    consts: Vec<(String, String)>,
    workgroup: u32,
    per_word: Option<(String, String)>,
}

impl Shader {
    pub(crate) fn new(name: &'static str, body: &'static str) -> Self {
        Self {
            name,
            body,
            binds: Vec::new(),
            consts: Vec::new(),
            workgroup: 256,
            per_word: None,
        }
    }
    /// The workgroup size of the generated entry point (default 256).
    pub(crate) fn workgroup_size(mut self, n: u32) -> Self {
        self.workgroup = n;
        self
    }
    /// One invocation per word of the output `out`, over `count` elements
    /// (a WGSL expression such as `P.total`); the body defines `lane`.
    pub(crate) fn per_word(mut self, out: &str, count: &str) -> Self {
        self.per_word = Some((out.to_string(), count.to_string()));
        self
    }
    fn bind(mut self, name: &str, access: Access, dtype: Option<DType>) -> Self {
        self.binds.push(Bind {
            name: name.to_string(),
            access,
            dtype,
        });
        self
    }
    /// A read-only tensor of `dtype`.
    pub(crate) fn input(self, name: &str, dtype: DType) -> Self {
        self.bind(name, Access::Read, Some(dtype))
    }
    /// An output written in whole words by the invocation that owns them.
    pub(crate) fn output(self, name: &str, dtype: DType) -> Self {
        self.bind(name, Access::ReadWrite, Some(dtype))
    }
    /// An output written element by element with atomics.
    pub(crate) fn atomic_output(self, name: &str, dtype: DType) -> Self {
        self.bind(name, Access::Atomic, Some(dtype))
    }
    /// A raw `array<u32>` (scratch), read-only or read-write.
    pub(crate) fn raw(self, name: &str, writable: bool) -> Self {
        let a = if writable {
            Access::ReadWrite
        } else {
            Access::Read
        };
        self.bind(name, a, None)
    }
    /// The op's status slot (see [`super::Rec::flag_entry`]).
    pub(crate) fn status(self) -> Self {
        self.bind("status", Access::Status, None)
    }
    /// `const NAME = value;` (`value` is WGSL, e.g. `256u`, `true`).
    pub(crate) fn constant(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.consts.push((name.to_string(), value.to_string()));
        self
    }

    pub(super) fn has_status(&self) -> bool {
        self.binds.iter().any(|b| b.access == Access::Status)
    }

    /// The generated declarations; with the name, the pipeline cache key.
    fn header(&self) -> Result<String> {
        use std::fmt::Write;
        let mut h = String::from("// generated by deepport-wgpu\n");
        for (n, v) in &self.consts {
            let _ = writeln!(h, "const {n} = {v};");
        }
        let _ = writeln!(h, "@group(0) @binding(0) var<uniform> P: Params;");
        for (i, b) in self.binds.iter().enumerate() {
            let slot = i + 1;
            let n = &b.name;
            let up = n.to_uppercase();
            match b.access {
                Access::Status => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read_write> b_status: array<atomic<u32>, 64>;\n\
                         fn flag(entry: u32, idx: u32) {{ atomicMax(&b_status[entry * 4u], 0xffffffffu - idx); }}"
                    );
                    continue;
                }
                Access::Read => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read> b_{n}: array<u32>;"
                    );
                }
                Access::ReadWrite => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read_write> b_{n}: array<u32>;"
                    );
                }
                Access::Atomic => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read_write> b_{n}: array<atomic<u32>>;"
                    );
                }
            }
            let Some(dt) = b.dtype else { continue };
            let code = dtype_code(dt)?;
            let per = match dt.size() {
                1 => 4,
                2 => 2,
                _ => 1,
            };
            let _ = writeln!(h, "const {up}_DT = {code}u;\nconst {up}_PER = {per}u;");
            let word = |w: &str| match b.access {
                Access::Atomic => format!("atomicLoad(&b_{n}[{w}])"),
                _ => format!("b_{n}[{w}]"),
            };
            if dt.is_index() {
                let ld = if dt == DType::I64 {
                    format!(
                        "return vec2<u32>({}, {});",
                        word("2u * i"),
                        word("2u * i + 1u")
                    )
                } else {
                    format!(
                        "let v = {}; return vec2<u32>(v, select(0u, 0xffffffffu, (v >> 31u) == 1u));",
                        word("i")
                    )
                };
                let _ = writeln!(h, "fn ldi_{n}(i: u32) -> vec2<u32> {{ {ld} }}");
                if b.access != Access::Read {
                    let st = match (b.access, dt) {
                        (Access::Atomic, DType::I64) => format!(
                            "atomicStore(&b_{n}[2u * i], v.x); atomicStore(&b_{n}[2u * i + 1u], v.y);"
                        ),
                        (Access::Atomic, _) => format!("atomicStore(&b_{n}[i], v.x);"),
                        (_, DType::I64) => {
                            format!("b_{n}[2u * i] = v.x; b_{n}[2u * i + 1u] = v.y;")
                        }
                        _ => format!("b_{n}[i] = v.x;"),
                    };
                    let _ = writeln!(h, "fn sti_{n}(i: u32, v: vec2<u32>) {{ {st} }}");
                }
                continue;
            }
            let _ = writeln!(
                h,
                "fn ld_{n}(i: u32) -> f32 {{ return dt_decode({code}u, dt_lane({code}u, {}, i)); }}",
                word(&format!("i / {per}u"))
            );
            match b.access {
                Access::ReadWrite => {
                    let _ = writeln!(
                        h,
                        "fn enc_{n}(v: f32) -> u32 {{ return dt_encode({code}u, v); }}\n\
                         fn ldw_{n}(w: u32) -> u32 {{ return b_{n}[w]; }}\n\
                         fn stw_{n}(w: u32, bits: u32) {{ b_{n}[w] = bits; }}"
                    );
                }
                Access::Atomic => {
                    let st = if per == 1 {
                        format!("atomicStore(&b_{n}[i], dt_encode({code}u, v));")
                    } else {
                        let bits = 32 / per;
                        format!(
                            "let w = i / {per}u; let sh = (i % {per}u) * {bits}u; \
                             let m = {mask}u << sh; \
                             atomicAnd(&b_{n}[w], ~m); \
                             atomicOr(&b_{n}[w], (dt_encode({code}u, v) << sh) & m);",
                            mask = (1u32 << bits) - 1
                        )
                    };
                    let _ = writeln!(
                        h,
                        "fn enc_{n}(v: f32) -> u32 {{ return dt_encode({code}u, v); }}\n\
                         fn stw_{n}(w: u32, bits: u32) {{ atomicStore(&b_{n}[w], bits); }}\n\
                         fn st_{n}(i: u32, v: f32) {{ {st} }}"
                    );
                    let _ = write!(h, "{}", STORE4.replace("{n}", n).replace("{N}", &up));
                }
                _ => {}
            }
        }
        let _ = writeln!(h, "const WG_SIZE = {}u;", self.workgroup);
        if let Some((out, count)) = &self.per_word {
            let _ = write!(
                h,
                "{}",
                PER_WORD
                    .replace("{out}", out)
                    .replace("{OUT}", &out.to_uppercase())
                    .replace("{count}", count)
            );
        }
        if self.per_word.is_some() || self.body.contains("fn per_invocation(") {
            h.push_str(
                &ENTRY.replace("{call}", "per_invocation(wg_lin(wid, nwg) * WG_SIZE + lid)"),
            );
        } else if self.body.contains("fn per_workgroup(") {
            h.push_str(&ENTRY.replace("{call}", "per_workgroup(wg_lin(wid, nwg), lid)"));
        }
        Ok(h)
    }

    fn layout_entries(&self) -> Vec<wgpu::BindGroupLayoutEntry> {
        let mut v = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, b) in self.binds.iter().enumerate() {
            v.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: b.access == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        v
    }
}

/// A kernel's uniform parameters, little-endian, in the field order of its
/// WGSL `struct Params` (scalars only: u32, i32, f32).
#[derive(Clone, Debug, Default)]
pub(crate) struct Params(pub(super) Vec<u8>);

impl Params {
    pub(crate) fn new() -> Self {
        Self::default()
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    #[allow(dead_code)] // for kernels with signed parameters
    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// A compiled kernel.
pub(super) struct Pipe {
    pub(super) pipeline: wgpu::ComputePipeline,
    pub(super) layout: wgpu::BindGroupLayout,
}

impl Ctx {
    /// The cached pipeline of `shader`, compiled on first use.
    pub(super) fn pipeline(&self, st: &mut State, op: &str, shader: &Shader) -> Result<Arc<Pipe>> {
        let header = shader.header()?;
        let key = (shader.name, header);
        if let Some(p) = st.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let source = format!("{}\n{}\n{}", key.1, COMMON_WGSL, shader.body);
        let p = self.compile(op, shader.name, &source, &shader.layout_entries())?;
        let p = Arc::new(p);
        st.pipelines.insert(key, p.clone());
        Ok(p)
    }

    fn compile(
        &self,
        op: &str,
        name: &str,
        source: &str,
        entries: &[wgpu::BindGroupLayoutEntry],
    ) -> Result<Pipe> {
        let mut scopes = push_scopes(&self.device);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(name),
                entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(name),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: Some(&pl),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!(
                "{op}: shader `{name}` failed to compile: {e}"
            )));
        }
        Ok(Pipe { pipeline, layout })
    }

    /// Compiles a WGSL kernel outside the cache (test hook).
    pub(crate) fn compile_only(&self, name: &str, body: &str) -> Result<()> {
        self.check_alive("compile")?;
        // A shader without bindings: the uniform block and the constants.
        let bare = Shader::new("compile", "");
        let source = format!("{}\n{COMMON_WGSL}\n{body}", bare.header()?);
        let entries = bare.layout_entries();
        self.compile("compile", name, &source, &entries).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_declares_bindings_and_accessors() {
        let sh = Shader::new("t", "")
            .constant("OP", "1u")
            .input("x", DType::BF16)
            .input("ids", DType::I64)
            .output("y", DType::F8E4M3)
            .atomic_output("d", DType::F16)
            .raw("tmp", true)
            .status();
        let h = sh.header().unwrap();
        for want in [
            "const OP = 1u;",
            "var<uniform> P: Params;",
            "@binding(1) var<storage, read> b_x: array<u32>;",
            "const X_DT = 2u;",
            "const X_PER = 2u;",
            "fn ld_x(i: u32) -> f32",
            "fn ldi_ids(i: u32) -> vec2<u32>",
            "@binding(3) var<storage, read_write> b_y: array<u32>;",
            "fn stw_y(",
            "fn enc_y(",
            "@binding(4) var<storage, read_write> b_d: array<atomic<u32>>;",
            "fn st_d(i: u32, v: f32)",
            "@binding(5) var<storage, read_write> b_tmp: array<u32>;",
            "@binding(6) var<storage, read_write> b_status",
            "fn flag(entry: u32, idx: u32)",
        ] {
            assert!(h.contains(want), "missing `{want}` in\n{h}");
        }
        assert_eq!(sh.layout_entries().len(), 7);
    }
}
