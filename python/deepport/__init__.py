"""deepport: DeepSeek-V3 inference ops on any backend, from Python.

Arrays are NumPy arrays, dense row-major. The dtype of each tensor comes
from its array, except for the formats NumPy lacks, which travel as raw
bits and need a name in ``dtypes``:

============  =================  ==========================================
deepport      NumPy array dtype  note
============  =================  ==========================================
f32           float32
f16           float16
bf16          uint16             raw bits (the high half of an f32)
e4m3          uint8              raw bits, OCP FP8 E4M3FN
e4m3fnuz      uint8              raw bits, AMD FP8 E4M3FNUZ
e5m2          uint8              raw bits, OCP FP8 E5M2
ue8m0         uint8              raw bits, power-of-two scale byte
i32 / i64     int32 / int64
u8            uint8              (the default for a uint8 array)
bool          bool
============  =================  ==========================================

Outputs come back the same way: ``run_op`` returns ``{name: array}`` and
``{name: dtype name}``; bf16 outputs are uint16 arrays, FP8 ones uint8.
``bf16_to_f32`` and ``f32_to_bf16`` convert bf16 bit arrays.

``run_op`` and ``forward`` are one-shot (a backend, an upload, a model
load per call). An engine keeps state instead: ``Backend`` holds device
tensors between calls (``Backend.upload``, ``Backend.empty``,
``Backend.launch`` runs any local op on them, ``DeviceTensor.numpy``
downloads), and ``Model`` loads a checkpoint once and runs ``prefill`` and
``decode`` many times on its latent cache.
"""

import numpy as np

from . import _deepport

__all__ = [
    "backends",
    "load_plugin",
    "run_op",
    "forward",
    "run_suite",
    "Backend",
    "DeviceTensor",
    "Model",
    "bf16_to_f32",
    "f32_to_bf16",
]

_NATIVE = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
    np.dtype(np.bool_): "bool",
}

_ARRAY = {
    "f32": np.float32,
    "f16": np.float16,
    "bf16": np.uint16,
    "e4m3": np.uint8,
    "e4m3fnuz": np.uint8,
    "e5m2": np.uint8,
    "ue8m0": np.uint8,
    "i32": np.int32,
    "i64": np.int64,
    "u8": np.uint8,
    "bool": np.bool_,
}


def backends():
    """Every backend of this build: a list of dicts with ``name``,
    ``description``, ``available`` and ``device`` (or the reason it is
    unavailable, in ``reason``)."""
    out = []
    for name, desc, ok, what in _deepport.backends():
        d = {"name": name, "description": desc, "available": ok}
        d["device" if ok else "reason"] = what
        out.append(d)
    return out


def load_plugin(path):
    """Loads a vendor plugin (a shared library implementing
    plugin/include/deepport_plugin.h); returns its backend name."""
    return _deepport.load_plugin(str(path))


def _wire(name, array, dtype):
    a = np.ascontiguousarray(array)
    if dtype is None:
        dtype = _NATIVE.get(a.dtype)
        if dtype is None:
            raise TypeError(
                f"tensor {name!r}: no deepport dtype for a {a.dtype} array; "
                "pass dtypes={name: 'bf16'} etc. for raw-bit formats"
            )
    want = np.dtype(_ARRAY.get(dtype, a.dtype))
    if dtype not in _ARRAY:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if a.dtype != want:
        raise TypeError(
            f"tensor {name!r}: a {dtype} tensor travels as a {want} array, got {a.dtype}"
        )
    return (name, dtype, list(a.shape), a.tobytes())


def run_op(backend, op, inputs, params=None, dtypes=None):
    """Runs one op on ``backend`` (e.g. ``"cpu"``, ``"wgpu:0"``) as
    ``deepport op`` does: ``inputs`` maps tensor names (``deepport op
    --help``) to arrays, ``params`` parameter names to values, ``dtypes``
    tensor names to deepport dtype names for raw-bit arrays. Returns
    ``(outputs, output_dtypes)``, two dicts keyed by output name."""
    dtypes = dtypes or {}
    wire = [_wire(n, a, dtypes.get(n)) for n, a in inputs.items()]
    ps = []
    for k, v in (params or {}).items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        ps.append(f"{k}={v}")
    outs, kinds = {}, {}
    for name, dtype, shape, data in _deepport.run_op(backend, op, wire, ps):
        outs[name] = np.frombuffer(data, dtype=_ARRAY[dtype]).reshape(shape).copy()
        kinds[name] = dtype
    return outs, kinds


def forward(backend, checkpoint, tokens, mode="f32", decode=0):
    """The DeepSeek-V3 forward pass of ``tokens`` (from position 0) on
    ``backend`` from a Hugging Face checkpoint directory, in numerics
    ``mode`` (f32, bf16, fp8). Returns ``(logits, decoded)``: the prompt's
    logits, float32 ``[len(tokens), vocab]``, and ``decode`` tokens chosen
    greedily after it."""
    data, vocab, decoded = _deepport.forward(
        backend, str(checkpoint), [int(t) for t in tokens], mode, int(decode)
    )
    logits = np.frombuffer(data, dtype=np.float32).reshape(len(tokens), vocab).copy()
    return logits, list(decoded)


def run_suite(backend, profile="smoke", filters=(), report=None, extra=()):
    """Runs the conformance suite on ``backend`` (in this process; no
    ``--isolate``). Returns ``(exit_status, results)``: 0 when nothing
    failed, and the per-case results (dicts, as in results.jsonl) when
    ``report`` names a directory."""
    import json
    import os

    args = ["--backend", backend, "--profile", profile]
    for f in filters:
        args += ["--filter", f]
    if report is not None:
        args += ["--report", str(report)]
    args += list(extra)
    status = _deepport.run_suite(args)
    results = []
    if report is not None:
        path = os.path.join(str(report), "results.jsonl")
        with open(path) as f:
            results = [json.loads(line) for line in f if line.strip()]
    return status, results


def bf16_to_f32(bits):
    """A uint16 array of bf16 bits as float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values):
    """float32 values rounded to nearest even bf16, as a uint16 bit array."""
    v = np.asarray(values, dtype=np.float32).view(np.uint32)
    r = ((v >> 16) & 1) + 0x7FFF
    out = ((v + r) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    out[nan] = ((v[nan] >> 16) | 0x40).astype(np.uint16)
    return out


class DeviceTensor:
    """A tensor in a backend's memory; made by ``Backend.upload`` or
    ``Backend.empty``. ``dtype`` is the deepport dtype name."""

    def __init__(self, native):
        self._t = native

    @property
    def dtype(self):
        return self._t.dtype

    @property
    def shape(self):
        return tuple(self._t.shape)

    def numpy(self):
        """Downloads the data (waiting for the ops writing it; a deferred
        error of the backend is raised here)."""
        data = self._t.download()
        return np.frombuffer(data, dtype=_ARRAY[self.dtype]).reshape(self.shape).copy()

    def write(self, array, dtype=None):
        """Overwrites the tensor with an array of its shape."""
        _, d, shape, data = _wire("tensor", array, dtype or self.dtype)
        if d != self.dtype or tuple(shape) != self.shape:
            raise ValueError(f"a {d} {tuple(shape)} array cannot overwrite a {self.dtype} {self.shape} tensor")
        self._t.write(data)

    def __repr__(self):
        return f"DeviceTensor({self.dtype}, {self.shape})"


class Backend:
    """One backend instance (``Backend("cpu")``, ``Backend("wgpu:0")``)
    whose device tensors live between calls."""

    def __init__(self, spec):
        self._b = _deepport.Backend(str(spec))

    @property
    def name(self):
        return self._b.name

    def upload(self, array, dtype=None):
        """A device tensor holding ``array`` (``dtype`` names raw-bit
        formats: ``"bf16"`` for a uint16 array, …)."""
        _, d, shape, data = _wire("tensor", array, dtype)
        return DeviceTensor(self._b.upload(d, shape, data))

    def empty(self, shape, dtype="f32"):
        """An uninitialised device tensor (an op's output)."""
        if dtype not in _ARRAY:
            raise ValueError(f"unknown dtype {dtype!r}")
        return DeviceTensor(self._b.alloc(dtype, [int(x) for x in shape]))

    def launch(self, op, tensors, params=None):
        """Runs a local op on device tensors of this backend, asynchronously:
        ``tensors`` maps the op's declared tensor names (``deepport op
        --help``) to DeviceTensors, outputs included (each of the dtype and
        shape the op makes; ``copy_window`` updates ``dst`` in place).
        Nothing is downloaded; errors that need device values surface at the
        next ``numpy()`` or ``synchronize()``."""
        ps = []
        for k, v in (params or {}).items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            ps.append(f"{k}={v}")
        items = [(n, t._t) for n, t in tensors.items()]
        self._b.launch(op, items, ",".join(ps))

    def synchronize(self):
        """Waits for the submitted ops; raises a deferred error."""
        self._b.synchronize()


class Model:
    """A DeepSeek-V3 model loaded once from a Hugging Face checkpoint
    directory onto a backend (a name or a ``Backend``), in numerics
    ``mode`` (f32, bf16, fp8). ``prefill`` and ``decode`` reuse the
    weights and the latent cache."""

    def __init__(self, backend, checkpoint, mode="f32"):
        b = backend if isinstance(backend, Backend) else Backend(backend)
        self.backend = b
        self._m = _deepport.Model(b._b, str(checkpoint), mode)

    @property
    def vocab(self):
        return self._m.vocab

    def prefill(self, tokens):
        """Runs ``tokens`` from position 0 (replacing the cached sequence);
        returns float32 logits ``[len(tokens), vocab]``."""
        tokens = [int(t) for t in tokens]
        data = self._m.prefill(tokens)
        return np.frombuffer(data, dtype=np.float32).reshape(len(tokens), self.vocab).copy()

    def decode(self, token):
        """Appends one token to the cached sequence; returns its float32
        logits ``[vocab]``."""
        return np.frombuffer(self._m.decode(int(token)), dtype=np.float32).copy()

    def generate(self, tokens, n):
        """Prefills ``tokens`` and greedily decodes ``n`` tokens."""
        logits = self.prefill(tokens)
        out = []
        if n > 0:
            nxt = int(np.argmax(logits[-1]))
            out.append(nxt)
            while len(out) < n:
                nxt = int(np.argmax(self.decode(nxt)))
                out.append(nxt)
        return out
