#!/usr/bin/env python3
"""PyTorch 1.13 twins of the translators attn trains, for a like-for-like training speed.

The twin replays the batches attn trained on, step for step: `attn train` with
ATTN_DUMP_BATCHES=FILE writes every step's token ids (seq2seq/data/batch_log.h: the same subword
vocabulary, the same pairs, the same batch order and padding). This script builds the same
architecture with the same parameter count (printed, compare with attn's "parameters" line),
trains it with the same loss (label-smoothed cross-entropy, padding ignored), gradient clipping,
Adam and warm-up schedule, and prints the steady training rate as attn does: source + target
tokens (one <eos> each) from the first step's start to the last step's start, and the peak RSS.

  transformer: pre-norm nn.Transformer, d_model C, heads, ffn, L + L layers, sinusoidal
               positions, embeddings scaled by sqrt(C), dropout on embeddings / residuals / FFN /
               attention weights, final LayerNorms, generator Linear(C, V)
  gru, lstm:   bidirectional 1-layer encoder (H/2 per direction, lengths packed), one decoder
               cell; luong: s_t = cell([e_t; o_{t-1}], s_{t-1}), c_t = attend(s_t) with the general
               score s^T W h, o_t = tanh(W_c [c_t; s_t]); bahdanau: c_t = attend(s_{t-1}) with
               v^T tanh(W_q s + W_k h + b), s_t = cell([e_t; c_t], s_{t-1}),
               o_t = tanh(W_o [s_t; c_t; e_t]); logits = W_s drop(o_t) + b_s

Run only when Debian's python3-torch is installed (scripts/train_vs_torch.sh drives both sides);
nothing in the build or the tests needs it. Threads: --threads N (torch.set_num_threads); give
OMP_WAIT_POLICY=PASSIVE in the environment for N > 1 (set before torch starts its pool).

Usage: torch_translators.py --batches FILE --arch transformer|gru|lstm [--hidden 128 --emb 64
       --layers 2 --heads 4 --ffn 256 --attention luong-general|bahdanau --dropout P --threads N
       --steps N --lr 2e-3 --warmup 400]
"""
import argparse
import math
import resource
import sys
import time


def read_batches(path, limit):
    """The batch log of seq2seq/data/batch_log.h: (header dict, list of batches)."""
    with open(path) as f:
        head = f.readline().split()
        if head[:2] != ["attn-batches", "1"]:
            sys.exit(f"torch_translators: {path} is not an attn batch log (ATTN_DUMP_BATCHES)")
        header = dict(zip(["source_vocab", "target_vocab", "pad", "bos", "eos"], map(int, head[2:])))
        batches, cur = [], None
        for line in f:
            parts = line.split()
            if parts[0] == "batch":
                if limit and len(batches) == limit:
                    break
                _, step, b, s, t = parts
                cur = {"B": int(b), "S": int(s), "T": int(t)}
                batches.append(cur)
            else:
                cur[parts[0]] = [int(x) for x in parts[1:]]
    return header, batches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", required=True)
    ap.add_argument("--arch", choices=["transformer", "gru", "lstm"], required=True)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--emb", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=0)
    ap.add_argument("--attention", default="luong-general", choices=["luong-general", "bahdanau"])
    ap.add_argument("--dropout", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="0: every batch in the log")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    header, batches = read_batches(a.batches, a.steps)
    Vs, Vt, pad = header["source_vocab"], header["target_vocab"], header["pad"]
    dropout = a.dropout if a.dropout is not None else (0.1 if a.arch == "transformer" else 0.0)

    class Transformer(tnn.Module):
        def __init__(self, C, heads, ffn, layers):
            super().__init__()
            self.C = C
            self.src = tnn.Embedding(Vs, C, padding_idx=pad)
            self.tgt = tnn.Embedding(Vt, C, padding_idx=pad)
            self.core = tnn.Transformer(C, heads, layers, layers, ffn, dropout, batch_first=True,
                                        norm_first=True)
            self.gen = tnn.Linear(C, Vt)
            self.drop = tnn.Dropout(dropout)
            pos = torch.arange(4096).unsqueeze(1)
            div = torch.exp(torch.arange(0, C, 2) * (-math.log(10000.0) / C))
            pe = torch.zeros(4096, C)
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)
            self.register_buffer("pe", pe)

        def forward(self, src, src_pad, tgt_in, tgt_pad):
            S, T = src.shape[1], tgt_in.shape[1]
            x = self.drop(self.src(src) * math.sqrt(self.C) + self.pe[:S])
            y = self.drop(self.tgt(tgt_in) * math.sqrt(self.C) + self.pe[:T])
            causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
            z = self.core(x, y, tgt_mask=causal, src_key_padding_mask=src_pad,
                          tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
            return self.gen(z)  # [B, T, V]

    class Recurrent(tnn.Module):
        def __init__(self, cell, E, H, luong):
            super().__init__()
            self.luong, self.H = luong, H
            rnn = tnn.GRU if cell == "gru" else tnn.LSTM
            cell_t = tnn.GRUCell if cell == "gru" else tnn.LSTMCell
            self.lstm = cell == "lstm"
            self.src = tnn.Embedding(Vs, E, padding_idx=pad)
            self.tgt = tnn.Embedding(Vt, E, padding_idx=pad)
            self.enc = rnn(E, H // 2, batch_first=True, bidirectional=True)
            self.cell = cell_t(E + H, H)
            if luong:
                self.w_score = tnn.Parameter(torch.empty(H, H).uniform_(-H ** -0.5, H ** -0.5))
                self.readout = tnn.Linear(2 * H, H)
            else:
                self.w_q = tnn.Linear(H, H, bias=False)
                self.w_k = tnn.Linear(H, H)
                self.v = tnn.Parameter(torch.empty(H).uniform_(-H ** -0.5, H ** -0.5))
                self.readout = tnn.Linear(2 * H + E, H)
            self.gen = tnn.Linear(H, Vt)
            self.drop = tnn.Dropout(dropout)

        def attend(self, s, memory, keys, mask):
            if self.luong:
                scores = torch.bmm(keys, s.unsqueeze(2)).squeeze(2)  # keys = memory W^T
            else:
                scores = torch.tanh(keys + self.w_q(s).unsqueeze(1)) @ self.v
            a = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=1)
            return torch.bmm(a.unsqueeze(1), memory).squeeze(1)

        def forward(self, src, src_len, src_pad, tgt_in):
            B, T = tgt_in.shape
            x = self.drop(self.src(src))
            packed = tnn.utils.rnn.pack_padded_sequence(x, src_len, batch_first=True,
                                                        enforce_sorted=False)
            out, final = self.enc(packed)
            memory, _ = tnn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                          total_length=src.shape[1])
            h_n = final[0] if self.lstm else final
            h = torch.cat([h_n[0], h_n[1]], dim=1)
            c = torch.cat([final[1][0], final[1][1]], dim=1) if self.lstm else None
            keys = memory @ self.w_score if self.luong else self.w_k(memory)
            e_all = self.drop(self.tgt(tgt_in))
            o = memory.new_zeros(B, self.H)
            outs = []
            for t in range(T):
                e = e_all[:, t]
                if self.luong:
                    inp = torch.cat([e, o], dim=1)
                    if self.lstm:
                        h, c = self.cell(inp, (h, c))
                    else:
                        h = self.cell(inp, h)
                    ctx = self.attend(h, memory, keys, src_pad)
                    o = torch.tanh(self.readout(torch.cat([ctx, h], dim=1)))
                else:
                    ctx = self.attend(h, memory, keys, src_pad)
                    inp = torch.cat([e, ctx], dim=1)
                    if self.lstm:
                        h, c = self.cell(inp, (h, c))
                    else:
                        h = self.cell(inp, h)
                    o = torch.tanh(self.readout(torch.cat([h, ctx, e], dim=1)))
                outs.append(o)
            return self.gen(self.drop(torch.stack(outs, dim=1)))  # [B, T, V]

    if a.arch == "transformer":
        model = Transformer(a.hidden, a.heads, a.ffn or 4 * a.hidden, a.layers)
    else:
        model = Recurrent(a.arch, a.emb, a.hidden, a.attention == "luong-general")
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    warm = max(1, a.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warm, math.sqrt(warm / (k + 1))))  # inverse_sqrt

    # Tensors first, outside the timed loop (attn's batches are built inside its step, a wash).
    prepared = []
    for b in batches:
        B, S, T = b["B"], b["S"], b["T"]
        src = torch.tensor(b["source"]).view(B, S)
        tgt_in = torch.tensor(b["target_input"]).view(T, B).t().contiguous()
        tgt_out = torch.tensor(b["target_output"]).view(T, B).t().contiguous()
        src_len = torch.tensor(b["source_lengths"])
        tokens = sum(b["source_lengths"]) + sum(b["target_lengths"])
        prepared.append((src, src_len, src == pad, tgt_in, tgt_in == pad, tgt_out, tokens))

    model.train()
    losses, stamps, cpu = [], [], []
    for src, src_len, src_pad, tgt_in, tgt_pad, tgt_out, tokens in prepared:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if a.arch == "transformer":
            logits = model(src, src_pad, tgt_in, tgt_pad)
        else:
            logits = model(src, src_len, src_pad, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, Vt), tgt_out.reshape(-1), ignore_index=pad,
                               label_smoothing=a.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    steps = len(prepared)
    seconds = stamps[-1] - stamps[0] if steps > 1 else 0.0
    tokens = sum(p[-1] for p in prepared[:-1])
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"torch {torch.__version__} {a.arch}: {params} parameters, {steps} steps, "
          f"{a.threads} threads, loss first {losses[0]:.4f} last10 {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    print(f"training rate: {tokens} tokens (source + target) in {steps - 1} steps, {seconds:.3f} s: "
          f"{int(tokens / seconds) if seconds > 0 else 0} tokens/s, "
          f"{int(tokens / (cpu[-1] - cpu[0])) if steps > 1 else 0} tokens per CPU second, "
          f"peak RSS {rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
