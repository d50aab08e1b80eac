"""Batched decoding: aggregate decode tokens/s of 1, 2, 4 and 8 sequences decoded together (generate_batch: one
pass over the weights per step for all), one engine, greedy, speculation off (one token per sequence per pass).

    python bench/batching.py [STORE] --mode naive --memory 80% --tokens 48

Writes bench/results/<date>-batching-<model>-<mode>.json and .md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import inaflash
from inaflash.generate import encode_prompt, generate_batch
from inaflash.tools.decoding import STREAM_PROMPTS
from inaflash.tools.report import free_stem

from common import command, model_args

PROMPTS = STREAM_PROMPTS


def main() -> None:
    ap = model_args(__doc__, context=256, tokens=48)
    ap.add_argument("--widths", default="1,2,4,8")
    a = ap.parse_args()
    model = inaflash.load(a.store, mode=a.mode, memory=a.memory, context=a.context, speculation="off")
    engine = model.engine
    ids = [encode_prompt(engine, p) for p in PROMPTS]
    rows = []
    for width in [int(w) for w in a.widths.split(",")]:
        out, s = generate_batch(engine, ids[:width], a.tokens, stop=set())
        decoded = s.generated_tokens - width
        rows.append({"sequences": width, "passes": s.decode_steps, "tokens_per_pass": s.tokens_per_pass,
                     "decode_s": s.decode_ms / 1e3, "aggregate_tok_s": decoded / (s.decode_ms / 1e3),
                     "ms_per_pass": s.decode_ms / max(s.decode_steps, 1),
                     "mb_read_per_pass": s.bytes_read_per_pass / 1e6})
        r = rows[-1]
        print(f"{width} sequences: {r['aggregate_tok_s']:.1f} tok/s aggregate, {r['ms_per_pass']:.1f} ms/pass, "
              f"{r['mb_read_per_pass']:.1f} MB/pass", flush=True)
    one = rows[0]["aggregate_tok_s"]
    for r in rows:
        r["speedup_over_one"] = r["aggregate_tok_s"] / one
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model.name, "mode": engine.mode,
              "memory": a.memory, "context": a.context, "tokens": a.tokens, "rows": rows}
    out_dir = Path("bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-batching-{model.name}-{engine.mode}")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cmd = command("batching.py", a, f"--widths {a.widths}")
    lines = [f"# Batched decoding: {model.name}, {engine.mode} ({result['date']})", "", f"`{cmd}`; greedy, speculation "
             "off, one engine, widths run one after another.", "",
             "| sequences | passes | tokens/pass | ms/pass | MB read/pass | aggregate tok/s | vs one |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sequences']} | {r['passes']} | {r['tokens_per_pass']:.2f} | {r['ms_per_pass']:.1f} | "
              f"{r['mb_read_per_pass']:.1f} | {r['aggregate_tok_s']:.1f} | {r['speedup_over_one']:.2f}x |" for r in rows]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    engine.close()


if __name__ == "__main__":
    main()
