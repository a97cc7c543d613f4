#!/usr/bin/env python3
"""Cost model of ring attention and data-parallel training (docs/SCALING.md).

    python3 docs/scaling_model.py            # prints every table of docs/SCALING.md

Pure arithmetic: no benchmark is run. Inputs are numbers from BENCHMARKS.md (section named next
to each) or stated assumptions; the formulas are the ones written out in docs/SCALING.md.
"""
import math

# ---------------------------------------------------------------- measured inputs (BENCHMARKS.md)
# "Ring attention over MPI": 2 ranks, one thread each, B 1, H 8, D 64, float32, global T 4096
# (2048 positions per rank), zigzag; medians of 3, rank 0's steps (ms).
RING = dict(B=1, H=8, D=64, T=4096, P=2)
RING_COMPUTE_MS = {  # (causal, pass) -> compute ms of the steps listed in the table
    (True, "fwd"): [127, 113],
    (True, "bwd"): [647, 674],
    (False, "fwd"): [273],
    (False, "bwd"): [1141],
}
RING_ALONE = [  # (MB, ms): the "alone" column, the same exchange with nothing computed beside it
    (8.39, 12.6), (8.39, 14.4), (8.39, 18.3),  # K+V forward (causal, non-causal); dK+dV home
    (16.78, 37.3), (16.78, 26.2),              # K+V and dK+dV of the backward (causal, non-causal)
]
RING_TOTALS_MS = {  # slowest rank, ring vs single process
    (True, "fwd"): (295, 350), (True, "bwd"): (2636, 854),
    (False, "fwd"): (520, 640), (False, "bwd"): (4021, 1923),
}
# "Fused forward" / "Fused backward": quiet machine, 2 threads (= one 2-vCPU machine), B 1, H 8,
# N 2048, GFLOP/s counting visible pairs only.
FUSED_GFLOPS = {  # (d, causal, pass) -> GFLOP/s
    (64, False, "fwd"): 283, (64, True, "fwd"): 289, (128, False, "fwd"): 296, (128, True, "fwd"): 274,
    (64, False, "bwd"): 288, (64, True, "bwd"): 266, (128, False, "bwd"): 295, (128, True, "bwd"): 237,
}

# "Data-parallel training over MPI": mpirun -np 2 attn train (Transformer, 0.77 M weights, batch
# 64, 1 thread per rank, loaded 2-core EPYC, means of 2 runs; step_ms_p1: one process with
# --grad-shards 2) and bench_grad_sum (P = 2):
# (floats, sum ms, MPI_Allreduce ms, ratio).
DP_TRAIN = dict(weights=768_046, mb_sent=3.072, sum_ms=79, step_ms_p2=264, step_ms_p1=171)
DP_SUM_VS_ALLREDUCE = [
    (1000, 0.004, 0.002, 2.07), (10000, 0.022, 0.021, 1.01), (100000, 27.7, 8.95, 3.10),
    (770000, 110.2, 63.5, 1.74), (2940000, 391.9, 205.8, 1.90), (10000000, 1486.8, 553.3, 2.69),
]


def fit_loopback_rate():
    """Least-squares slope of sum time against bytes sent (4 N at P = 2) over the sizes >= 0.77 M
    floats: the loopback rate the sum reached on the loaded machine (bytes/s)."""
    pts = [(4.0 * n, ms / 1e3) for n, ms, _, _ in DP_SUM_VS_ALLREDUCE if n >= 770000]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return 1.0 / slope


# ---------------------------------------------------------------- the model
BYTES = 4          # float32 K, V, dK, dV
H = 8              # heads (the benchmarks' shape); Hkv = H (no GQA); B = 1
PS = [8, 16, 32, 64, 128, 256]
LINKS_GBIT = [25, 100]
LATENCIES_US = [5, 20]


def flops_step(n, d, causal, pas, h=H):
    """FLOPs of one ring step: n queries of this rank against one n-key block.
    forward 4 n^2 d h (QK^T and PV); backward 2.5x (recompute S, dV, dP, dQ, dK: 10 n^2 d h);
    zigzag causal: every step has half the pairs visible."""
    f = 4.0 * n * n * d * h * (2.5 if pas == "bwd" else 1.0)
    return f / 2 if causal else f


def bytes_step(n, d, pas, h=H):
    """Bytes one rank sends (and receives) per ring step: K+V forward; K+V and dK+dV backward."""
    kv = 2 * n * d * h * BYTES
    return 2 * kv if pas == "bwd" else kv


def comm_s(nbytes, gbit, lat_us):
    return nbytes / (gbit * 1e9 / 8) + lat_us * 1e-6


def crossover_n(d, causal, pas, gflops, gbit, lat_us):
    """Smallest per-rank share n = T/P with compute(n) >= comm(n): a n^2 = b n + L."""
    a = flops_step(1, d, causal, pas) / (gflops * 1e9)   # s per n^2
    b = bytes_step(1, d, pas) / (gbit * 1e9 / 8)         # s per n
    L = lat_us * 1e-6
    return (b + math.sqrt(b * b + 4 * a * L)) / (2 * a)


def ring_time(T, P, d, causal, pas, gflops, gbit, lat_us, h=H):
    """steps x max(compute, comm) (P-1 overlapped steps, the last has no transfer) + the exposed
    final dK/dV return of the backward."""
    n = T / P
    c = flops_step(n, d, causal, pas, h) / (gflops * 1e9)
    m = comm_s(bytes_step(n, d, pas, h), gbit, lat_us)
    t = (P - 1) * max(c, m) + c
    if pas == "bwd":
        t += comm_s(bytes_step(n, d, "fwd", h), gbit, lat_us)  # dK+dV: as many bytes as K+V
    return t, c, m


def ulysses_bytes(T, P, d, pas, hq=H, hkv=H):
    """Bytes one rank sends in Ulysses' all-to-alls (lse left out): (P-1)/P of its shard of q, k,
    v, out forward; of q, k, v, out, dout and dq, dk, dv backward."""
    heads = (2 * hq + 2 * hkv) if pas == "fwd" else (4 * hq + 4 * hkv)
    return (P - 1) / P * (T / P) * heads * d * BYTES


def ulysses_time(T, P, d, causal, pas, gflops, gbit, lat_us, h=H):
    """No overlap: the whole sequence's FLOPs / P (H/P heads each) + the all-to-alls (P-1
    messages of latency each, 4 forward, 9 backward)."""
    f = flops_step(T, d, causal, pas, h)
    c = f / P / (gflops * 1e9)
    calls = 4 if pas == "fwd" else 9
    m = ulysses_bytes(T, P, d, pas, h, h) / (gbit * 1e9 / 8) + calls * (P - 1) * lat_us * 1e-6
    return c + m, c, m


def fit():
    """Achieved GFLOP/s per rank from the ring's measured compute per step and the shape's FLOPs."""
    n = RING["T"] // RING["P"]
    rates = {}
    for (causal, pas), ms in RING_COMPUTE_MS.items():
        f = flops_step(n, RING["D"], causal, pas)
        rates[(causal, pas)] = [f / (x * 1e-3) / 1e9 for x in ms]
    return rates


def fmt_n(x):
    return f"{x:,.0f}"


def fmt_T(x):
    if x >= 1e6:
        return f"{x / 1e6:.1f} M"
    if x >= 1e3:
        return f"{x / 1e3:.0f} k" if x >= 1e4 else f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def main():
    n = RING["T"] // RING["P"]
    print("## Fit 1: achieved GFLOP/s per rank (ring, one loaded thread per rank, d 64)\n")
    print("| causal | pass | FLOPs per step | measured compute ms | GFLOP/s per rank |")
    print("|---|---|---|---|---|")
    rates = fit()
    ring_rate = {}
    for (causal, pas), r in rates.items():
        ms = RING_COMPUTE_MS[(causal, pas)]
        ring_rate[(causal, pas)] = sum(r) / len(r)
        print(f"| {'yes' if causal else 'no'} | {pas} | {flops_step(n, 64, causal, pas) / 1e9:.2f} G | "
              f"{' / '.join(str(x) for x in ms)} | {' / '.join(f'{x:.1f}' for x in r)} |")
    print()
    print("Single process on the same loaded machine (the same section's totals, full T = 4096):")
    for (causal, pas), (ring_ms, single_ms) in RING_TOTALS_MS.items():
        f = flops_step(4096, 64, causal, pas)
        print(f"  causal {causal!s:5} {pas}: {f / 1e9:6.2f} GFLOP in {single_ms} ms = "
              f"{f / (single_ms * 1e-3) / 1e9:5.1f} GFLOP/s")
    print()
    print("## Fit 2: loopback transfer rate from the 'alone' times\n")
    for mb, ms in RING_ALONE:
        print(f"  {mb:5.2f} MB in {ms:4.1f} ms = {mb / ms:5.3f} GB/s = {mb * 8 / ms:4.2f} Gb/s")
    # least squares t = L + bytes / BW
    xs = [mb for mb, _ in RING_ALONE]
    ys = [ms for _, ms in RING_ALONE]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    icpt = my - slope * mx
    print(f"  least squares t = L + bytes/BW: BW = {1 / slope:.3f} GB/s ({8 / slope:.2f} Gb/s), "
          f"L = {icpt:.1f} ms (not resolvable: two message sizes, loaded machine)")
    print()
    print("## Check at P = 2 (the measured run): model vs measured total, ms\n")
    bw_loop = 1 / slope  # GB/s
    print("| causal | pass | model compute/step | model comm/step | model total | measured ring total |")
    print("|---|---|---|---|---|---|")
    for (causal, pas), (ring_ms, _) in RING_TOTALS_MS.items():
        r = ring_rate[(causal, pas)]
        t, c, m = ring_time(4096, 2, 64, causal, pas, r, bw_loop * 8, 0)
        print(f"| {'yes' if causal else 'no'} | {pas} | {c * 1e3:.0f} | {m * 1e3:.1f} | {t * 1e3:.0f} | {ring_ms} |")
    print()

    scen = {
        "A (ring as measured: 1 loaded thread per rank, d 64)":
            {(64, c, p): ring_rate[(c, p)] for c in (False, True) for p in ("fwd", "bwd")},
        "B (fused kernel, quiet 2-thread machine per rank)": FUSED_GFLOPS,
    }
    print("## Crossover per-rank share n* = T/P (positions): communication hidden for T/P >= n*\n")
    print("| rate scenario | d | causal | pass | GFLOP/s per rank | "
          + " | ".join(f"{g} Gb/s, {l} us" for g in LINKS_GBIT for l in LATENCIES_US) + " |")
    print("|---|---|---|---|---|" + "---|" * (len(LINKS_GBIT) * len(LATENCIES_US)))
    for name, rr in scen.items():
        for (d, causal, pas), g in sorted(rr.items()):
            cells = [fmt_n(crossover_n(d, causal, pas, g, gb, l)) for gb in LINKS_GBIT for l in LATENCIES_US]
            print(f"| {name[0]} | {d} | {'yes' if causal else 'no'} | {pas} | {g:.1f} | " + " | ".join(cells) + " |")
    print()
    for name, rr in scen.items():
        for gb in LINKS_GBIT:
            lat = 20
            print(f"## T at which P machines are compute-bound (T* = P n*), scenario {name}, {gb} Gb/s, {lat} us\n")
            print("| d | causal | pass | " + " | ".join(f"P={p}" for p in PS) + " |")
            print("|---|---|---|" + "---|" * len(PS))
            for (d, causal, pas), g in sorted(rr.items()):
                ns = crossover_n(d, causal, pas, g, gb, lat)
                print(f"| {d} | {'yes' if causal else 'no'} | {pas} | " + " | ".join(fmt_T(p * ns) for p in PS) + " |")
            print()

    print("## Projected forward + backward, scenario B, d 128, causal, 20 us: efficiency = "
          "(single-machine compute / P) / ring time\n")
    print("| T | link | " + " | ".join(f"P={p}" for p in PS) + " |")
    print("|---|---|" + "---|" * len(PS))
    for T in (16384, 65536, 262144):
        for gb in LINKS_GBIT:
            cells = []
            for p in PS:
                tf, _, _ = ring_time(T, p, 128, True, "fwd", FUSED_GFLOPS[(128, True, "fwd")], gb, 20)
                tb, _, _ = ring_time(T, p, 128, True, "bwd", FUSED_GFLOPS[(128, True, "bwd")], gb, 20)
                ideal = (flops_step(T, 128, True, "fwd") / FUSED_GFLOPS[(128, True, "fwd")]
                         + flops_step(T, 128, True, "bwd") / FUSED_GFLOPS[(128, True, "bwd")]) / 1e9 / p
                cells.append(f"{(tf + tb) * 1e3:,.1f} ms ({ideal / (tf + tb):.0%})")
            print(f"| {T:,} | {gb} Gb/s | " + " | ".join(cells) + " |")
    print()

    print("## Ulysses against the ring, scenario B, d 128, causal, forward + backward, 20 us: "
          "time (efficiency); Ulysses needs P | heads\n")
    ps_u = [8, 16, 32, 64]
    print("| T | heads | link | method | " + " | ".join(f"P={p}" for p in ps_u) + " |")
    print("|---|---|---|---|" + "---|" * len(ps_u))
    rf, rb = FUSED_GFLOPS[(128, True, "fwd")], FUSED_GFLOPS[(128, True, "bwd")]
    for T in (4096, 65536):
        for h in (8, 32):
            for gb in LINKS_GBIT:
                for name, fn in (("ring", ring_time), ("Ulysses", ulysses_time)):
                    cells = []
                    for p in ps_u:
                        if name == "Ulysses" and h % p:
                            cells.append("-")
                            continue
                        tf, _, _ = fn(T, p, 128, True, "fwd", rf, gb, 20, h=h)
                        tb, _, _ = fn(T, p, 128, True, "bwd", rb, gb, 20, h=h)
                        ideal = (flops_step(T, 128, True, "fwd", h) / rf
                                 + flops_step(T, 128, True, "bwd", h) / rb) / 1e9 / p
                        cells.append(f"{(tf + tb) * 1e3:,.0f} ms ({ideal / (tf + tb):.0%})")
                    print(f"| {T:,} | {h} | {gb} Gb/s | {name} | " + " | ".join(cells) + " |")
    print()

    # ------------------------------------------------------------ data parallel (implemented, fitted)
    # "Translator (the main job)": Transformer 0.77 M weights, 16.9-17.2 s per epoch, 939 steps
    # in 3 epochs (313 per epoch), batch 64, 2 threads, quiet machine.
    # "Translator on real text": GRU Luong-general 2.94 M weights, 1,983 steps in 600 s (batch
    # 64, loaded machine, validation included).
    models = [
        ("toy Transformer, 0.77 M", 0.77e6, 17.05 / (939 / 3)),
        ("real-text GRU, 2.94 M", 2.94e6, 600 / 1983),
    ]
    n_meas = DP_TRAIN["weights"]
    sent_model = 2 * (2 - 1) / 2 * 4 * (n_meas + 1)  # + the loss, summed with the gradient
    print("## Data-parallel training (implemented: fitted to the P = 2 loopback run)\n")
    print(f"bytes per rank and step: model 2 (P-1)/P x 4 N = {sent_model / 1e6:.3f} MB at P = 2, N = {n_meas:,};"
          f" measured {DP_TRAIN['mb_sent']:.3f} MB sent and received (attn's counters)\n")
    k = max(r for n, _, _, r in DP_SUM_VS_ALLREDUCE if n >= 770000)
    bw_loop = fit_loopback_rate()
    print(f"deterministic sum / MPI_Allreduce on loopback (>= 0.77 M floats): "
          + ", ".join(f"{r:.2f}" for n, _, _, r in DP_SUM_VS_ALLREDUCE if n >= 770000)
          + f" -> k = {k:.2f};  loaded loopback rate of the sum {bw_loop / 1e6:.0f} MB/s\n")
    print(f"P = 2 training step (loaded 2-core EPYC, 1 thread per rank): sum {DP_TRAIN['sum_ms']:.0f} ms"
          f" of {DP_TRAIN['step_ms_p2']:.0f} ms ({DP_TRAIN['sum_ms'] / DP_TRAIN['step_ms_p2']:.0%});"
          f" one process, the same global batch: {DP_TRAIN['step_ms_p1']:.0f} ms\n")
    print("t_sum = k [2 (P-1)/P x 4 N / BW + 2 (P-1) L]  (L = 20 us);  efficiency = t_step / (t_step + t_sum)"
          " (weak scaling: batch 64 per rank; the sum follows the backward, no overlap);"
          "  b10 = per-rank batch below which the sum exceeds 10% of the step (step time taken"
          " proportional to the batch)\n")
    print("| model | step ms (1 machine, batch 64) | link | " + " | ".join(f"P={p}" for p in PS) + " |")
    print("|---|---|---|" + "---|" * len(PS))
    for name, N, ts in models:
        for gb in LINKS_GBIT:
            cells = []
            for p in PS:
                ar = k * (2 * (p - 1) / p * 4 * N / (gb * 1e9 / 8) + 2 * (p - 1) * 20e-6)
                eff = ts / (ts + ar)
                b10 = 64 * 9 * ar / ts
                cells.append(f"{ar * 1e3:.1f} ms, {eff:.0%}, b10 {b10:.0f}")
            print(f"| {name} | {ts * 1e3:.0f} | {gb} Gb/s | " + " | ".join(cells) + " |")
    print()

if __name__ == "__main__":
    main()
