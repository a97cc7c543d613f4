#!/usr/bin/env python3
"""attn train against its PyTorch 1.13 twin (bench/torch_translators.py) on the same batches.

For each model: one `attn train` run writes its batches (ATTN_DUMP_BATCHES) and the twin replays
them; then attn and PyTorch runs alternate (attn 1 thread, torch 1 thread, attn 2 threads, torch
2 threads with OMP_WAIT_POLICY=PASSIVE, repeated), so that load from other processes falls on both
sides alike. PyTorch gets the glibc heap policy attn's CLI sets for itself (32 MiB mmap threshold;
--torch-default-malloc leaves glibc's default). Prints, per run, tokens/s (source + target tokens, one <eos> each, first step start to
last step start), tokens per CPU second and peak RSS; then the table of issue 15 with the best
run of each side, attn's best over PyTorch's best thread setting, and the load average.

Needs Debian's python3-torch (skips the PyTorch side without it) and the real corpus
(scripts/make_real_corpus.sh). Usage:
  bench/train_vs_torch.py [--attn build/bin/attn] [--corpus runs/real_corpus] [--steps 60]
                          [--repeats 2] [--models transformer,gru] [--d 128]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RATE = re.compile(r"training rate: (\d+) tokens .* ([0-9.e+-]+) s: (\d+) tokens/s(?:, (\d+) tokens per CPU second)?")


def models(d):
    """Model flags for attn and for the twin, by name (issue 15's two translators at width d)."""
    return {
        "transformer": (f"Transformer d {d}, 2+2 layers, 4 heads, ffn {2 * d}",
                        ["--arch", "transformer", "--layers", "2", "--hidden", str(d), "--heads", "4",
                         "--ffn", str(2 * d), "--dropout", "0.1"],
                        ["--arch", "transformer", "--layers", "2", "--hidden", str(d), "--heads", "4",
                         "--ffn", str(2 * d), "--dropout", "0.1"]),
        "gru": (f"GRU Luong-general, emb {d // 2}, hidden {d}",
                ["--arch", "gru", "--attention", "luong-general", "--emb", str(d // 2), "--hidden", str(d)],
                ["--arch", "gru", "--attention", "luong-general", "--emb", str(d // 2), "--hidden", str(d),
                 "--dropout", "0"]),
        "lstm": (f"LSTM Bahdanau, emb {d // 2}, hidden {d}",
                 ["--arch", "lstm", "--attention", "bahdanau", "--emb", str(d // 2), "--hidden", str(d)],
                 ["--arch", "lstm", "--attention", "bahdanau", "--emb", str(d // 2), "--hidden", str(d),
                  "--dropout", "0"]),
    }


def run(cmd, env):
    """Runs cmd; returns (training-rate match or None, peak RSS MiB, output)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"train_vs_torch: {' '.join(cmd)} failed:\n{out[-3000:]}")
    m = RATE.search(out)
    return m, usage.ru_maxrss / 1024.0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attn", default="build/bin/attn")
    ap.add_argument("--corpus", default="runs/real_corpus")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="transformer,gru")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--torch-default-malloc", action="store_true",
                    help="leave glibc's mmap threshold at its default for PyTorch")
    a = ap.parse_args()
    try:
        import torch  # noqa: F401  (only to know whether the twin can run)
        have_torch = True
    except ImportError:
        have_torch = False
        print("train_vs_torch: python3-torch is not installed: attn side only")
    tmp = tempfile.mkdtemp(prefix="train_vs_torch.")
    table = []
    for name in a.models.split(","):
        title, attn_flags, twin_flags = models(a.d)[name]
        batches = os.path.join(tmp, name + ".batches")
        base = [a.attn, "train", "--train", os.path.join(a.corpus, "train.tsv"), "--out",
                os.path.join(tmp, name), "--force", "--subword", "bpe", "--vocab-size", "4000",
                "--max-source", "160", "--batch", "64", "--lr", "2e-3", "--warmup", "400",
                "--schedule", "inverse_sqrt", "--label-smoothing", "0.1", "--epochs", "50",
                "--max-steps", str(a.steps), "--eval-every", "0", "--progress-every", "1000000",
                "--valid-size", "0"] + attn_flags
        results = {}
        first = True
        for rep in range(a.repeats):
            for threads in [int(t) for t in a.threads.split(",")]:
                env = dict(os.environ)
                if first:
                    env["ATTN_DUMP_BATCHES"] = batches
                m, rss, out = run(base + ["--threads", str(threads)], env)
                first = False
                if not m:
                    sys.exit(f"train_vs_torch: no training rate in attn's output:\n{out[-2000:]}")
                results.setdefault(("attn", threads), []).append((int(m.group(3)), int(m.group(4) or 0), rss))
                print(f"{name} attn  {threads} thr: {m.group(3)} tokens/s, {m.group(4)} tokens/CPU s, "
                      f"{rss:.0f} MiB  (load {os.getloadavg()[0]:.2f})", flush=True)
                if not have_torch:
                    continue
                env = dict(os.environ)
                if threads > 1:
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                if not a.torch_default_malloc:
                    # The heap policy attn's CLI sets for itself (tools/attn.cpp), as glibc's
                    # environment variables: PyTorch's temporaries too stop coming back as fresh
                    # zeroed pages, so neither side pays page faults the other does not.
                    env["MALLOC_MMAP_THRESHOLD_"] = str(32 << 20)
                    env["MALLOC_TRIM_THRESHOLD_"] = str(256 << 20)
                m, rss, out = run([sys.executable, os.path.join(HERE, "torch_translators.py"),
                                   "--batches", batches, "--threads", str(threads)] + twin_flags, env)
                if not m:
                    sys.exit(f"train_vs_torch: no training rate in the twin's output:\n{out[-2000:]}")
                results.setdefault(("torch", threads), []).append((int(m.group(3)), int(m.group(4) or 0), rss))
                print(f"{name} torch {threads} thr: {m.group(3)} tokens/s, {m.group(4)} tokens/CPU s, "
                      f"{rss:.0f} MiB  (load {os.getloadavg()[0]:.2f})", flush=True)
        table.append((title, results))
    print()
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{a.steps} steps per run, best of {a.repeats}")
    print("| model | attn tokens/s (threads; tokens per CPU s; peak RSS) | PyTorch 1.13 tokens/s (same) "
          "| attn / PyTorch, best wall rates |")
    print("|---|---|---|---|")
    for title, results in table:
        def cell(side):
            parts, best = [], 0
            for (s, threads), runs in sorted(results.items()):
                if s != side:
                    continue
                rate = max(r[0] for r in runs)
                best = max(best, rate)
                parts.append(f"{rate:,} ({threads} thr; {max(r[1] for r in runs):,}/CPU s; "
                             f"{max(r[2] for r in runs):.0f} MiB)")
            return "; ".join(parts) or "not run", best
        attn_cell, attn_best = cell("attn")
        torch_cell, torch_best = cell("torch")
        ratio = f"{attn_best / torch_best:.2f}" if torch_best else "-"
        print(f"| {title} | {attn_cell} | {torch_cell} | {ratio} |")


if __name__ == "__main__":
    main()
