"""Tokens/s against the whole-process memory limit, per system, from an `inaflash bench ... --limit` result: the
README's headline plot. A system killed under a limit is marked "killed (OOM)" at zero.

    python bench/limits_plot.py bench/results/RESULT.json    # writes RESULT-limits.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"inaflash-auto": "inaflash (default)", "llama.cpp-mmap": "llama.cpp, mmap",
         "transformers-offload": "transformers + accelerate offload"}


def main(path: str) -> Path:
    r = json.loads(Path(path).read_text())
    limits = sorted({b["limit_bytes"] for b in r["baselines"]}, reverse=True)
    systems = [n for n in NAMES if any(b["name"] == n for b in r["baselines"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(systems)
    for k, name in enumerate(systems):
        for j, limit in enumerate(limits):
            b = next((b for b in r["baselines"] if b["name"] == name and b["limit_bytes"] == limit), None)
            if b is None:
                continue
            x = j + (k - (len(systems) - 1) / 2) * width
            tps = b.get("tokens_per_s") if b["status"] == "ok" else 0.0
            ax.bar(x, tps, width, color=f"C{k}", label=NAMES[name] if j == 0 else None)
            ax.text(x, (tps or 0) + 0.05, f"{tps:.2f}" if b["status"] == "ok" else "killed\n(OOM)", ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(limits)), [f"{limit / 1e6:.0f} MB" for limit in limits])
    ax.set_xlabel("whole-process memory limit (cgroup), runtime included")
    ax.set_ylabel("tokens/s (decode)")
    ax.set_title(f"{Path(r['model']).stem}: {r['ffn_bytes'] / 1e6 + r['resident_bytes'] / 1e6:.0f} MB of weights "
                 f"({r['date'][:10]})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path).with_name(Path(path).name.removesuffix(".json") + "-limits.png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
