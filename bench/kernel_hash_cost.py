"""What the FFN kernel's own page hashing costs, next to hashing in a pass of its own.

    python bench/kernel_hash_cost.py STORE [--rounds 4]

Every layer of STORE's FFN is read once into DRAM (as naive mode's buffers hold them), then one token's FFN is
computed over all layers three ways, alternating within each round: the kernel alone; the kernel hashing the pages
under the rows it computes (what naive/hybrid run, then FlashReader.verify); the pages hashed apart first
(FlashReader.check), then the kernel. Prints ms per token of each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from inaflash.ffn.dense import BundleMath
from inaflash.reader import FlashReader, aligned_buffer
from inaflash.store import checksum
from inaflash.store.format import FlashStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    store = FlashStore(args.store)
    reader = FlashReader(store.ffn_path, pages=store.pages(store.ffn_path, True))
    math = BundleMath(store)
    if not math.hashes(1):
        raise SystemExit("the native kernel is not built here: nothing to compare")
    layers = []
    for e in store.layers:
        buf = aligned_buffer(e.span)[: e.span]
        reader.read([(e.offset, buf)])
        layers.append((e, buf))
    x = torch.randn(1, store.config.hidden_size)

    def token(how: str) -> float:
        t0 = time.perf_counter()
        for i, (e, buf) in enumerate(layers):
            rows = store.layer_rows(buf)
            if how == "apart":
                reader.check(e.offset, buf)
            if how == "kernel":
                crcs = np.empty(buf.numel() // checksum.PAGE, dtype=np.uint32)
                math(x, rows, rows.shape[0], i, crcs=crcs)
                assert not reader.verify(e.offset, buf, crcs)
            else:
                math(x, rows, rows.shape[0], i)
        return (time.perf_counter() - t0) * 1e3

    print(f"{store.ffn_read_bytes / 1e6:.1f} MB of FFN, one token, ms:")
    for _ in range(args.rounds):
        print("  " + ", ".join(f"{how} {token(how):.1f}" for how in ("unchecked", "kernel", "apart")))
    reader.close()


if __name__ == "__main__":
    main()
