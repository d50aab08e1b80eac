"""What checking every read against its page checksums costs, measured token by token.

    python bench/checksum_cost.py STORE [--memory 530MB] [--modes naive,auto] [--tokens 64]

The disk's speed drifts by 20-50% between runs of a minute here (bench/results: the same configuration's rounds),
more than the check costs, so comparing a checked run with an unchecked one measures the drift. Instead one engine
alternates: even tokens with the check, odd tokens without (the readers' page tables swapped in and out between
tokens), so both halves see the same disk. Reports the median and mean ms/token of each half and their ratio, and
the hashing rate of this machine. Writes bench/results/DATE-checksum-cost-MODEL.{json,md} (-run2, ... for later runs that day).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from inaflash.store import checksum
from inaflash.engine import Engine
from inaflash.generate import encode_prompt
from inaflash.store.format import FlashStore
from inaflash.tools.report import free_stem


def hash_rate() -> float:
    data = np.random.default_rng(0).integers(0, 256, 256 << 20, dtype=np.uint8)
    checksum.page_crcs(data)
    t0 = time.perf_counter()
    checksum.page_crcs(data)
    return data.size / (time.perf_counter() - t0)


def measure(store: FlashStore, mode: str, memory: str | None, tokens: int) -> dict:
    with Engine(store, mode=mode, memory=memory, context=tokens + 64) as e:
        readers = [e.reader] + ([e.embedding.reader] if e.embedding is not None else [])
        tables = [r.pages for r in readers]
        ids = encode_prompt(e, "Write a Python function that merges two sorted lists, and explain it.", raw=False)
        e.reset(len(ids) + tokens + 1)
        e.forward(torch.tensor(ids), 0, last_only=True)
        times = {True: [], False: []}
        pos, token = len(ids), ids[-1]
        for i in range(tokens):
            checked = i % 2 == 0
            for r, t in zip(readers, tables):
                r.pages = t if checked else None
            t0 = time.perf_counter()
            logits = e.forward(torch.tensor([token]), pos, last_only=True)
            times[checked].append((time.perf_counter() - t0) * 1e3)
            token, pos = int(logits[-1].argmax()), pos + 1
        for r, t in zip(readers, tables):
            r.pages = t
        on, off = times[True], times[False]
        return {"mode": e.mode, "tokens": tokens, "checked_ms_median": statistics.median(on),
                "unchecked_ms_median": statistics.median(off), "checked_ms_mean": statistics.mean(on),
                "unchecked_ms_mean": statistics.mean(off),
                "cost_median": statistics.median(on) / statistics.median(off) - 1,
                "cost_mean": statistics.mean(on) / statistics.mean(off) - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--memory", default=None)
    ap.add_argument("--modes", default="naive,auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    store = FlashStore(args.store)
    rate = hash_rate()
    rows = [measure(store, m, args.memory, args.tokens) | {"requested": m} for m in args.modes.split(",")]
    name = Path(store.manifest["source"]["path"] or store.path).stem
    result = {"store": str(store.path), "model": name, "memory": args.memory, "crc32c_bytes_per_s": rate,
              "native": checksum.native(), "rows": rows,
              "command": f"python bench/checksum_cost.py {args.store} --memory {args.memory} --modes {args.modes} "
                         f"--tokens {args.tokens}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / free_stem(out, f"{time.strftime('%Y-%m-%d')}-checksum-cost-{name}")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# The cost of checking every read: {name}", "", f"`{result['command']}`; CRC-32C "
             f"{'native' if result['native'] else 'google-crc32c'} {rate / 1e9:.1f} GB/s per thread; tokens "
             "alternate checked / unchecked in one engine", "",
             "| mode (asked -> ran) | tokens | checked ms (median / mean) | unchecked ms (median / mean) | cost (median / mean) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['requested']} -> {r['mode']} | {r['tokens']} | {r['checked_ms_median']:.1f} / "
                     f"{r['checked_ms_mean']:.1f} | {r['unchecked_ms_median']:.1f} / {r['unchecked_ms_mean']:.1f} | "
                     f"{100 * r['cost_median']:+.1f}% / {100 * r['cost_mean']:+.1f}% |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
