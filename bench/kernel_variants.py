"""The native library's variants against each other on this CPU (setup.py builds AVX2, AVX-VNNI and AVX512-VNNI;
native.py loads the best the CPU runs): G weights/s of the FFN kernel on a Qwen2.5-shaped layer (1536 x 8960) per
bundle format for 1 and 8 tokens, and of the resident int8/int4 matrices (probe's compute_roofline), each variant in
a child process (INAFLASH_KERNEL=<variant>), alternated `--rounds` times; medians over rounds.

    python bench/kernel_variants.py --rounds 3

Writes bench/results/<date>-kernel-variants.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from inaflash.tools.report import free_stem

PROBE = r"""
import json
from inaflash import native
from inaflash.tools.probe import compute_roofline
r = compute_roofline(shapes=[(1536, 8960)], fractions=[1.0], seconds_per_cell=1.0, progress=False)
print(json.dumps({"variant": native.VARIANT, "rows": r["rows"]}))
"""


def main() -> None:
    from inaflash.native import LABELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for label in LABELS:
            res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                 env={**os.environ, "INAFLASH_KERNEL": label})
            out = json.loads(res.stdout.splitlines()[-1])
            if out["variant"] != label:
                print(f"{label}: not built or not run by this CPU", flush=True)
                continue
            runs.setdefault(label, []).append(out)
            print(f"round {r + 1}, {label}: " + ", ".join(
                f"{x['what'][:8]} {x['format']} x{x['tokens']} {x['g_weights_per_s']:.1f}" for x in out["rows"]),
                flush=True)
    keys = [(x["what"], x["format"], x["tokens"]) for x in next(iter(runs.values()))[0]["rows"]]
    table = {label: {k: statistics.median(next(x["g_weights_per_s"] for x in run["rows"]
                                               if (x["what"], x["format"], x["tokens"]) == k) for run in rs)
                     for k in keys} for label, rs in runs.items()}
    base = table.get("avx2")
    lines = [f"# Kernel variants on this CPU ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"`python bench/kernel_variants.py --rounds {a.rounds}`: G weights/s (each weight counted once per token), "
             "medians over rounds, variants alternated, Qwen2.5-shaped layer 1536 x 8960 (FFN bundles: gate, up, "
             "down) and a resident 8960 x 1536 matrix.", "",
             "| what | format | tokens | " + " | ".join(table) + " |", "|---|---|---|" + "---|" * len(table)]
    for k in keys:
        cells = [f"{t[k]:.1f}" + (f" ({t[k] / base[k]:.2f}x)" if base and label != "avx2" else "")
                 for label, t in table.items()]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    out_dir = Path("bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-kernel-variants")
    (out_dir / f"{stem}.json").write_text(json.dumps({"runs": runs, "rounds": a.rounds}, indent=1))
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
