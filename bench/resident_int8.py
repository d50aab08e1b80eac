"""Resident int8 matrices (head, attention) times a few tokens: the native kernel (Int8Matrix.linear, activations
quantized to int8 per 32) against torch's int8pack kernel (bfloat16 activations), at Qwen2.5-1.5B's shapes.

    python bench/resident_int8.py

Random codes (the speed does not depend on the values); the head (151936 x 1536, 233 MB) streams from DRAM on every
call, the attention matrices stay in cache. Writes bench/results/DATE-resident-int8.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from inaflash.store import quant

SHAPES = [("q / o projection", 1536, 1536), ("k / v projection", 256, 1536), ("head", 151936, 1536)]


def ms(f, reps: int) -> float:
    for _ in range(3):
        f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    rows = []
    for name, n, k in SHAPES:
        m = quant.Int8Matrix(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).to(torch.bfloat16))
        for tokens in (1, 2, 4, 8):
            x = torch.randn(tokens, k)
            reps = 30 if n > 100_000 else 500
            native = ms(lambda: m.linear(x), reps)
            # int8pack is only a reference here: under torch's AVX-512 kernels it crashes on unaligned weights
            torch_ms = ms(lambda: torch._weight_int8pack_mm(x.to(torch.bfloat16), m.codes, m.scales).float(), reps)
            path = "native" if quant.MATVEC is not None else "torch"
            rows.append({"matrix": name, "rows": n, "cols": k, "tokens": tokens, "linear_ms": native,
                         "int8pack_ms": torch_ms, "path": path})
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y-%m-%d')}-resident-int8"
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
              "native": quant.MATVEC is not None, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Resident int8 matrix x tokens ({result['date']}, {result['threads']} threads)", "",
             "`python bench/resident_int8.py`: Int8Matrix.linear (the path it takes) against torch's int8pack kernel.",
             "", "| matrix | rows x cols | tokens | Int8Matrix.linear ms (path) | G weights/s | int8pack ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['matrix']} | {r['rows']} x {r['cols']} | {r['tokens']} | {r['linear_ms']:.3f} ({r['path']}) | "
              f"{r['rows'] * r['cols'] * r['tokens'] / r['linear_ms'] / 1e6:.1f} | {r['int8pack_ms']:.3f} |"
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
