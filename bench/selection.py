"""Which neurons to compute on a SwiGLU model: selection methods compared at equal density, on quality and on what
they would read (issue 14, part 1). Everything runs dense weights in DRAM (float32, decoded once) with the FFN's
hidden activations masked, so quality is the selection's alone; bytes are derived from the masks.

Methods (per layer; thresholds = quantiles on pydoc calibration text, never on the held-out text):
  oracle      |act(g) * u| > t      the exact criterion (needs every neuron's gate and up: not deployable alone)
  gate        |act(g)| > t          gate-first (CATS): the gate computed exactly from a resident W_gate, then only the
                                    selected neurons' up rows and down columns are read
  gate*u      |act(g)| * mean|u_i| > t   gate-first with a per-neuron estimate of |up| (CHESS-like)
  teal        |x_j| > t_x on the FFN input and |h| > t_h on the down projection's input (TEAL): exact on what it
                                    keeps; reads gate/up columns of kept dimensions, then down columns of kept neurons
  griffin     per prompt: the neurons with the largest normalized activation over the prompt, fixed for the
                                    continuation (GRIFFIN); read once per prompt
  predictor   the store's low-rank predictor (if calibrated), at its own density
"+w4": the union of the last 4 tokens' selections is computed (what a window-4 cache holds: sparse mode's default).

Measured per method: held-out perplexity (The Devil's Dictionary) and top-1 agreement with dense on positions after
a 64-token dense prefix of each 256-token chunk; greedy prefix agreement with dense over 10 prompts of 32 tokens;
density (fraction of neurons computed per token); new per token (fraction not selected by the previous 4 tokens:
what a window-4 cache must read); FFN bytes per token as a fraction of the FFN's (gate-first: the resident gate is
not read, 2/3 of a bundle per new neuron).

    python bench/selection.py STORE [--tokens 4096] [--out bench/results/DATE-selection-NAME]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from inaflash.calibrate import (CHUNK, agreement, calibration_text, heldout_text, recorded_inputs,
                                      token_ids)
from inaflash.engine import Engine
from inaflash.ffn.dense import compute_layout
from inaflash.generate import chat_template_ids
from inaflash.ffn.sparse import WindowHistory, load_sparsity, window_union
from inaflash.store.format import FlashStore

COMMAND = ""
PREFIX = 64  # dense tokens at the start of each chunk (a prompt); scored positions come after
PROMPTS_RAW = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of",
               "Once upon a time, a small robot", "The three primary colors are"]
PROMPTS_CHAT = ["What is the difference between a list and a tuple in Python?", "Give me three tips for sleeping well.",
                "Explain what a hash table is.", "Write a haiku about the sea.", "Why is the sky blue?"]


class SelectFFN:
    """Dense float32 FFN whose hidden activations are masked by a selection method."""

    def __init__(self, weights, act, method: str = "dense", t=None, window: int = 1, ubar=None, predictors=None):
        self.w, self.act, self.method, self.t = weights, act, method, t
        self.ubar, self.predictors = ubar, predictors
        self.windows = WindowHistory(window)  # last window-1 selections per layer (decoding)
        self.fixed: dict[int, torch.Tensor] = {}  # griffin's per-prompt set
        self.masks: dict[int, list[torch.Tensor]] = {}  # every mask, for density and reuse figures
        self.record = False
        self.x_kept = self.x_total = 0

    def begin_forward(self) -> None:
        pass

    def reset_state(self) -> None:
        self.windows.reset()
        self.fixed = {}

    def select(self, layer: int, x, g, u, h) -> torch.Tensor:
        m, t = self.method, self.t
        if m == "oracle":
            return h.abs() > t[layer]
        if m == "gate":
            return self.act(g).abs() > t[layer]
        if m == "gate*u":
            return self.act(g).abs() * self.ubar[layer] > t[layer]
        if m == "predictor":
            return self.predictors[layer](x)
        raise ValueError(m)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        G, U, D = self.w[layer]
        if self.method == "teal":
            keep = x.abs() > self.t[0][layer]
            self.x_kept += int(keep.sum())
            self.x_total += keep.numel()
            x = x * keep
        g, u = x @ G.T, x @ U.T
        h = self.act(g) * u
        if self.method == "dense":
            return h @ D.T
        T = x.shape[0]
        if self.method == "griffin":
            if T > 1:  # a prompt: dense over the prefix, the set from it for the rest
                p = min(T, PREFIX)
                hn = h[:p] / h[:p].norm(dim=1, keepdim=True).clamp_min(1e-12)
                score = hn.norm(dim=0)
                k = max(1, int(self.t * h.shape[1]))
                keep = torch.zeros(h.shape[1], dtype=torch.bool)
                keep[score.topk(k).indices] = True
                self.fixed[layer] = keep
                mask = torch.ones_like(h, dtype=torch.bool)
                mask[p:] = keep
            else:
                mask = self.fixed[layer].unsqueeze(0)
        else:
            mask = (h.abs() > self.t[1][layer]) if self.method == "teal" else self.select(layer, x, g, u, h)
            if T > 1:
                mask[:PREFIX] = True  # the prompt part runs dense (as a prefill over the union would)
            if self.method != "teal":
                mask = self.windows.union(layer, mask)
        if self.record:
            self.masks.setdefault(layer, []).append(mask.expand(T, -1)[PREFIX if T > 1 else 0:].clone())
        return (h * mask) @ D.T


def quantile_thresholds(values_per_layer, density: float) -> list[float]:
    out = []
    for v in values_per_layer:
        v = v.flatten()
        k = max(1, min(v.numel(), int((1 - density) * v.numel())))
        out.append(float(v.kthvalue(k).values))
    return out


def reuse_figures(masks: dict[int, list[torch.Tensor]], window: int = 4) -> tuple[float, float]:
    """(density, new per token): the mean fraction selected, and the fraction not selected by the previous `window`
    tokens of the same sequence (chunks are independent sequences)."""
    sel = new = total = 0
    for chunks in masks.values():
        for m in chunks:
            m = m.bool()
            prev = window_union(m, window)
            seen = torch.zeros_like(m)
            seen[1:] = prev[:-1]
            sel += int(m.sum())
            new += int((m & ~seen).sum())
            total += m.numel()
    return sel / total, new / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--densities", default="0.5,0.4,0.3")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--methods", default="oracle,gate,gate*u,teal,griffin,predictor")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global COMMAND
    COMMAND = "python bench/selection.py " + " ".join(sys.argv[1:])
    densities = [float(d) for d in args.densities.split(",")]
    store = FlashStore(args.store)
    engine = Engine(store, mode="dram", context=max(CHUNK + 1, 200))
    resident = engine.ffn
    cfg = store.config
    t0 = time.perf_counter()
    weights = []
    for layer in range(cfg.num_layers):
        rows = resident.rows[layer]
        w = compute_layout(store, resident.math.decode(rows, layer).float())
        weights.append((w["gate"].contiguous(), w["up"].contiguous(), w["down"].contiguous()))
    del resident.rows
    act = resident.math.math.act

    # calibration statistics (pydoc text, never the held-out text)
    xs = recorded_inputs(engine, SelectFFN(weights, act), token_ids(engine, calibration_text(), args.calib_tokens))
    stats = {"oracle": [], "gate": [], "gate*u": [], "x": [], "ubar": []}
    for layer, x in enumerate(xs):
        G, U, _ = weights[layer]
        g, u = x @ G.T, x @ U.T
        a = act(g).abs()
        ubar = u.abs().mean(0)
        stats["ubar"].append(ubar)
        stats["oracle"].append((a * u.abs()))
        stats["gate"].append(a)
        stats["gate*u"].append(a * ubar)
        stats["x"].append(x.abs())
    calib_s = time.perf_counter() - t0
    print(f"decoded + calibration statistics: {calib_s:.0f} s")

    ids = token_ids(engine, heldout_text(), args.tokens)
    tok = engine.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS_RAW] + \
              [chat_template_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS_CHAT]

    def run(ffn: SelectFFN) -> dict:
        engine.set_ffn(ffn)
        # held-out scoring on positions after each chunk's dense prefix
        ffn.record = True
        nll, count, tops = 0.0, 0, []
        for start in range(0, len(ids) - 1, CHUNK):
            seg = ids[start:start + CHUNK + 1]
            if len(seg) <= PREFIX + 1:
                break
            ffn.reset_state()
            engine.reset(len(seg))
            logits = engine.forward(seg[:-1], 0)[PREFIX:]
            nll += F.cross_entropy(logits, seg[PREFIX + 1:], reduction="sum").item()
            count += len(seg) - 1 - PREFIX
            tops.extend(logits.argmax(-1).tolist())
        ffn.record = False
        density, new = reuse_figures(ffn.masks) if ffn.masks else (1.0, 1.0)
        ffn.masks = {}
        greedy = []
        for p in prompts:
            ffn.reset_state()
            engine.reset(len(p) + args.gen)
            out, pos, cur = [], 0, torch.tensor(p)
            for _ in range(args.gen):
                logits = engine.forward(cur, pos, last_only=True)
                pos += cur.numel()
                nxt = int(logits[-1].argmax())
                out.append(nxt)
                cur = torch.tensor([nxt])
            greedy.append(out)
        return {"ppl": math.exp(nll / count), "tops": tops, "greedy": greedy, "density": density, "new": new,
                "x_density": ffn.x_kept / ffn.x_total if ffn.x_total else None}

    results = []
    dense = run(SelectFFN(weights, act))

    def add(name, density_target, ffn, gate_first=False):
        t1 = time.perf_counter()
        r = run(ffn)
        agree = sum(a == b for a, b in zip(r["tops"], dense["tops"])) / len(dense["tops"])
        greedy = [agreement(a, b) for a, b in zip(r["greedy"], dense["greedy"])]
        # bytes read per token / FFN bytes: gate-first reads 2/3 of a bundle per new neuron (the gate is resident);
        # teal reads gate/up columns of kept dims every token (2/3 * x density) plus the down part of new neurons
        if name.startswith("teal"):
            read = 2 / 3 * r["x_density"] + 1 / 3 * r["new"]
        elif name.startswith("griffin"):
            read = 0.0  # once per prompt
        else:
            read = (2 / 3 if gate_first else 1.0) * r["new"]
        row = {"method": name, "target": density_target, "ppl": r["ppl"], "ppl_increase": r["ppl"] / dense["ppl"] - 1,
               "top1_agreement": agree, "greedy_prefix_mean": sum(greedy) / len(greedy), "greedy_prefix": greedy,
               "density": r["density"], "new_per_token_w4": r["new"], "read_fraction_w4": read,
               "x_density": r["x_density"], "seconds": time.perf_counter() - t1}
        results.append(row)
        print(f"{name:22s} ppl {row['ppl']:.3f} ({row['ppl_increase']:+.2%}) top1 {agree:.3f} greedy "
              f"{row['greedy_prefix_mean']:.1f} {greedy} density {r['density']:.3f} new/tok {r['new']:.3f} "
              f"read {read:.3f}", flush=True)
        save()

    def save() -> None:
        """The table so far (written after every row: a long run that is stopped keeps what it measured)."""
        if not args.out:
            return
        report = {"store": str(store.path), "heldout_tokens": args.tokens, "calibration_tokens": args.calib_tokens,
                  "dense_ppl": dense["ppl"], "prefix": PREFIX, "gen": args.gen, "calibration_seconds": calib_s,
                  "rows": results, "command": COMMAND}
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        lines = [f"# Selection methods on {store.path.name} (`{COMMAND}`)", "",
                 f"Held-out: {args.tokens} tokens of The Devil's Dictionary (positions after a {PREFIX}-token dense "
                 f"prefix per 256-token chunk); dense perplexity {dense['ppl']:.3f}. Greedy: 10 prompts x {args.gen} "
                 f"tokens. Thresholds from {args.calib_tokens} tokens of pydoc text ({calib_s:.0f} s).", "",
                 "| method | ppl | ppl increase | top-1 agreement | greedy prefix (mean of 10) | density | "
                 "new/token (w4) | FFN read/token (w4) |", "|---|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl_increase']:+.2%} | {r['top1_agreement']:.3f} | "
                         f"{r['greedy_prefix_mean']:.1f} | {r['density']:.3f} | {r['new_per_token_w4']:.3f} | "
                         f"{r['read_fraction_w4']:.3f} |")
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")

    methods = args.methods.split(",")
    print(f"dense ppl {dense['ppl']:.3f}")
    for d in densities:
        for m in ("oracle", "gate", "gate*u"):
            if m in methods:
                t = quantile_thresholds(stats[m], d)
                add(f"{m} {d:.0%}", d, SelectFFN(weights, act, m, t, ubar=stats["ubar"]), gate_first=m != "oracle")
                add(f"{m}+w4 {d:.0%}", d, SelectFFN(weights, act, m, t, window=4, ubar=stats["ubar"]),
                    gate_first=m != "oracle")
        if "teal" in methods:
            tx = quantile_thresholds(stats["x"], d)
            add(f"teal {d:.0%}", d, SelectFFN(weights, act, "teal", (tx, quantile_thresholds(stats["oracle"], d))))
        if "griffin" in methods:
            add(f"griffin {d:.0%}", d, SelectFFN(weights, act, "griffin", d))
    spec = load_sparsity(store)
    if "predictor" in methods and spec is not None and spec.predictors:
        add("predictor", None, SelectFFN(weights, act, "predictor", predictors=spec.predictors))
        add("predictor+w4", None, SelectFFN(weights, act, "predictor", window=4, predictors=spec.predictors))
    engine.close()
    save()


if __name__ == "__main__":
    main()
