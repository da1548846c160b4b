//! Element types that deepport tensors can hold.

use std::fmt;

/// An element type.
///
/// The FP8 types are stored as raw bytes and converted with
/// [`crate::formats`]; `BF16` and `F16` use the `half` crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// OCP FP8 E4M3FN (max 448, no inf, NaN = 0x7f/0xff).
    F8E4M3,
    /// AMD FP8 E4M3FNUZ (max 240, NaN = 0x80, no negative zero).
    F8E4M3Fnuz,
    /// OCP FP8 E5M2 (IEEE-like, with inf).
    F8E5M2,
    /// UE8M0 scale byte (power-of-two exponent only).
    E8M0,
    I32,
    I64,
    U8,
    Bool,
}

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::F8E4M3Fnuz,
        DType::F8E5M2,
        DType::E8M0,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::F8E4M3
            | DType::F8E4M3Fnuz
            | DType::F8E5M2
            | DType::E8M0
            | DType::U8
            | DType::Bool => 1,
        }
    }

    /// A floating-point type (including FP8).
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32
                | DType::F16
                | DType::BF16
                | DType::F8E4M3
                | DType::F8E4M3Fnuz
                | DType::F8E5M2
        )
    }

    /// One of the 8-bit float types.
    pub const fn is_fp8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E4M3Fnuz | DType::F8E5M2)
    }

    /// An integer index type (i32 or i64).
    pub const fn is_index(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// The safetensors name of this dtype (`F8_E4M3`, `BF16`, …).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2 => "F8_E5M2",
            DType::E8M0 => "F8_E8M0",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Short lower-case name used in case ids and on the command line.
    pub const fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "e4m3",
            DType::F8E4M3Fnuz => "e4m3fnuz",
            DType::F8E5M2 => "e5m2",
            DType::E8M0 => "ue8m0",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// Parses a short or safetensors name.
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.short_name().eq_ignore_ascii_case(s) || d.safetensors_name() == s)
    }

    pub(crate) fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E4M3FNUZ => DType::F8E4M3Fnuz,
            S::F8_E5M2 => DType::F8E5M2,
            S::F8_E8M0 => DType::E8M0,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            _ => return None,
        })
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E4M3Fnuz => S::F8_E4M3FNUZ,
            DType::F8E5M2 => S::F8_E5M2,
            DType::E8M0 => S::F8_E8M0,
            DType::I32 => S::I32,
            DType::I64 => S::I64,
            DType::U8 => S::U8,
            DType::Bool => S::BOOL,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}
