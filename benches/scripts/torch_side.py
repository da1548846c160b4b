#!/usr/bin/env python3
"""The PyTorch side of deepport's CPU performance targets (benches/README.md).

Prints one JSON object per measurement, in the schema of
`deepport bench --format json` (op, backend, device, shape, median_s,
iters, tflops, gbps), so compare.py can put both sides in one table:

* FP8 GEMM targets: PyTorch's matmul of the *dequantized* operands
  (what a CPU user of PyTorch would run), in f32 and in bf16, at
  (m, n, k) = (4096, 2112, 7168), (128, 2112, 7168), (16, 2112, 7168);
* the tiny-V3 forward pass: transformers' eager DeepseekV3ForCausalLM in
  f32 on the golden checkpoint (golden/model) and its golden prompt.

Timing: warm-up runs for 0.2 s (at least one, as `deepport bench --warmup`),
then runs until --min-time seconds and
--min-iters runs have passed; the median is reported. Threads: all cores.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "golden"))


CLOCK = time.perf_counter


def median_time(fn, min_time, min_iters, max_iters=50, warmup=0.2):
    """Median of timed runs after an untimed warm-up of `warmup` seconds (at
    least one run), the same policy as `deepport bench --warmup`."""
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < warmup:
        fn()
    times, start = [], time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    times.sort()
    n = len(times)
    med = times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2
    return med, n


def device():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gemm(m, n, k, dtype, args):
    g = torch.Generator().manual_seed(m * 7 + n * 3 + k)
    # Dequantized FP8 operands: e4m3 values times their block scales, as
    # f32 or bf16 (e4m3 is exact in both).
    a = (torch.randn(m, k, generator=g) * 100).to(torch.float8_e4m3fn).to(dtype)
    b = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn).to(dtype)
    a = a * torch.rand(m, 1, generator=g).to(dtype)
    bt = b.t()
    med, iters = median_time(lambda: torch.matmul(a, bt), args.min_time, args.min_iters)
    flops = 2.0 * m * n * k
    kb = -(-k // 128)
    nbytes = m * k + n * k + 4.0 * (m * kb + -(-n // 128) * kb) + 2.0 * m * n
    return {
        "op": "fp8_gemm",
        "backend": f"torch-{str(dtype).removeprefix('torch.')}-dequantized",
        "device": device(),
        "shape": {"m": m, "n": n, "k": k},
        "median_s": med,
        "iters": iters,
        "tflops": flops / med / 1e12,
        "gbps": nbytes / med / 1e9,
    }


def forward(args):
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    import stio
    from tinymodel import hf_f32_state_dict

    hf_logging.set_verbosity_error()
    model_dir = ROOT / "golden" / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    ck = stio.load(model_dir / "model.safetensors")
    if isinstance(ck, tuple):
        ck = ck[0]
    tokens = json.loads((model_dir / "tokens.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="deepport_bench_hf_"))
    try:
        hcfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        hcfg["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(hcfg))
        stio.save(tmp / "model.safetensors", hf_f32_state_dict(ck), {"format": "pt"})
        model = DeepseekV3ForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, attn_implementation="eager")
    finally:
        shutil.rmtree(tmp)
    model.eval()
    tok = torch.tensor([tokens], dtype=torch.int64)

    def run():
        with torch.no_grad():
            model(tok, use_cache=False)

    med, iters = median_time(run, args.min_time, args.min_iters)
    return {
        "op": "forward_prefill",
        "backend": "torch-transformers-eager-f32",
        "device": device(),
        "shape": {"layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "tokens": len(tokens)},
        "median_s": med,
        "iters": iters,
        "tokens_per_s": len(tokens) / med,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--skip-forward", action="store_true", help="only the GEMMs (no transformers needed)")
    ap.add_argument("--skip-gemm", action="store_true", help="only the forward pass")
    ap.add_argument("--gemm-m", default="16,128,4096", help="the GEMMs' m values (n = 2112, k = 7168)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--process-time", action="store_true",
                    help="time CPU seconds of this process (time.process_time) instead of wall clock: "
                         "with --threads 1, a number a loaded machine barely moves")
    args = ap.parse_args()
    global CLOCK
    if args.process_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    for m in ([] if args.skip_gemm else [int(x) for x in args.gemm_m.split(",") if x]):
        for dtype in (torch.float32, torch.bfloat16):
            print(json.dumps(gemm(m, 2112, 7168, dtype, args)), flush=True)
    if not args.skip_forward:
        print(json.dumps(forward(args)), flush=True)


if __name__ == "__main__":
    main()
