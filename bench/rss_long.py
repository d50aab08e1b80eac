"""A long generation at a binding memory budget: does the process's RSS stay flat after warm-up?

    python bench/rss_long.py [--model STORE] [--memory 60%] [--tokens 1000]

Generates `tokens` tokens (sampled, seeded, no stop token) with the engine's default mode for the budget, sampling
the RSS every 25 tokens; reports RSS after warm-up (token 100), at the end, the largest, and the least-squares slope
over the rest (MB per 100 tokens). Writes bench/results/DATE-rss-TOKENS-MODEL.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import inaflash
from inaflash.generate import GenerationStats, encode_prompt, stream_ids
from inaflash.memory import rss_bytes

WARMUP = 100
EVERY = 25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--memory", default="60%")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    prompt = "Tell a long story about a lighthouse keeper who collects old hard disks."
    runtime = rss_bytes()
    with inaflash.load(args.model, memory=args.memory, context=args.tokens + 64) as m:
        e = m.engine
        ids = encode_prompt(e, prompt, raw=False)
        samples, stats, t0 = [], GenerationStats(), time.perf_counter()
        for n, _ in enumerate(stream_ids(e, ids, args.tokens, temperature=0.8, top_p=0.95, seed=7, stop=set(),
                                         stats=stats), start=1):
            if n % EVERY == 0 or n == 1:
                samples.append((n, rss_bytes(), time.perf_counter() - t0))
        budget = e.choice.budget if e.choice is not None else None
        mode, reason, name = e.mode, e.choice.reason if e.choice else "", m.name
    tokens = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples]) / 1e6
    after = tokens >= WARMUP
    slope = float(np.polyfit(tokens[after], rss[after], 1)[0] * 100) if after.sum() > 2 else None
    at_warm = float(rss[after][0])
    result = {"model": name, "memory": args.memory, "budget_bytes": budget, "mode": mode, "choice": reason,
              "tokens": int(tokens[-1]), "runtime_rss_mb": runtime / 1e6, "rss_mb_at_warmup": at_warm,
              "rss_mb_at_end": float(rss[-1]), "rss_mb_max_after_warmup": float(rss[after].max()),
              "growth_after_warmup_mb": float(rss[-1] - at_warm), "slope_mb_per_100_tokens": slope,
              "ms_per_token": stats.ms_per_token, "samples": [{"token": int(t), "rss_mb": float(r)}
                                                              for t, r in zip(tokens, rss)],
              "command": "python bench/rss_long.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y-%m-%d')}-rss-{args.tokens}-{name}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = (f"# RSS over a {result['tokens']}-token generation: {name}, --memory {args.memory} (mode {mode})\n\n"
          f"`{result['command']}`; {stats.ms_per_token:.0f} ms/token; the choice: {reason}\n\n"
          f"| runtime before load | after warm-up (token {WARMUP}) | at the end | max after warm-up | growth | "
          f"slope |\n|---|---|---|---|---|---|\n"
          f"| {runtime / 1e6:.0f} MB | {at_warm:.1f} MB | {rss[-1]:.1f} MB | {rss[after].max():.1f} MB | "
          f"{rss[-1] - at_warm:+.1f} MB | {slope:+.2f} MB / 100 tokens |\n")
    Path(f"{stem}.md").write_text(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(tokens, rss)
        ax.axvline(WARMUP, ls=":", c="gray")
        ax.set_xlabel("tokens generated")
        ax.set_ylabel("RSS (MB)")
        ax.set_title(f"{name}, --memory {args.memory} ({mode})")
        fig.tight_layout()
        fig.savefig(Path(f"{stem}.png"), dpi=100)
    except ImportError:
        pass
    print(md)


if __name__ == "__main__":
    main()
