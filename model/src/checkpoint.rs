//! A Hugging Face checkpoint directory: one `model.safetensors`, or shards
//! listed by `model.safetensors.index.json` (its `weight_map`).
//!
//! Each file's safetensors header (8-byte little-endian length, then JSON:
//! `name → {dtype, shape, data_offsets}` and an optional `__metadata__`) is
//! parsed here and checked against the file: offsets inside the data
//! section, byte count equal to dtype size × shape. Tensor bytes are read
//! lazily, on request, with positional reads
//! ([`std::os::unix::fs::FileExt::read_exact_at`]).
//!
//! Why not mmap: mapping a file needs `unsafe` (the mapping is undefined
//! behaviour if the file changes underneath), and deepport-core is
//! `#![forbid(unsafe_code)]`. Lazy positional reads give the property that
//! matters, "touch only what you load": opening a 700 GB checkpoint reads
//! only the headers, and each tensor costs one read of its own bytes.

use deepport_core::dtype::DType;
use deepport_core::error::{Error, Result};
use deepport_core::ops::blocks128;
use deepport_core::tensor::HostTensor;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// safetensors' own limit on the header size.
const MAX_HEADER: u64 = 100 << 20;

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    /// Index into `Checkpoint::files`.
    file: usize,
    /// `None` when deepport has no such dtype (the name is kept for errors).
    dtype: Option<DType>,
    dtype_name: String,
    shape: Vec<usize>,
    /// Byte range inside the file's data section.
    begin: u64,
    end: u64,
}

struct ShardFile {
    path: PathBuf,
    file: File,
    /// Offset of the data section (8 + header length).
    data_start: u64,
}

/// One parsed safetensors header.
struct Header {
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

/// A linear layer's weight and, for FP8 weights, its block scales.
#[derive(Clone, Debug)]
pub struct LinearWeight {
    /// `[out, in]`: e4m3 with a scale, or bf16/f16/f32 without one.
    pub weight: HostTensor,
    /// `weight_scale_inv` as f32 `[⌈out/128⌉, ⌈in/128⌉]` (a multiplier).
    pub scale: Option<HostTensor>,
}

/// An opened checkpoint. See the module documentation.
pub struct Checkpoint {
    dir: PathBuf,
    /// The shard index, when the checkpoint is sharded.
    index: Option<PathBuf>,
    files: Vec<ShardFile>,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Checkpoint({}, {} files, {} tensors)",
            self.dir.display(),
            self.files.len(),
            self.tensors.len()
        )
    }
}

fn tensor_err(path: &Path, name: &str, msg: impl Into<String>) -> Error {
    Error::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        msg: msg.into(),
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses one entry of a safetensors header.
fn parse_entry(path: &Path, name: &str, v: &Value, file: usize, data_len: u64) -> Result<Entry> {
    let o = v
        .as_object()
        .ok_or_else(|| tensor_err(path, name, format!("header entry is not an object: {v}")))?;
    let dtype_name = o
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| tensor_err(path, name, "header entry has no string `dtype`"))?
        .to_string();
    let shape: Vec<usize> = o
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| {
            tensor_err(
                path,
                name,
                "header entry has no `shape` list of non-negative integers",
            )
        })?;
    let offs: Vec<u64> = o
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .filter(|v| v.len() == 2)
        .ok_or_else(|| {
            tensor_err(
                path,
                name,
                "header entry has no `data_offsets` pair of non-negative integers",
            )
        })?;
    let (begin, end) = (offs[0], offs[1]);
    if begin > end {
        return Err(tensor_err(
            path,
            name,
            format!("data_offsets [{begin}, {end}] are reversed"),
        ));
    }
    if end > data_len {
        return Err(tensor_err(
            path,
            name,
            format!(
                "data_offsets [{begin}, {end}] run past the end of the data section \
                 ({data_len} bytes): the file is truncated or corrupt"
            ),
        ));
    }
    let dtype = DType::parse(&dtype_name).filter(|d| d.safetensors_name() == dtype_name);
    if let Some(d) = dtype {
        let want = shape
            .iter()
            .try_fold(d.size() as u64, |acc, &x| acc.checked_mul(x as u64));
        if want != Some(end - begin) {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "{dtype_name} {shape:?} needs {} bytes but data_offsets [{begin}, {end}] hold {}",
                    want.map_or_else(|| "too many".to_string(), |w| w.to_string()),
                    end - begin
                ),
            ));
        }
    }
    Ok(Entry {
        file,
        dtype,
        dtype_name,
        shape,
        begin,
        end,
    })
}

/// Opens a safetensors file and parses its header.
fn open_file(path: &Path, index: usize) -> Result<(ShardFile, Header)> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    if len < 8 {
        return Err(format_err(
            path,
            format!("{len} bytes: too short for a safetensors header length"),
        ));
    }
    let mut n8 = [0u8; 8];
    file.read_exact_at(&mut n8, 0)
        .map_err(|e| io_err(path, e))?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER || n > len - 8 {
        return Err(format_err(
            path,
            format!(
                "header length {n} exceeds the file ({len} bytes) or the 100 MiB limit: \
                 not a safetensors file, or truncated"
            ),
        ));
    }
    let mut hb = vec![0u8; n as usize];
    file.read_exact_at(&mut hb, 8)
        .map_err(|e| io_err(path, e))?;
    let root: Map<String, Value> = serde_json::from_slice(&hb).map_err(|e| {
        format_err(
            path,
            format!("safetensors header is not a JSON object: {e}"),
        )
    })?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut header = Header {
        tensors: BTreeMap::new(),
        metadata: BTreeMap::new(),
    };
    for (name, v) in &root {
        if name == "__metadata__" {
            let m = v
                .as_object()
                .ok_or_else(|| format_err(path, "`__metadata__` must be an object of strings"))?;
            for (k, s) in m {
                let s = s.as_str().ok_or_else(|| {
                    format_err(path, format!("`__metadata__.{k}` must be a string"))
                })?;
                header.metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let e = parse_entry(path, name, v, index, data_len)?;
        header.tensors.insert(name.clone(), e);
    }
    Ok((
        ShardFile {
            path: path.to_path_buf(),
            file,
            data_start,
        },
        header,
    ))
}

/// A parsed `model.safetensors.index.json`: which shard file holds each
/// tensor. Parsing touches no file; [`Checkpoint::open`] opens the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// Shard file names (plain names inside the checkpoint directory), in
    /// order of first mention.
    pub shard_names: Vec<String>,
    /// Every tensor of `weight_map` with the index of its shard in
    /// `shard_names`.
    pub wanted: Vec<(String, usize)>,
    /// The index's `metadata` object, values as text.
    pub metadata: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Parses the text of an index file; `index` names it in errors. A
    /// shard name that is not a plain file name (`../x`, `/etc/x`, `a/b`)
    /// is an error, so an index cannot reach outside its directory.
    pub fn parse(text: &str, index: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| format_err(index, format!("not valid JSON: {e}")))?;
        let map = root
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| format_err(index, "has no `weight_map` object"))?;
        let mut shard_names: Vec<String> = Vec::new();
        let mut wanted: Vec<(String, usize)> = Vec::with_capacity(map.len());
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| {
                tensor_err(index, name, "weight_map entry is not a file name string")
            })?;
            let plain = Path::new(f)
                .file_name()
                .is_some_and(|b| b == std::ffi::OsStr::new(f));
            if !plain {
                return Err(tensor_err(
                    index,
                    name,
                    format!("weight_map names `{f}`, which is not a plain file name in the checkpoint directory"),
                ));
            }
            let i = match shard_names.iter().position(|s| s == f) {
                Some(i) => i,
                None => {
                    shard_names.push(f.to_string());
                    shard_names.len() - 1
                }
            };
            wanted.push((name.clone(), i));
        }
        let mut metadata = BTreeMap::new();
        if let Some(m) = root.get("metadata").and_then(Value::as_object) {
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                metadata.insert(k.clone(), s);
            }
        }
        Ok(ShardIndex {
            shard_names,
            wanted,
            metadata,
        })
    }
}

impl Checkpoint {
    /// Opens a checkpoint directory: sharded when
    /// `model.safetensors.index.json` exists, else `model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(&dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_single(&single);
        }
        Err(Error::Format {
            path: dir,
            msg: format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
        })
    }

    /// Opens a single safetensors file.
    pub fn open_single(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (f, h) = open_file(path, 0)?;
        Ok(Checkpoint {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            index: None,
            files: vec![f],
            tensors: h.tensors,
            metadata: h.metadata,
        })
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
        let ShardIndex {
            shard_names,
            wanted,
            metadata,
        } = ShardIndex::parse(&text, index)?;
        let mut files = Vec::with_capacity(shard_names.len());
        let mut headers = Vec::with_capacity(shard_names.len());
        for (i, s) in shard_names.iter().enumerate() {
            let (f, h) = open_file(&dir.join(s), i)?;
            files.push(f);
            headers.push(h);
        }
        let mut tensors = BTreeMap::new();
        for (name, i) in wanted {
            let e = headers[i].tensors.get(&name).cloned().ok_or_else(|| {
                tensor_err(
                    &files[i].path,
                    &name,
                    format!("listed in {} but missing from this shard", index.display()),
                )
            })?;
            tensors.insert(name, e);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            index: Some(index.to_path_buf()),
            files,
            tensors,
            metadata,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files that hold tensors.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Metadata: the single file's `__metadata__`, or the index's `metadata`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The file that names the tensors: the index, or the single file.
    fn catalogue(&self) -> &Path {
        match &self.index {
            Some(i) => i,
            None => &self.files[0].path,
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| {
            tensor_err(
                self.catalogue(),
                name,
                format!(
                    "missing from the checkpoint ({} tensors)",
                    self.tensors.len()
                ),
            )
        })
    }

    /// Dtype and shape of a tensor, from the header (no data read). A dtype
    /// deepport does not know is an error naming it.
    pub fn info(&self, name: &str) -> Result<(DType, &[usize])> {
        let e = self.entry(name)?;
        let d = e.dtype.ok_or_else(|| {
            tensor_err(
                &self.files[e.file].path,
                name,
                format!("dtype {} is not supported by deepport", e.dtype_name),
            )
        })?;
        Ok((d, &e.shape))
    }

    /// Reads a tensor.
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let (dtype, shape) = self.info(name)?;
        let e = self.entry(name)?;
        let f = &self.files[e.file];
        let n = usize::try_from(e.end - e.begin)
            .map_err(|_| tensor_err(&f.path, name, "too large for this machine"))?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(n).map_err(|err| {
            tensor_err(&f.path, name, format!("cannot allocate {n} bytes: {err}"))
        })?;
        buf.resize(n, 0);
        f.file
            .read_exact_at(&mut buf, f.data_start + e.begin)
            .map_err(|err| {
                tensor_err(
                    &f.path,
                    name,
                    format!("reading bytes [{}, {}) of the data: {err}", e.begin, e.end),
                )
            })?;
        HostTensor::from_bytes(dtype, shape, buf)
            .map_err(|err| tensor_err(&f.path, name, err.to_string()))
    }

    /// Reads a tensor after checking (from the header) that its dtype is one
    /// of `dtypes` and its shape is `shape`.
    pub fn get_checked(&self, name: &str, dtypes: &[DType], shape: &[usize]) -> Result<HostTensor> {
        let (d, s) = self.info(name)?;
        let path = &self.files[self.entry(name)?.file].path;
        if !dtypes.contains(&d) {
            let want: Vec<String> = dtypes.iter().map(|d| d.to_string()).collect();
            return Err(tensor_err(
                path,
                name,
                format!("dtype {d}, expected {}", want.join(" or ")),
            ));
        }
        if s != shape {
            return Err(tensor_err(
                path,
                name,
                format!("shape {s:?}, expected {shape:?}"),
            ));
        }
        self.get(name)
    }

    /// Reads the linear layer `{prefix}.weight` (`[out, in]`) and, when it
    /// is FP8, its `{prefix}.weight_scale_inv`, which must be
    /// `[⌈out/128⌉, ⌈in/128⌉]` (f32, or bf16/UE8M0 converted exactly to
    /// f32). Float weights take no scale.
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<LinearWeight> {
        let wname = format!("{prefix}.weight");
        let weight = self.get_checked(
            &wname,
            &[
                DType::F8E4M3,
                DType::F8E4M3Fnuz,
                DType::BF16,
                DType::F16,
                DType::F32,
            ],
            &[out, inp],
        )?;
        if !weight.dtype().is_fp8() {
            return Ok(LinearWeight {
                weight,
                scale: None,
            });
        }
        let sname = format!("{prefix}.weight_scale_inv");
        if !self.contains(&sname) {
            return Err(tensor_err(
                self.catalogue(),
                &sname,
                format!(
                    "missing: the {} weight `{wname}` needs its block scales",
                    weight.dtype()
                ),
            ));
        }
        let scale = self.get_checked(
            &sname,
            &[DType::F32, DType::BF16, DType::E8M0],
            &[blocks128(out), blocks128(inp)],
        )?;
        Ok(LinearWeight {
            weight,
            scale: Some(scale.to_dtype(DType::F32)),
        })
    }
}
