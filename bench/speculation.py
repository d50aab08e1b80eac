"""Speculation (prompt lookup) against plain decoding, one engine, prompts alternated, greedy: tokens/s of decode,
tokens per pass, drafts accepted, and whether the token ids are identical.

    python bench/speculation.py [STORE] --mode naive --memory 80% --tokens 96

The two prompt sets of `inaflash bench --decoding`: code edits (the answer largely repeats the prompt) and open-ended questions. Each prompt
runs plain then speculative in the same engine (the same reads, the same page cache state: O_DIRECT), repeated
`--repeat` times; medians. Writes bench/results/<date>-speculation-<model>-<mode>.json and .md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import inaflash
from inaflash.generate import Generation, encode_prompt
from inaflash.tools.decoding import CODE, OPEN  # the prompt sets of `inaflash bench --decoding`
from inaflash.tools.report import free_stem

from common import command, model_args


def run(engine, prompt: str, tokens: int, speculation: str) -> dict:
    engine.options = inaflash.Options.of(engine.options, speculation=speculation)
    ids = encode_prompt(engine, prompt)
    gen = Generation(engine, ids, tokens, temperature=0.0)
    t0 = time.perf_counter()
    for _ in gen:
        pass
    wall = time.perf_counter() - t0
    s = gen.stats
    return {"ids": gen.token_ids, "tokens": s.generated_tokens, "decode_tok_s": 1e3 / s.ms_per_token if s.ms_per_token
            else 0.0, "passes": s.decode_steps, "tokens_per_pass": s.tokens_per_pass, "drafted": s.drafted_tokens,
            "accepted": s.accepted_tokens, "wall_s": wall, "bytes_per_token": s.bytes_read_per_token}


def main() -> None:
    ap = model_args(__doc__, context=512, tokens=96)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    model = inaflash.load(a.store, mode=a.mode, memory=a.memory, context=a.context)
    engine = model.engine
    rows = []
    for kind, prompts in (("code", CODE), ("open", OPEN)):
        for i, prompt in enumerate(prompts):
            runs = {"off": [], "lookup": []}
            for _ in range(a.repeat):
                for spec in ("off", "lookup"):
                    runs[spec].append(run(engine, prompt, a.tokens, spec))
            off, on = runs["off"][-1], runs["lookup"][-1]
            med = {k: statistics.median(r["decode_tok_s"] for r in v) for k, v in runs.items()}
            rows.append({"set": kind, "prompt": i, "tokens": off["tokens"], "plain_tok_s": med["off"],
                         "spec_tok_s": med["lookup"], "speedup": med["lookup"] / med["off"] if med["off"] else 0,
                         "tokens_per_pass": on["tokens_per_pass"], "drafted": on["drafted"],
                         "accepted": on["accepted"], "identical": on["ids"] == off["ids"],
                         "same_prefix": next((j for j, (x, y) in enumerate(zip(on["ids"], off["ids"])) if x != y),
                                             min(len(on["ids"]), len(off["ids"]))),
                         "mb_per_token_plain": off["bytes_per_token"] / 1e6,
                         "mb_per_token_spec": on["bytes_per_token"] / 1e6})
            r = rows[-1]
            print(f"{kind} {i}: {r['plain_tok_s']:.1f} -> {r['spec_tok_s']:.1f} tok/s ({r['speedup']:.2f}x), "
                  f"{r['tokens_per_pass']:.2f} tokens/pass, identical {r['identical']}", flush=True)
    summary = {kind: statistics.geometric_mean([r["speedup"] for r in rows if r["set"] == kind and r["speedup"] > 0])
               for kind in ("code", "open")}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model.name, "mode": engine.mode,
              "memory": a.memory, "context": a.context, "tokens": a.tokens, "repeat": a.repeat, "rows": rows,
              "speedup_geomean": summary, "pass_costs_s": {str(k): v for k, v in sorted(engine.pass_costs.seconds.items())}}
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out, f"{time.strftime('%Y-%m-%d')}-speculation-{model.name}-{engine.mode}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cmd = command("speculation.py", a, f"--repeat {a.repeat}")
    lines = [f"# Speculation (prompt lookup) vs plain decoding: {model.name}, {engine.mode} ({result['date']})", "",
             f"`{cmd}`; greedy; each prompt plain then speculative in one engine. Geometric-mean speed-up of decode "
             f"tokens/s: code edits {summary['code']:.2f}x, open-ended {summary['open']:.2f}x.", "",
             "| set | prompt | tokens | plain tok/s | speculative tok/s | speed-up | tokens/pass | accepted/drafted | "
             "identical ids (first difference) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['prompt']} | {r['tokens']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['tokens_per_pass']:.2f} | {r['accepted']}/{r['drafted']} | "
                     f"{'yes' if r['identical'] else 'no (' + str(r['same_prefix']) + ')'} |")
    lines += ["", "Pass cost by width (seconds, EMA): " + ", ".join(f"{k}: {v * 1e3:.1f} ms"
                                                                  for k, v in result["pass_costs_s"].items())]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    model.engine.close()


if __name__ == "__main__":
    main()
