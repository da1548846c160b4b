//! The Rust mirror of `plugin/include/deepport_plugin.h` (ABI version 1.1).
//! The test `header_matches` checks that the header lists the same op
//! fields in the same order.

use std::ffi::{c_char, c_void};

/// `DEEPPORT_PLUGIN_ABI_VERSION`.
pub const ABI_VERSION: u32 = 1;
/// `DEEPPORT_PLUGIN_ABI_MINOR`: the extensions this host knows.
pub const ABI_MINOR: u32 = 1;
/// `DEEPPORT_PLUGIN_EXT_ENTRY`: the optional symbol of the extensions.
pub const EXT_ENTRY_SYMBOL: &str = "deepport_plugin_ext";
/// `DEEPPORT_PLUGIN_ENTRY`.
pub const ENTRY_SYMBOL: &str = "deepport_plugin_entry";
/// Dimensions a descriptor may have (`DP_MAX_DIMS`).
pub const MAX_DIMS: usize = 8;

pub type Status = i32;
pub const DP_OK: Status = 0;
pub const DP_NOT_SUPPORTED: Status = 1;
pub const DP_INVALID_ARGUMENT: Status = 2;
pub const DP_INDEX_OUT_OF_RANGE: Status = 3;
pub const DP_OUT_OF_MEMORY: Status = 4;
pub const DP_DEVICE_ERROR: Status = 5;
pub const DP_NON_FINITE: Status = 6;

/// `dp_tensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DpTensor {
    pub handle: *mut c_void,
    pub offset_bytes: u64,
    pub dtype: i32,
    pub ndim: u32,
    pub shape: *const i64,
    pub strides: *const i64,
}

/// `dp_param`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DpParam {
    pub name: *const c_char,
    pub value: f64,
}

/// `dp_op_fn`.
pub type OpFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    tensors: *const DpTensor,
    n_tensors: u32,
    params: *const DpParam,
    n_params: u32,
) -> Status;

/// `dp_plugin_entry_fn`.
pub type EntryFn = unsafe extern "C" fn(host_abi_version: u32) -> *const VtableV1;

/// `dp_plugin_ext` (ABI 1.1). Read only within the plugin's `struct_size`.
#[repr(C)]
pub struct ExtV1 {
    pub abi_minor: u32,
    pub struct_size: u32,
    pub poll_error: Option<unsafe extern "C" fn(ctx: *mut c_void) -> Status>,
    pub set_stream: Option<unsafe extern "C" fn(ctx: *mut c_void, stream: *mut c_void) -> Status>,
}

/// `dp_plugin_ext_fn`.
pub type ExtEntryFn = unsafe extern "C" fn(host_abi_minor: u32) -> *const ExtV1;

macro_rules! vtable {
    ([] $($kind:ident => $method:ident),* $(,)?) => {
        /// `dp_plugin_v1`. Function pointers are `Option`: NULL is `None`.
        #[repr(C)]
        pub struct VtableV1 {
            pub abi_version: u32,
            pub struct_size: u32,
            pub name: *const c_char,
            pub vendor: *const c_char,
            pub device_count: Option<unsafe extern "C" fn() -> i32>,
            pub create: Option<unsafe extern "C" fn(device: i32, ctx: *mut *mut c_void) -> Status>,
            pub destroy: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
            pub device_name: Option<unsafe extern "C" fn(ctx: *mut c_void) -> *const c_char>,
            pub driver: Option<unsafe extern "C" fn(ctx: *mut c_void) -> *const c_char>,
            pub last_error: Option<unsafe extern "C" fn(ctx: *mut c_void) -> *const c_char>,
            pub alloc: Option<unsafe extern "C" fn(ctx: *mut c_void, nbytes: u64, handle: *mut *mut c_void) -> Status>,
            pub release: Option<unsafe extern "C" fn(ctx: *mut c_void, handle: *mut c_void)>,
            pub upload: Option<unsafe extern "C" fn(ctx: *mut c_void, handle: *mut c_void, offset: u64, src: *const c_void, nbytes: u64) -> Status>,
            pub download: Option<unsafe extern "C" fn(ctx: *mut c_void, handle: *mut c_void, offset: u64, dst: *mut c_void, nbytes: u64) -> Status>,
            pub synchronize: Option<unsafe extern "C" fn(ctx: *mut c_void) -> Status>,
            pub supports: Option<unsafe extern "C" fn(ctx: *mut c_void, op: *const c_char, dtypes: *const i32, n: u32) -> i32>,
            $(pub $method: Option<OpFn>,)*
        }

        /// The op fields of [`VtableV1`], in order.
        pub const OP_FIELDS: &[&str] = &[$(stringify!($method)),*];

        impl VtableV1 {
            /// The op function of `kind` (`None`: NULL).
            pub fn op(&self, kind: deepport_core::ops::OpKind) -> Option<OpFn> {
                use deepport_core::ops::OpKind;
                match kind {
                    $(OpKind::$kind => self.$method,)*
                    _ => None,
                }
            }
        }
    };
}

deepport_core::for_each_local_op!(vtable);

/// The header's `dp_dtype` code of a dtype.
pub fn dtype_code(d: deepport_core::DType) -> i32 {
    use deepport_core::DType::*;
    match d {
        F32 => 0,
        F16 => 1,
        BF16 => 2,
        F8E4M3 => 3,
        F8E4M3Fnuz => 4,
        F8E5M2 => 5,
        E8M0 => 6,
        I32 => 7,
        I64 => 8,
        U8 => 9,
        Bool => 10,
    }
}
