//! The launch contract between op glue (`ops/`) and the device context.
//!
//! Op glue never touches the driver: it asks a [`Cx`] for device pointers
//! of tensors, scratch buffers, status entries for deferred checks and
//! TMA descriptors, and launches a [`Kernel`] (an entry point of a
//! [`KernelSource`]) with plain [`Arg`]s. Kernels take their arguments as
//! separate scalars and pointers (no parameter structs), so the same
//! signature works under CUDA and HIP.

use deepport_core::backend::Tensor;
use deepport_core::Result;

/// Which devices a kernel source is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every supported NVIDIA GPU (sm_80 and later); also the source the
    /// ROCm backend compiles through `port.cuh`.
    Portable,
    /// Hopper only (`sm_90a`: wgmma, TMA, setmaxnreg).
    Sm90a,
}

/// One `.cu` file, embedded in the binary and compiled by NVRTC at run
/// time (cached per device architecture).
#[derive(Debug)]
pub struct KernelSource {
    /// File name under `backends/cuda/kernels/` (also the NVRTC program name).
    pub name: &'static str,
    /// The source text (`include_str!`).
    pub text: &'static str,
    pub target: Target,
    /// Every `extern "C" __global__` entry point the source defines.
    pub entries: &'static [&'static str],
}

/// An entry point of a kernel source.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub source: &'static KernelSource,
    pub entry: &'static str,
}

/// A split kernel for `mla_decode` that a device layer brings in place of
/// the portable one (the ROCm backend's MFMA kernel): it takes
/// `mla_decode_sm90`'s arguments and writes the same partials, between the
/// glue's `mla_metadata` and `mla_combine`.
#[derive(Clone, Copy, Debug)]
pub struct MlaSplitKernel {
    pub kernel: Kernel,
    /// Query rows per workgroup: one `s` and that many heads of one kv
    /// head (the device layer offers the kernel only when heads per kv
    /// head are a multiple of it).
    pub tile_rows: u32,
    /// Threads per workgroup.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

/// One kernel argument, passed by value.
#[derive(Clone, Debug)]
pub enum Arg {
    /// A device pointer (`T*` in the kernel).
    Ptr(u64),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    /// A TMA descriptor (`const __grid_constant__ CUtensorMap` in the
    /// kernel, 128 bytes, 64-byte aligned).
    TensorMap(Box<TensorMap>),
}

/// The 128 opaque bytes of a `CUtensorMap`.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub struct TensorMap(pub [u64; 16]);

/// The compute capability and limits of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Opt-in shared memory per block, bytes.
    pub smem_optin: u32,
}

impl Arch {
    /// Hopper (sm_90): the wgmma/TMA paths apply.
    pub fn is_hopper(&self) -> bool {
        self.major == 9 && self.minor == 0
    }
}

/// Launch geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    pub smem: u32,
}

/// What a deferred check requires of each element; the error surfaces at
/// the next `download`/`synchronize` (SPEC's asynchronous contract).
#[derive(Clone, Debug)]
pub enum CheckKind {
    /// Values must lie in `[lo, hi)` or equal `allow`.
    Range {
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    },
    /// Values must be finite.
    Finite,
}

/// TMA element types (`CUtensorMapDataType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaDtype {
    U8,
    U16,
    F32,
    Bf16,
}

/// TMA swizzle modes (`CUtensorMapSwizzle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaSwizzle {
    None,
    B32,
    B64,
    B128,
}

/// Parameters of `cuTensorMapEncodeTiled`, computed in plain Rust by the
/// op glue (and tested on the CPU); [`Cx::tensor_map`] encodes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmaParams {
    pub dtype: TmaDtype,
    /// Global base address (16-byte aligned).
    pub base: u64,
    /// Sizes, innermost first (rank 1..=5).
    pub dims: Vec<u64>,
    /// Byte strides of dims 1.. (multiples of 16), innermost first.
    pub strides: Vec<u64>,
    /// Box size per dim, innermost first (each ≤ 256).
    pub box_dims: Vec<u32>,
    pub swizzle: TmaSwizzle,
}

/// A stream-ordered temporary device buffer; freed when dropped, after the
/// work already queued on the stream.
pub struct Scratch {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    pub(crate) _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Scratch {
    /// A scratch buffer at `ptr` of `bytes` bytes; `keep` is dropped with
    /// it (the owner of the memory, which frees it stream-ordered), for
    /// other [`LaunchContext`] implementations.
    pub fn new(ptr: u64, bytes: usize, keep: Option<Box<dyn std::any::Any + Send + Sync>>) -> Self {
        Scratch {
            ptr,
            bytes,
            _keep: keep,
        }
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What every `ops/` function is given: one device, one stream, the
/// module cache. `device.rs` implements it on the driver; tests implement
/// it with a recorder, so launch geometry is checked on the CPU. The
/// contract:
///
/// * `arch()` — the device's compute capability and limits.
/// * `ptr(t)` / `ptr_mut(t)` — the device address of a tensor's first
///   element (a view's offset included).
/// * `scratch(bytes)` — a zero-filled stream-ordered temporary buffer.
/// * `check(op, arg, shape, kind)` — the address of one status entry
///   (a `unsigned long long`, zero-initialised) for `dp_flag` in
///   `port.cuh`; the error it records names `op`/`arg` and unravels the
///   flagged flat index over `shape`.
/// * `tensor_map(params)` — a TMA descriptor.
/// * `launch(kernel, grid, args)` — queue a kernel on the stream; compile
///   errors and launch failures are `Error::Device` naming the entry.
pub trait LaunchContext {
    fn arch(&self) -> Arch;
    fn ptr(&self, t: &Tensor) -> Result<u64>;
    fn ptr_mut(&self, t: &mut Tensor) -> Result<u64>;
    fn scratch(&self, bytes: usize) -> Result<Scratch>;
    fn check(
        &self,
        op: &'static str,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
    ) -> Result<u64>;
    fn tensor_map(&self, params: &TmaParams) -> Result<TensorMap>;
    fn launch(&self, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()>;
    /// The device's own MLA decode split kernel for these operands
    /// (`dtype` of `q`/`kcache`, their addresses), if it has one; `None`
    /// keeps the glue's choice (sm_90a's wgmma kernel on Hopper, else the
    /// portable one).
    fn mla_split_kernel(
        &self,
        _dtype: deepport_core::DType,
        _dims: &deepport_core::ops::MlaDecodeDims,
        _q: u64,
        _kcache: u64,
    ) -> Option<MlaSplitKernel> {
        None
    }
}
