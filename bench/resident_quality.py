"""What a store's formats cost in quality: stores of one model that differ in --resident-format (attention, head, a
tied embedding) or --ffn-format (with --dkm: palettes learned by differentiable k-means), each run in dram mode against the first as reference: held-out perplexity (The
Devil's Dictionary, 256-token chunks), top-1 agreement at every scored position, greedy prefix agreement over 32
tokens on 10 prompts of my own (5 raw, 5 chat: bench/selection.py's), and one decode step's time.

    python bench/resident_quality.py REFERENCE_STORE STORE... [--tokens N] [--out bench/results/NAME]
"""
import argparse
import json
import sys
import time

import torch

from inaflash.engine import Engine
from inaflash.generate import chat_template_ids, generate_ids
from inaflash.store.format import FlashStore
from inaflash.calibrate import agreement, heldout_text, run_chunks, token_ids

from selection import PROMPTS_CHAT, PROMPTS_RAW


def measure(path: str, tokens: int) -> dict:
    store = FlashStore(path)
    with Engine(store, mode="dram", context=300) as engine:
        ids = token_ids(engine, heldout_text(), tokens)
        tok = engine.tokenizer
        prompts = [tok(p)["input_ids"] for p in PROMPTS_RAW] + \
                  [chat_template_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS_CHAT]
        predictions: list = []
        ppl = run_chunks(engine, ids, predictions=predictions)
        greedy, t0 = [], time.perf_counter()
        for p in prompts:
            greedy.append(generate_ids(engine, p, 32, temperature=0.0, stop=set())[0])
        seconds = time.perf_counter() - t0
        ffn = store.ffn_format + ("+dkm" if store.manifest["ffn"].get("fit") else "")
        return {"store": path, "resident_format": store.resident_format, "ffn_format": ffn,
                "ffn_mb": store.ffn_bytes / 1e6,
                "resident_mb": store.resident_bytes / 1e6, "ppl": ppl,
                "predictions": torch.cat([torch.as_tensor(p).reshape(-1) for p in predictions]),
                "greedy": greedy, "greedy_s": seconds}


def markdown(rows: list[dict], command: str, tokens: int) -> list[str]:
    lines = [f"# Store formats and quality (`{command}`)", "",
             f"Reference: the first row. Held-out: {tokens} tokens of The Devil's Dictionary in 256-token chunks; "
             "greedy: 10 prompts (5 raw, 5 chat) x 32 tokens, dram mode.", "",
             "| store | FFN format | FFN MB | resident format | resident MB | ppl | ppl increase | top-1 agreement | "
             "greedy prefix (mean of 10) | per prompt | 10 generations s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['ffn_format']} | {r['ffn_mb']} | {r['resident_format']} | "
                     f"{r['resident_mb']} | {r['ppl']} | "
                     f"{r['ppl_increase'] * 100:+.2f}% | {r['top1_agreement']:.3f} | {r['greedy_prefix']:.1f} | "
                     f"{r['greedy_prefixes']} | {r['generation_s']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out")
    args = ap.parse_args()
    runs = [measure(s, args.tokens) for s in args.stores]
    ref = runs[0]
    rows = []
    for r in runs:
        rows.append({
            "store": r["store"], "ffn_format": r["ffn_format"], "ffn_mb": round(r["ffn_mb"], 1),
            "resident_format": r["resident_format"], "resident_mb": round(r["resident_mb"], 1),
            "ppl": round(r["ppl"], 3), "ppl_increase": r["ppl"] / ref["ppl"] - 1,
            "top1_agreement": (r["predictions"] == ref["predictions"]).float().mean().item(),
            "greedy_prefix": sum(agreement(a, b) for a, b in zip(r["greedy"], ref["greedy"])) / len(r["greedy"]),
            "greedy_prefixes": [agreement(a, b) for a, b in zip(r["greedy"], ref["greedy"])],
            "generation_s": round(r["greedy_s"], 1),
        })
    command = "python bench/resident_quality.py " + " ".join(sys.argv[1:])
    lines = markdown(rows, command, args.tokens)
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
