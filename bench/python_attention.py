#!/usr/bin/env python3
"""attn.torch against PyTorch's own attention, forward + backward, time and peak memory.

Compares, at head dim d = 64 and 128 and sequence length N = 512 ... 8192 (batch 1, H heads,
float32, 2 threads):

  sdpa   attn.torch.scaled_dot_product_attention(q, k, v)  vs  softmax(q k^T / sqrt(d)) v
         composed from torch ops (what PyTorch 1.13 offers; it has no fused SDPA)
  mha    attn.torch.MultiheadAttention(E = H d, H, batch_first=True)(x, x, x,
         need_weights=False)  vs  torch.nn.MultiheadAttention with the same state_dict

Each (implementation, case) runs in its own subprocess so that its peak memory is its own:
"peak MiB" is ru_maxrss at the end minus the resident size measured just before the first
forward (inputs, parameters and imported libraries excluded), i.e. the extra memory the forward
and backward needed at their worst. Time is the median of the timed repetitions (after one
warm-up) of forward + backward (out.backward(dout)), and of the forward alone under no_grad.
PyTorch cases whose estimated peak exceeds --max-gib are skipped (the [H, N, N] score, softmax
and gradient tensors; 4-5 of them live at once).

Run from the repository root after building the package:
  PYTHONPATH=build-py/python /usr/bin/python3 bench/python_attention.py
Options: --heads 4 --dims 64,128 --sizes 512,1024,2048,4096,8192 --kinds sdpa,mha
         --max-gib 12 --min-time 1.0 --json out.json
Not a test: timings on a shared machine are noisy; compare numbers from one run only.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_kib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def run_case(impl, kind, d, n, heads, min_time):
    """Runs in the child: times one case, prints one JSON line."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    import attn
    import attn.torch as at

    attn.set_num_threads(2)
    E = heads * d
    if kind == "sdpa":
        q, k, v = (torch.randn(1, heads, n, d).requires_grad_(True) for _ in range(3))
        leaves = [q, k, v]
        scale = 1.0 / math.sqrt(d)
        if impl == "attn":
            def fwd():
                return at.scaled_dot_product_attention(q, k, v)
        else:
            def fwd():
                s = (q * scale) @ k.transpose(-2, -1)
                return torch.softmax(s, dim=-1) @ v
        dout = torch.randn(1, heads, n, d)
    else:
        cls = at.MultiheadAttention if impl == "attn" else torch.nn.MultiheadAttention
        module = cls(E, heads, batch_first=True)
        x = torch.randn(1, n, E).requires_grad_(True)
        leaves = [x] + list(module.parameters())

        def fwd():
            return module(x, x, x, need_weights=False)[0]
        dout = torch.randn(1, n, E)

    def step():
        for t in leaves:
            t.grad = None
        out = fwd()
        out.backward(dout)

    base = rss_kib()
    step()  # warm-up (and the peak: every step allocates the same)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < 20):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    fwd_times = []
    with torch.no_grad():
        start = time.perf_counter()
        while len(fwd_times) < 3 or (time.perf_counter() - start < min_time / 2 and
                                     len(fwd_times) < 20):
            t0 = time.perf_counter()
            fwd()
            fwd_times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"impl": impl, "kind": kind, "d": d, "n": n, "heads": heads,
                      "fwd_bwd_s": statistics.median(times), "fwd_s": statistics.median(fwd_times),
                      "reps": len(times), "peak_mib": (peak - base) / 1024}))


def torch_bytes(kind, n, heads):
    """Estimated peak of PyTorch's composed attention: ~5 [H, N, N] float32 tensors
    (scores, softmax, their gradients, temporaries)."""
    return 5 * heads * n * n * 4


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dims", default="64,128")
    p.add_argument("--sizes", default="512,1024,2048,4096,8192")
    p.add_argument("--kinds", default="sdpa,mha")
    p.add_argument("--max-gib", type=float, default=12.0)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--json")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        impl, kind, d, n = args.case.split(",")
        run_case(impl, kind, int(d), int(n), args.heads, args.min_time)
        return

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2",
               OPENBLAS_NUM_THREADS="2", MKL_NUM_THREADS="2")
    results = []
    print("| kind | d | N | attn fwd+bwd | PyTorch fwd+bwd | speed-up fwd+bwd | speed-up fwd | "
          "attn peak MiB | PyTorch peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for d in map(int, args.dims.split(",")):
            for n in map(int, args.sizes.split(",")):
                row = {}
                for impl in ("attn", "torch"):
                    if impl == "torch" and torch_bytes(kind, n, args.heads) > args.max_gib * 2**30:
                        row[impl] = None
                        continue
                    cmd = [sys.executable, os.path.abspath(__file__), "--case",
                           f"{impl},{kind},{d},{n}", "--heads", str(args.heads),
                           "--min-time", str(args.min_time)]
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(r.stderr, file=sys.stderr)
                        row[impl] = "failed"
                        continue
                    row[impl] = json.loads(r.stdout.strip().splitlines()[-1])
                    results.append(row[impl])
                a, t = row["attn"], row["torch"]

                def cell(x, key, fmt):
                    if x is None:
                        return "skipped (> %g GiB)" % args.max_gib
                    return x if isinstance(x, str) else fmt % x[key]
                ok = isinstance(a, dict) and isinstance(t, dict)
                ratio = "%.2fx" % (t["fwd_bwd_s"] / a["fwd_bwd_s"]) if ok else "-"
                fratio = "%.2fx" % (t["fwd_s"] / a["fwd_s"]) if ok else "-"
                print(f"| {kind} | {d} | {n} | {cell(a, 'fwd_bwd_s', '%.4g s')} | "
                      f"{cell(t, 'fwd_bwd_s', '%.4g s')} | {ratio} | {fratio} | "
                      f"{cell(a, 'peak_mib', '%.0f')} | {cell(t, 'peak_mib', '%.0f')} |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
