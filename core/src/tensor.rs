//! Host tensors and safetensors files.

use crate::budget::MemoryBudget;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats;
use half::{bf16, f16};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides (in elements) of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Multi-index of a flat row-major offset.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        if shape[i] > 0 {
            idx[i] = flat % shape[i];
            flat /= shape[i];
        }
    }
    idx
}

/// A tensor in host memory: dtype, shape and little-endian row-major bytes.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({}, {:?})", self.dtype, self.shape)
    }
}

impl HostTensor {
    /// Wraps raw bytes; fails when their length does not match the shape.
    pub fn from_bytes(dtype: DType, shape: &[usize], data: Vec<u8>) -> Result<Self> {
        let want = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::Other(format!(
                    "{dtype} tensor of shape {shape:?} is too large (its byte size overflows)"
                ))
            })?;
        if data.len() != want {
            return Err(Error::Other(format!(
                "{dtype} tensor of shape {shape:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Self {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    /// A tensor of zero bytes whose size is checked against `budget`
    /// first and reserved fallibly: a shape from user input that is too
    /// large is an [`Error::OverBudget`] naming `what`, never an abort.
    pub fn try_zeros(
        what: &str,
        dtype: DType,
        shape: &[usize],
        budget: MemoryBudget,
    ) -> Result<Self> {
        let bytes = budget.check_tensor(what, dtype, shape)?;
        let mut data = budget.try_vec::<u8>(what, bytes as usize)?;
        data.resize(bytes as usize, 0);
        Ok(Self {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    /// A float tensor filled with `value` (rounded to the dtype), checked
    /// against `budget` and reserved fallibly like [`try_zeros`](Self::try_zeros).
    pub fn try_full(
        what: &str,
        dtype: DType,
        shape: &[usize],
        value: f32,
        budget: MemoryBudget,
    ) -> Result<Self> {
        let mut t = Self::try_zeros(what, dtype, shape, budget)?;
        let one = Self::from_f32(dtype, &[1], &[value]).data;
        for chunk in t.data.chunks_exact_mut(one.len().max(1)) {
            chunk.copy_from_slice(&one);
        }
        Ok(t)
    }

    /// A tensor whose element `i` (row-major) is `f(i)`, rounded once to
    /// the dtype, converted in chunks (no full f32 copy); checked against
    /// `budget` and reserved fallibly like [`try_zeros`](Self::try_zeros).
    pub fn try_from_fn(
        what: &str,
        dtype: DType,
        shape: &[usize],
        budget: MemoryBudget,
        mut f: impl FnMut(usize) -> f32,
    ) -> Result<Self> {
        const CHUNK: usize = 1 << 16;
        let bytes = budget.check_tensor(what, dtype, shape)?;
        let mut data = budget.try_vec::<u8>(what, bytes as usize)?;
        let n = numel(shape);
        let mut buf = Vec::with_capacity(CHUNK.min(n));
        let mut i = 0;
        while i < n {
            let m = CHUNK.min(n - i);
            buf.clear();
            buf.extend((i..i + m).map(&mut f));
            data.extend_from_slice(&Self::from_f32(dtype, &[m], &buf).data);
            i += m;
        }
        Self::from_bytes(dtype, shape, data)
    }

    /// A tensor of zero bytes.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Self {
        Self {
            dtype,
            shape: shape.to_vec(),
            data: vec![0; numel(shape) * dtype.size()],
        }
    }

    /// A float tensor filled with `value` (rounded to the dtype).
    pub fn full(dtype: DType, shape: &[usize], value: f32) -> Self {
        Self::from_f32(dtype, shape, &vec![value; numel(shape)])
    }

    /// Encodes f32 values into a float dtype (rounding to nearest even; FP8
    /// per [`crate::formats`]). For integer dtypes the values are truncated.
    pub fn from_f32(dtype: DType, shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(
            numel(shape),
            values.len(),
            "from_f32: shape/length mismatch"
        );
        let data: Vec<u8> = match dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::F8E4M3 => values.iter().map(|v| formats::f32_to_e4m3(*v)).collect(),
            DType::F8E4M3Fnuz => values
                .iter()
                .map(|v| formats::f32_to_e4m3fnuz(*v))
                .collect(),
            DType::F8E5M2 => values.iter().map(|v| formats::f32_to_e5m2(*v)).collect(),
            DType::E8M0 => values.iter().map(|v| formats::f32_to_ue8m0(*v)).collect(),
            DType::I32 => values
                .iter()
                .flat_map(|v| (*v as i32).to_le_bytes())
                .collect(),
            DType::I64 => values
                .iter()
                .flat_map(|v| (*v as i64).to_le_bytes())
                .collect(),
            DType::U8 => values.iter().map(|v| *v as u8).collect(),
            DType::Bool => values.iter().map(|v| (*v != 0.0) as u8).collect(),
        };
        Self {
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    /// An i32 tensor.
    pub fn from_i32(shape: &[usize], values: &[i32]) -> Self {
        assert_eq!(
            numel(shape),
            values.len(),
            "from_i32: shape/length mismatch"
        );
        Self {
            dtype: DType::I32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An i64 tensor.
    pub fn from_i64(shape: &[usize], values: &[i64]) -> Self {
        assert_eq!(
            numel(shape),
            values.len(),
            "from_i64: shape/length mismatch"
        );
        Self {
            dtype: DType::I64,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An index tensor of the given integer dtype (i32 or i64).
    pub fn from_index(dtype: DType, shape: &[usize], values: &[i64]) -> Self {
        match dtype {
            DType::I32 => {
                let v: Vec<i32> = values.iter().map(|&x| x as i32).collect();
                Self::from_i32(shape, &v)
            }
            _ => Self::from_i64(shape, values),
        }
    }

    /// A bool tensor.
    pub fn from_bool(shape: &[usize], values: &[bool]) -> Self {
        assert_eq!(
            numel(shape),
            values.len(),
            "from_bool: shape/length mismatch"
        );
        Self {
            dtype: DType::Bool,
            shape: shape.to_vec(),
            data: values.iter().map(|&b| b as u8).collect(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Same data, another shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::Other(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Element `i` decoded to f32 (floats, integers and bool).
    pub fn get_f32(&self, i: usize) -> f32 {
        let d = &self.data;
        match self.dtype {
            DType::F32 => f32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap()),
            DType::BF16 => bf16::from_le_bytes([d[2 * i], d[2 * i + 1]]).to_f32(),
            DType::F16 => f16::from_le_bytes([d[2 * i], d[2 * i + 1]]).to_f32(),
            DType::F8E4M3 => formats::e4m3_to_f32(d[i]),
            DType::F8E4M3Fnuz => formats::e4m3fnuz_to_f32(d[i]),
            DType::F8E5M2 => formats::e5m2_to_f32(d[i]),
            DType::E8M0 => formats::ue8m0_to_f32(d[i]),
            DType::I32 | DType::I64 => self.get_i64(i) as f32,
            DType::U8 | DType::Bool => d[i] as f32,
        }
    }

    /// Element `i` as i64 (integer types, bool and u8; floats truncate).
    pub fn get_i64(&self, i: usize) -> i64 {
        let d = &self.data;
        match self.dtype {
            DType::I32 => i32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap()) as i64,
            DType::I64 => i64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap()),
            DType::U8 | DType::Bool => d[i] as i64,
            _ => self.get_f32(i) as i64,
        }
    }

    /// All elements decoded to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => (0..self.numel()).map(|i| self.get_f32(i)).collect(),
        }
    }

    /// All elements as i64.
    pub fn to_i64_vec(&self) -> Vec<i64> {
        (0..self.numel()).map(|i| self.get_i64(i)).collect()
    }

    /// Converts to another dtype through f32 (floats round once; integer
    /// conversions go through i64 and are exact within range).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self.clone();
        }
        // UE8M0 holds scale values, not integers: convert through f32.
        if !dtype.is_float()
            && !self.dtype.is_float()
            && dtype != DType::E8M0
            && self.dtype != DType::E8M0
        {
            let v = self.to_i64_vec();
            return match dtype {
                DType::I32 | DType::I64 => HostTensor::from_index(dtype, &self.shape, &v),
                DType::Bool => HostTensor::from_bool(
                    &self.shape,
                    &v.iter().map(|&x| x != 0).collect::<Vec<_>>(),
                ),
                _ => HostTensor {
                    dtype,
                    shape: self.shape.clone(),
                    data: v.iter().map(|&x| x as u8).collect(),
                },
            };
        }
        HostTensor::from_f32(dtype, &self.shape, &self.to_f32_vec())
    }

    /// Position and value of the first NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Option<(Vec<usize>, f32)> {
        if !self.dtype.is_float() && self.dtype != DType::E8M0 {
            return None;
        }
        (0..self.numel())
            .map(|i| (i, self.get_f32(i)))
            .find(|(_, v)| !v.is_finite())
            .map(|(i, v)| (unravel(i, &self.shape), v))
    }
}

/// The contents of a safetensors file: named tensors plus the free-form
/// string metadata of its header.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Fetches a tensor, failing with an error that names it and the file.
    pub fn get(&self, path: &Path, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            msg: format!(
                "missing (the file holds: {})",
                self.tensors.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parses safetensors bytes (already read from `path`, which is used only in
/// error messages). Truncated or malformed data is an error naming the file.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format_err(path, format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format_err(path, format!("not a valid safetensors header: {e}")))?;
    let mut out = TensorFile::default();
    if let Some(m) = meta.metadata() {
        out.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    for (name, view) in st.tensors() {
        let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| Error::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            msg: format!("dtype {} is not supported by deepport", view.dtype()),
        })?;
        let t = HostTensor::from_bytes(dtype, view.shape(), view.data().to_vec()).map_err(|e| {
            Error::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                msg: e.to_string(),
            }
        })?;
        out.tensors.insert(name, t);
    }
    Ok(out)
}

/// Reads a whole safetensors file; its size is checked against the
/// process-wide [`MemoryBudget::global`] first.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<TensorFile> {
    read_safetensors_within(path, MemoryBudget::global())
}

/// Reads a whole safetensors file, which with its parsed tensors takes
/// twice its size in memory: that is checked against `budget` before the
/// file is read, and the read buffer is reserved fallibly.
pub fn read_safetensors_within(path: impl AsRef<Path>, budget: MemoryBudget) -> Result<TensorFile> {
    use std::io::Read;
    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let what = format!("reading {}", path.display());
    budget.check(&what, len.saturating_mul(2))?;
    let mut bytes = budget.try_vec::<u8>(&what, len as usize)?;
    file.read_to_end(&mut bytes).map_err(io)?;
    parse_safetensors(path, &bytes)
}

/// Serializes tensors (and string metadata) to safetensors bytes.
///
/// The bytes depend only on the arguments: the safetensors crate writes
/// `__metadata__` from a `HashMap` (an order that changes from run to run),
/// so the header is written without it and the metadata, in key order, is
/// put first into the header here. Tensor offsets are relative to the end
/// of the header and do not move.
pub fn serialize_safetensors(
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(t.dtype.to_safetensors(), t.shape.clone(), &t.data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Other(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| Error::Other(format!("safetensors: {e}")))?;
    if metadata.is_empty() {
        return Ok(bytes);
    }
    with_sorted_metadata(bytes, metadata)
}

/// Puts `metadata` (in key order) first into the header of serialized
/// safetensors `bytes` that have none, re-padding the header to 8 bytes.
fn with_sorted_metadata(bytes: Vec<u8>, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let bad = || Error::Other("safetensors: unexpected header from the serializer".into());
    let len = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let end = usize::try_from(len)
        .map_err(|_| bad())?
        .checked_add(8)
        .ok_or_else(bad)?;
    let header = std::str::from_utf8(bytes.get(8..end).ok_or_else(bad)?).map_err(|_| bad())?;
    let body = header.trim_end().strip_prefix('{').ok_or_else(bad)?;
    let meta =
        serde_json::to_string(metadata).map_err(|e| Error::Other(format!("safetensors: {e}")))?;
    let sep = if body.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    let mut new_header = format!("{{\"__metadata__\":{meta}{sep}{body}");
    new_header.push_str(&" ".repeat(new_header.len().next_multiple_of(8) - new_header.len()));
    let mut out = Vec::with_capacity(8 + new_header.len() + bytes.len() - end);
    out.extend_from_slice(&(new_header.len() as u64).to_le_bytes());
    out.extend_from_slice(new_header.as_bytes());
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

/// Writes tensors (and string metadata) to a safetensors file.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path: PathBuf = path.as_ref().to_path_buf();
    let bytes = serialize_safetensors(tensors, metadata)?;
    std::fs::write(&path, bytes).map_err(|source| Error::Io { path, source })
}

/// Checks that a named tensor has the given dtype and shape; the error names
/// the file, the tensor and both shapes/dtypes.
pub fn expect_tensor(
    path: &Path,
    name: &str,
    t: &HostTensor,
    dtypes: &[DType],
    shape: &[usize],
) -> Result<()> {
    if !dtypes.contains(&t.dtype) {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            msg: format!(
                "dtype {}, expected {}",
                t.dtype,
                dtypes
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        });
    }
    if t.shape != shape {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            msg: format!("shape {:?}, expected {:?}", t.shape, shape),
        });
    }
    Ok(())
}
