"""Deterministic safetensors writer.

The file format is: u64 little-endian header length N, N bytes of JSON header
(padded with spaces to a multiple of 8), then the raw tensor bytes.  We write
it ourselves so that the byte stream depends only on the tensors: keys are
sorted, the JSON is compact, ``__metadata__`` keys are sorted and data is laid
out in sorted-name order.  Every file is read back with the official
``safetensors`` package and compared bit for bit.
"""

import json
import struct

import torch
from safetensors import safe_open

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2",
}


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy().tobytes()


def save(path, tensors, metadata=None):
    names = sorted(tensors)
    header = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    blobs = []
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")
        b = _raw_bytes(t)
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        blobs.append(b)
        offset += len(b)
    hjson = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    verify(path, tensors, metadata)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return _raw_bytes(a) == _raw_bytes(b)


def verify(path, tensors, metadata=None):
    """Read the file back with the reference safetensors loader."""
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        if keys != sorted(tensors):
            raise AssertionError(f"{path}: key mismatch")
        for k in keys:
            if not _same_bits(f.get_tensor(k), tensors[k].detach().contiguous()):
                raise AssertionError(f"{path}: tensor {k} does not round-trip")
        md = f.metadata() or {}
        want = {k: str(v) for k, v in (metadata or {}).items()}
        if md != want:
            raise AssertionError(f"{path}: metadata does not round-trip")


def load(path):
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
        md = f.metadata() or {}
    return out, md
