"""Would a drafter other than prompt lookup pay? The greedy agreement of candidate drafters with the target model on
the prompt sets of `inaflash bench --decoding`: the fraction of the target's greedy tokens that the drafter predicts
given the same prefix (the per-token acceptance a speculative pass would see), and what a drafter token costs.

- a draft model sharing the tokenizer (e.g. Qwen2.5-Coder-0.5B-Instruct for the 1.5B), in DRAM;
- self-speculation from what a budget keeps resident: the target with the FFN of only its first K layers (hybrid
  keeps the first layers' FFN in DRAM) and the others skipped (their FFN output zero).

    python bench/draft_acceptance.py TARGET_STORE --draft DRAFT_STORE --tokens 64 --keep 8,14,20

Both models run in dram mode (this measures agreement, not speed under a budget). Writes
bench/results/<date>-draft-acceptance.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from inaflash.engine import Engine
from inaflash.generate import encode_prompt, generate_ids
from inaflash.store.format import FlashStore
from inaflash.tools.decoding import CODE, OPEN
from inaflash.tools.report import free_stem


class SkipFFN:
    """The engine's FFN for the layers in `keep`; zero (the residual stream passes on) for the others."""

    def __init__(self, inner, keep: set[int]):
        self.inner, self.keep = inner, keep

    def begin_forward(self) -> None:
        self.inner.begin_forward()

    def __call__(self, layer: int, x: torch.Tensor, *args) -> torch.Tensor:
        return self.inner(layer, x, *args) if layer in self.keep else torch.zeros_like(x)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def agreement(engine: Engine, ids: list[int], out: list[int]) -> float:
    """Fraction of `out` (the target's greedy continuation of ids) that engine's argmax predicts, teacher-forced."""
    engine.reset(len(ids) + len(out) + 1)
    logits = engine.forward(torch.tensor(ids + out), 0)
    pred = logits[len(ids) - 1: len(ids) + len(out) - 1].argmax(-1).tolist()
    return sum(a == b for a, b in zip(pred, out)) / len(out)


def ms_per_token(engine: Engine, ids: list[int], n: int = 16) -> float:
    engine.reset(len(ids) + n + 1)
    engine.forward(torch.tensor(ids), 0)
    t0 = time.perf_counter()
    for i in range(n):
        engine.forward(torch.tensor([ids[i % len(ids)]]), len(ids) + i)
    return (time.perf_counter() - t0) * 1e3 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--keep", default="8,14,20", help="self-speculation: FFN layers kept (the first K), per row")
    a = ap.parse_args()
    target = Engine(FlashStore(a.target), mode="dram", context=512, speculation="off")
    draft = Engine(FlashStore(a.draft), mode="dram", context=512, speculation="off") if a.draft else None
    keeps = [int(k) for k in a.keep.split(",") if k]
    full = target.ffn
    rows = []
    for kind, prompts in (("code", CODE), ("open", OPEN)):
        for i, prompt in enumerate(prompts):
            target.set_ffn(full)
            ids = encode_prompt(target, prompt)
            out = generate_ids(target, ids, a.tokens, temperature=0.0)[0]
            row = {"set": kind, "prompt": i, "tokens": len(out)}
            if draft is not None:
                if encode_prompt(draft, prompt) != ids:
                    raise SystemExit("the draft model's tokenizer or chat template differs from the target's")
                row["draft_model"] = agreement(draft, ids, out)
            for k in keeps:
                target.set_ffn(SkipFFN(full, set(range(k))))
                row[f"self_first_{k}"] = agreement(target, ids, out)
            rows.append(row)
            print(row, flush=True)
    target.set_ffn(full)
    ids = encode_prompt(target, OPEN[0])
    costs = {"target_dram_ms_per_token": ms_per_token(target, ids)}
    if draft is not None:
        costs["draft_dram_ms_per_token"] = ms_per_token(draft, ids)
    cols = (["draft_model"] if draft is not None else []) + [f"self_first_{k}" for k in keeps]
    mean = {kind: {c: statistics.mean(r[c] for r in rows if r["set"] == kind) for c in cols} for kind in ("code", "open")}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "target": a.target, "draft": a.draft, "tokens": a.tokens,
              "layers": target.config.num_layers, "rows": rows, "mean": mean, "costs": costs}
    out_dir = Path("bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-draft-acceptance")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cmd = f"python bench/draft_acceptance.py {a.target}" + (f" --draft {a.draft}" if a.draft else "") + \
        f" --tokens {a.tokens} --keep {a.keep}"
    lines = [f"# Greedy agreement of drafters with the target ({result['date']})", "", f"`{cmd}`: target "
             f"{Path(a.target).name} ({result['layers']} layers), teacher-forced on its own greedy continuation "
             f"(up to {a.tokens} tokens), mean over the prompts of each set. self_first_K: the target with the FFN "
             "of its first K layers only.", "", "| set | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {kind} | " + " | ".join(f"{mean[kind][c]:.3f}" for c in cols) + " |" for kind in mean]
    lines += ["", "ms per token in dram mode (one token a pass): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
