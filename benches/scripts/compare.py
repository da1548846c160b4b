#!/usr/bin/env python3
"""deepport's CPU performance targets, measured side by side in one run.

    benches/scripts/compare.py --python .venv-golden/bin/python [--rounds 3]

builds `deepport` (release; --exe to use a given binary), then alternates
the two sides --rounds times, swapping which goes first every round:
deepport's (`deepport bench --format json`, `deepport forward` on the golden
checkpoint) and PyTorch's (torch_side.py, run with --python, which needs
torch and transformers: pip install -r golden/requirements.txt). Each side
of each round is one process per target, so a round's two numbers are
minutes apart at most. Prints, per target, every round's ratio, the median
ratio, and the load average (1 min) read before and after each side;
--json writes every raw measurement. On a shared machine only ratios of
the same round mean anything: report the load with them.

--only gemm,forward,mla picks targets; --gemm-m 16,128 picks GEMM shapes
(n = 2112, k = 7168); --env KEY=VALUE (repeatable) sets deepport's
environment (e.g. DEEPPORT_CPU_SIMD=avx512).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
N, K = 2112, 7168


def load1():
    return os.getloadavg()[0]


def run(cmd, env=None):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    full = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, check=True, text=True, capture_output=True, cwd=ROOT, env=full)


def deepport_bench(exe, backend, op, shapes, min_time, env):
    cmd = [exe, "bench", "--backend", backend, "--op", op, "--format", "json", "--min-time", str(min_time)]
    for s in shapes:
        cmd += ["--shape", s]
    out = run(cmd, env)
    sys.stderr.write(out.stderr)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def deepport_forward(exe, backend, repeats, env, warm_runs=20):
    """The median over `repeats` processes of the first (cold) prefill, and
    of the median of `warm_runs` further prefills in the same process (how
    torch_side.py times transformers: after a warm-up run)."""
    cold, warm = [], []
    for _ in range(repeats):
        out = run([exe, "forward", "--backend", backend, "--checkpoint", "golden/model", "--mode", "f32",
                   "--tokens", "@golden/model/tokens.json", "--repeat", str(warm_runs)], env)
        m = re.search(r"prefill took ([0-9.]+) s", out.stderr)
        w = re.search(r"warm prefill: median ([0-9.]+) s", out.stderr)
        if not m or not w:
            raise SystemExit(f"no prefill time in:\n{out.stderr}")
        cold.append(float(m.group(1)))
        warm.append(float(w.group(1)))
    return statistics.median(cold), statistics.median(warm)


def ours_side(args, exe, env):
    """{target: seconds} (and the mla_decode record) for deepport."""
    res, raw = {}, []
    if "gemm" in args.only:
        got = deepport_bench(exe, args.backend, "fp8_gemm", [f"m={m},n={N},k={K}" for m in args.gemm_m],
                             args.min_time, env)
        raw += got
        for m in args.gemm_m:
            res[f"fp8_gemm m={m} n={N} k={K}"] = next(
                x for x in got if x["shape"] == {"k": K, "m": m, "n": N})["median_s"]
    if "mla" in args.only:
        got = deepport_bench(exe, args.backend, "mla_decode", ["b=16,s_q=1,h_q=128,s_k=4096"], args.min_time,
                             env)
        raw += got
        res["mla_decode"] = got[0]
    if "forward" in args.only:
        cold, warm = deepport_forward(exe, args.backend, args.forward_runs, env)
        res["forward (cold first prefill)"] = cold
        res["forward (warm, median in-process)"] = warm
        raw += [{"op": "forward_prefill", "backend": args.backend, "median_s": cold},
                {"op": "forward_prefill_warm", "backend": args.backend, "median_s": warm}]
    return res, raw


def torch_side(args):
    """{target: (peer name, seconds)} for PyTorch."""
    want_gemm = "gemm" in args.only and args.gemm_m
    want_fwd = "forward" in args.only
    if not (want_gemm or want_fwd):
        return {}, []
    cmd = [args.python, "benches/scripts/torch_side.py", "--min-time", str(args.min_time),
           "--gemm-m", ",".join(map(str, args.gemm_m))]
    if not want_gemm:
        cmd.append("--skip-gemm")
    if not want_fwd:
        cmd.append("--skip-forward")
    out = run(cmd)
    theirs = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    res = {}
    if want_gemm:
        for m in args.gemm_m:
            best = min((x for x in theirs if x["op"] == "fp8_gemm" and x["shape"] == {"m": m, "n": N, "k": K}),
                       key=lambda x: x["median_s"])
            res[f"fp8_gemm m={m} n={N} k={K}"] = (best["backend"], best["median_s"])
    if want_fwd:
        fwd = next(x for x in theirs if x["op"] == "forward_prefill")
        res["forward (cold first prefill)"] = (fwd["backend"], fwd["median_s"])
        res["forward (warm, median in-process)"] = (fwd["backend"], fwd["median_s"])
    return res, theirs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="a Python with torch and transformers")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two sides (default 2)")
    ap.add_argument("--only", default="gemm,forward,mla", help="targets: gemm, forward, mla")
    ap.add_argument("--gemm-m", default="4096,128,16", help="the FP8 GEMM shapes' m (n = 2112, k = 7168)")
    ap.add_argument("--forward-runs", type=int, default=3, help="deepport forward processes per round")
    ap.add_argument("--exe", help="a built deepport binary (default: cargo build --release)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for deepport's side")
    ap.add_argument("--json", help="write every measurement here (JSON lines)")
    args = ap.parse_args()
    args.only = set(x.strip() for x in args.only.split(",") if x.strip())
    args.gemm_m = [int(x) for x in args.gemm_m.split(",") if x.strip()]
    env = dict(kv.split("=", 1) for kv in args.env)
    if args.exe:
        exe = args.exe
    else:
        run(["cargo", "build", "--release", "-p", "deepport-conformance"])
        exe = str(ROOT / "target" / "release" / "deepport")

    ours_r, theirs_r, loads, raw = [], [], [], []
    for rnd in range(args.rounds):
        order = ("ours", "torch") if rnd % 2 == 0 else ("torch", "ours")
        for side in order:
            before = load1()
            if side == "ours":
                res, r = ours_side(args, exe, env)
                ours_r.append(res)
            else:
                res, r = torch_side(args)
                theirs_r.append(res)
            loads.append((rnd, side, before, load1()))
            raw += [dict(x, round=rnd) for x in r]
            print(f"round {rnd + 1} {side}: load {before:.1f} -> {load1():.1f}", file=sys.stderr, flush=True)

    print(f"\n{'target':<36} {'peer':<30} {'per round: deepport s / peer s = speed-up':<48} {'median':>7}")
    for name in ours_r[0]:
        if name == "mla_decode":
            continue
        cells, ratios, peer = [], [], "-"
        for o, t in zip(ours_r, theirs_r):
            peer, ts = t[name]
            ratios.append(ts / o[name])
            cells.append(f"{o[name]:.4f}/{ts:.4f}={ts / o[name]:.2f}x")
        print(f"{name:<36} {peer:<30} {'  '.join(cells):<48} {statistics.median(ratios):>6.2f}x")
    if "mla" in args.only:
        for rnd, o in enumerate(ours_r):
            m = o["mla_decode"]
            frac = m.get("peak_fraction")
            print(f"mla_decode b=16 s_q=1 h_q=128 s_k=4096 on {args.backend}, round {rnd + 1}: "
                  f"{m['median_s']:.4f} s, {m['gbps']:.2f} GB/s "
                  f"({'-' if frac is None else f'{frac * 100:.0f}%'} of deepport bench's roofline)")
    lo = min(min(b, a) for _, _, b, a in loads)
    hi = max(max(b, a) for _, _, b, a in loads)
    print(f"\nload average (1 min) over the run: {lo:.1f}-{hi:.1f}; per side: "
          + ", ".join(f"r{r + 1} {s} {b:.1f}->{a:.1f}" for r, s, b, a in loads))
    if args.json:
        with open(args.json, "w") as f:
            for x in raw:
                f.write(json.dumps(x) + "\n")
            for r, s, b, a in loads:
                f.write(json.dumps({"load": {"round": r, "side": s, "before": b, "after": a}}) + "\n")


if __name__ == "__main__":
    main()
