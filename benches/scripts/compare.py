#!/usr/bin/env python3
"""deepport's CPU performance targets, measured side by side in one run.

    benches/scripts/compare.py --python .venv-golden/bin/python

builds `deepport` (release), then alternates: deepport's side
(`deepport bench --format json`, `deepport forward` on the golden
checkpoint) and PyTorch's side (torch_side.py, run with --python, which
needs torch and transformers: pip install -r golden/requirements.txt).
Prints one table of ratios; --json writes every raw measurement.
Run it on an otherwise idle machine: the ratio is what counts.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEMM_SHAPES = [(4096, 2112, 7168), (128, 2112, 7168), (16, 2112, 7168)]


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=True, cwd=ROOT, **kw)


def deepport_bench(exe, backend, op, shapes, min_time):
    cmd = [exe, "bench", "--backend", backend, "--op", op, "--format", "json", "--min-time", str(min_time)]
    for s in shapes:
        cmd += ["--shape", s]
    out = run(cmd)
    sys.stderr.write(out.stderr)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def deepport_forward(exe, backend, repeats, warm_runs=20):
    """The median over `repeats` processes of the first (cold) prefill, and
    of the median of `warm_runs` further prefills in the same process (how
    torch_side.py times transformers: after a warm-up run)."""
    cold, warm = [], []
    for _ in range(repeats):
        out = run([exe, "forward", "--backend", backend, "--checkpoint", "golden/model", "--mode", "f32",
                   "--tokens", "@golden/model/tokens.json", "--repeat", str(warm_runs)])
        m = re.search(r"prefill took ([0-9.]+) s", out.stderr)
        w = re.search(r"warm prefill: median ([0-9.]+) s", out.stderr)
        if not m or not w:
            raise SystemExit(f"no prefill time in:\n{out.stderr}")
        cold.append(float(m.group(1)))
        warm.append(float(w.group(1)))
    return statistics.median(cold), statistics.median(warm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="a Python with torch and transformers")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--json", help="write every measurement here (JSON lines)")
    args = ap.parse_args()
    run(["cargo", "build", "--release", "-p", "deepport-conformance"])
    exe = str(ROOT / "target" / "release" / "deepport")

    ours = deepport_bench(exe, args.backend, "fp8_gemm", [f"m={m},n={n},k={k}" for m, n, k in GEMM_SHAPES],
                          args.min_time)
    mla = deepport_bench(exe, args.backend, "mla_decode", ["b=16,s_q=1,h_q=128,s_k=4096"], args.min_time)
    ours_fwd, ours_fwd_warm = deepport_forward(exe, args.backend, 5)
    torch_out = run([args.python, "benches/scripts/torch_side.py", "--min-time", str(args.min_time)])
    theirs = [json.loads(line) for line in torch_out.stdout.splitlines() if line.strip()]

    rows = []
    for m, n, k in GEMM_SHAPES:
        mine = next(x for x in ours if x["shape"] == {"k": k, "m": m, "n": n})
        best = min((x for x in theirs if x["op"] == "fp8_gemm" and x["shape"] == {"m": m, "n": n, "k": k}),
                   key=lambda x: x["median_s"])
        rows.append((f"fp8_gemm m={m} n={n} k={k}", mine["median_s"], f"{best['backend']}", best["median_s"]))
    fwd = next(x for x in theirs if x["op"] == "forward_prefill")
    rows.append((f"tiny-V3 forward f32, {fwd['shape']['tokens']} tokens", ours_fwd, fwd["backend"], fwd["median_s"]))
    rows.append((f"  the same, warm (median in-process)", ours_fwd_warm, fwd["backend"], fwd["median_s"]))

    print(f"\n{'target':<40} {'deepport s':>11} {'peer':<36} {'peer s':>10} {'speed-up':>9}")
    for name, mine, peer, theirs_s in rows:
        print(f"{name:<40} {mine:>11.4f} {peer:<36} {theirs_s:>10.4f} {theirs_s / mine:>8.2f}×")
    m = mla[0]
    frac = m.get("peak_fraction")
    print(f"\nmla_decode b=16 s_q=1 h_q=128 s_k=4096 on {args.backend}: {m['gbps']:.1f} GB/s, "
          f"{'-' if frac is None else f'{frac * 100:.0f}%'} of the measured streaming-bandwidth roofline")
    if args.json:
        with open(args.json, "w") as f:
            for x in ours + mla + theirs:
                f.write(json.dumps(x) + "\n")
            f.write(json.dumps({"op": "forward_prefill", "backend": args.backend, "median_s": ours_fwd}) + "\n")
            f.write(json.dumps({"op": "forward_prefill_warm", "backend": args.backend, "median_s": ours_fwd_warm})
                    + "\n")


if __name__ == "__main__":
    main()
