"""pytest tests of the deepport Python bindings (run from the repository
root after `pip install ./python`)."""

import os

import numpy as np
import pytest

import deepport

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
GOLDEN = os.path.join(ROOT, "golden", "model")


def test_backends_lists_the_reference():
    names = {b["name"]: b for b in deepport.backends()}
    assert names["cpu-ref"]["available"]
    assert "cpu" in names


def test_add_f32_and_bf16_bits():
    a = np.array([[1.0, 2.0], [3.0, -4.0]], dtype=np.float32)
    b = np.full((2, 2), 0.5, dtype=np.float32)
    outs, kinds = deepport.run_op("cpu", "add", {"a": a, "b": b})
    assert kinds["out"] == "f32"
    np.testing.assert_array_equal(outs["out"], a + b)

    abits = deepport.f32_to_bf16(a)
    assert abits.dtype == np.uint16
    outs, kinds = deepport.run_op(
        "cpu-ref", "add", {"a": abits, "b": abits}, dtypes={"a": "bf16", "b": "bf16"}
    )
    assert kinds["out"] == "bf16"
    assert outs["out"].dtype == np.uint16
    np.testing.assert_array_equal(deepport.bf16_to_f32(outs["out"]), 2 * a)


def test_fp8_quantization_returns_raw_bits():
    x = np.linspace(-3, 3, 256, dtype=np.float32).reshape(2, 128)
    outs, kinds = deepport.run_op("cpu-ref", "act_quant", {"x": x})
    assert kinds["q"] == "e4m3" and outs["q"].dtype == np.uint8
    assert outs["q"].shape == (2, 128)
    # The largest value of row 1 (3.0) quantizes to 448 = 0x7e (e4m3).
    assert outs["q"][1, -1] == 0x7E


def test_errors_are_python_exceptions():
    a = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown op"):
        deepport.run_op("cpu", "no_such_op", {"a": a})
    with pytest.raises(ValueError, match="argument `b`"):
        deepport.run_op("cpu", "add", {"a": a, "b": np.zeros(4, dtype=np.float32)})
    with pytest.raises(TypeError, match="raw-bit"):
        deepport.run_op("cpu", "add", {"a": a.astype(np.uint16), "b": a})
    with pytest.raises(ValueError, match="unknown backend"):
        deepport.run_op("nope", "add", {"a": a, "b": a})


def test_forward_matches_the_golden_logits():
    import json

    g = json.load(open(os.path.join(GOLDEN, "tokens.json")))
    tokens = g[:8]
    logits, decoded = deepport.forward("cpu", GOLDEN, tokens, mode="f32", decode=3)
    assert logits.shape == (8, 1024)
    assert len(decoded) == 3
    assert decoded[0] == int(np.argmax(logits[-1]))


def test_run_suite(tmp_path):
    status, results = deepport.run_suite("cpu", filters=["add("], report=tmp_path / "r")
    assert status == 0
    assert results and all(r["outcome"] == "Pass" for r in results)


def test_rms_norm_with_a_parameter():
    x = np.array([[3.0, 4.0]], dtype=np.float32)
    w = np.ones(2, dtype=np.float32)
    outs, _ = deepport.run_op("cpu-ref", "rms_norm", {"x": x, "weight": w}, params={"eps": 0})
    np.testing.assert_allclose(outs["y"], x / np.sqrt(12.5), rtol=1e-6)


def test_the_example_plugin_from_python():
    lib = os.path.join(ROOT, "target", "debug", "libdeepport_example_plugin.so")
    if not os.path.exists(lib):
        pytest.skip("build the workspace first (cargo test builds the example plugin)")
    name = deepport.load_plugin(lib)
    assert name == "example-plugin"
    assert any(b["name"] == name and b["available"] for b in deepport.backends())
    a = np.array([1.0, 2.0], dtype=np.float32)
    outs, _ = deepport.run_op(name, "add", {"a": a, "b": a})
    np.testing.assert_array_equal(outs["out"], 2 * a)
    with pytest.raises(NotImplementedError, match="does not support gemm"):
        m = np.zeros((2, 2), dtype=np.float32)
        deepport.run_op(name, "gemm", {"a": m, "b": m})


def test_model_loads_once_and_keeps_its_cache():
    import json

    g = json.load(open(os.path.join(GOLDEN, "tokens.json")))
    prompt = g[:8]
    m = deepport.Model("cpu", GOLDEN, mode="f32")
    assert m.vocab == 1024
    # The session gives what the one-shot forward gives.
    want_logits, want = deepport.forward("cpu", GOLDEN, prompt, mode="f32", decode=3)
    logits = m.prefill(prompt)
    np.testing.assert_array_equal(logits, want_logits)
    got = [int(np.argmax(logits[-1]))]
    while len(got) < 3:
        got.append(int(np.argmax(m.decode(got[-1]))))
    assert got == want
    # Prefill replaces the cached sequence: the same prompt again, the same
    # continuation, on the same loaded model.
    assert m.generate(prompt, 3) == want
    # Decode continues the cache: the prompt plus its first token as a
    # prefill gives the first decode step's logits.
    m.prefill(prompt)
    step = m.decode(want[0])
    longer = m.prefill(prompt + [want[0]])
    np.testing.assert_allclose(step, longer[-1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        m.prefill([])


def test_ops_on_device_tensors():
    b = deepport.Backend("cpu")
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    w = np.array([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    ta, tw = b.upload(a), b.upload(w)
    # Tensors stay on the device between ops: gemm into d, then add d + d.
    d = b.empty((2, 2), "bf16")
    b.launch("gemm", {"a": ta, "b": tw, "d": d}, params={"out_dtype": "bf16"})
    s = b.empty((2, 2), "bf16")
    d2 = b.empty((2, 2), "bf16")
    b.launch("copy_window", {"src": d, "dst": d2})
    b.launch("add", {"a": d, "b": d2, "out": s})
    assert s.dtype == "bf16" and s.shape == (2, 2)
    np.testing.assert_array_equal(deepport.bf16_to_f32(s.numpy()), 2 * (a @ w.T))
    # The same bytes as the one-shot host path.
    outs, _ = deepport.run_op("cpu", "gemm", {"a": a, "b": w}, params={"out_dtype": "bf16"})
    np.testing.assert_array_equal(d.numpy(), outs["d"])
    # Writes and errors.
    ta.write(2 * a)
    f = b.empty((2, 2), "f32")
    b.launch("gemm", {"a": ta, "b": tw, "d": f})
    np.testing.assert_allclose(f.numpy(), 2 * (a @ w.T))
    with pytest.raises(ValueError, match="is bf16 \\[2, 2\\], but the op makes f32"):
        b.launch("gemm", {"a": ta, "b": tw, "d": d})
    with pytest.raises(ValueError, match="gemm has no tensor `x`"):
        b.launch("gemm", {"x": ta, "b": tw, "d": f})
    with pytest.raises(NotImplementedError, match="expert-parallel"):
        b.launch("dispatch", {"x": ta})
    other = deepport.Backend("cpu-ref")
    with pytest.raises(RuntimeError, match="tensor `b`"):
        b.launch("gemm", {"a": ta, "b": other.upload(w), "d": f})
    ids = b.upload(np.array([0, 7], dtype=np.int32))
    e = b.empty((2, 3), "f32")
    with pytest.raises(ValueError, match="out of range|outside"):
        b.launch("embedding", {"table": ta, "ids": ids, "out": e})
        b.synchronize()
