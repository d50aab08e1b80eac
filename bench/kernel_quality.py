"""What the kernel's int8 activations cost, against float activations and torch's decoded path, on one store:
greedy text on 5 prompts (32 tokens each) and held-out perplexity scored token by token (the 1-token path the kernel
serves in decoding; `inaflash eval` scores 256-token chunks, which take the GEMM path).

    python bench/kernel_quality.py STORE [TOKENS]      (docs/measurements.md: "What quantized activations cost")
"""
import math
import os
import sys
import time

import torch.nn.functional as F

from inaflash.ffn import kernels
from inaflash.calibrate import agreement, heldout_text, token_ids
from inaflash.engine import Engine
from inaflash.generate import generate_ids
from inaflash.store.format import FlashStore

PROMPTS = ["The capital of France is", "def add(a, b):", "Water boils at", "Once upon a time, a small robot",
           "The three primary colors are"]


def main(store_path: str, tokens: int = 1024) -> None:
    store, runs = FlashStore(store_path), {}
    for path in ("int8 activations", "float activations", "torch (decoded)"):  # torch last: it unloads the kernel
        kernels.QUANTIZED_ACTIVATIONS = path == "int8 activations"
        if path.startswith("torch"):  # as INAFLASH_KERNEL=torch does
            kernels.LIB = None
            os.environ["INAFLASH_KERNEL"] = "torch"
        with Engine(store, mode="dram", context=tokens + 8) as engine:
            greedy = [generate_ids(engine, engine.tokenizer(p)["input_ids"], 32, temperature=0.0, stop=set())[0]
                      for p in PROMPTS]
            ids = token_ids(engine, heldout_text(), tokens)
            engine.reset(len(ids))
            nll, t0 = 0.0, time.perf_counter()
            for i in range(len(ids) - 1):
                nll += F.cross_entropy(engine.forward(ids[i:i + 1], i), ids[i + 1:i + 2]).item()
            runs[path] = (greedy, math.exp(nll / (len(ids) - 1)), time.perf_counter() - t0)
    reference = runs["torch (decoded)"][0]
    for path, (greedy, ppl, seconds) in runs.items():
        print(f"{path}: held-out perplexity {ppl:.3f} over {tokens - 1} tokens ({seconds:.0f} s); greedy tokens "
              f"equal to the decoded path's: {[agreement(a, b) for a, b in zip(greedy, reference)]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1024)
