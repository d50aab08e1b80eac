"""`inaflash probe`: this device's random-read throughput and latency by request size and parallelism (the paper's
Figure 2b), measured with the engine's own O_DIRECT reader; and the coalescing gap that follows from it.

The profile (JSON) is saved to $INAFLASH_HOME/device-profile.json, where the engine picks up its `max_gap`: merge
two neighbouring bundle reads when reading the bytes between them costs less time than a second request.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from ..errors import InaflashError
from ..reader import FlashReader, aligned_buffer
from ..store.format import ALIGN

CHUNKS = [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]
PARALLEL = [1, 2, 4, 8, 16, 32]
ENGINE_PARALLEL = 8  # reads in flight the engine typically has (its reader's thread count)


def measure_cell(reader: FlashReader, size: int, parallel: int, seconds: float, file_size: int,
                 buffers: list, rng: random.Random) -> dict:
    """Random aligned reads of `size` bytes, `parallel` at a time, for about `seconds`."""
    slots = (file_size - size) // ALIGN
    done_bytes, batches, t0 = 0, 0, time.perf_counter()
    while True:
        requests = [(rng.randrange(slots) * ALIGN, buffers[i][:size]) for i in range(parallel)]
        reader.read(requests)
        done_bytes += size * parallel
        batches += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and batches >= 2:
            break
    return {"mb_per_s": done_bytes / elapsed / 1e6, "latency_us": elapsed / batches * 1e6,
            "iops": batches * parallel / elapsed}


def probe(path: str | Path, seconds: float = 60.0, repeat: int = 3, chunks: list[int] | None = None,
          parallel: list[int] | None = None, progress: bool = True, seed: int = 0) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InaflashError(f"probe file not found: {path}")
    chunks, parallel = chunks or CHUNKS, parallel or PARALLEL
    file_size = path.stat().st_size
    if file_size < 4 * max(chunks):
        raise InaflashError(f"probe file {path} is {file_size} bytes: at least {4 * max(chunks)} needed")
    cell_s = seconds / (repeat * len(chunks) * len(parallel))
    rng = random.Random(seed)
    buffers = [aligned_buffer(max(chunks)) for _ in range(max(parallel))]
    runs: dict[tuple[int, int], list[dict]] = {(c, p): [] for c in chunks for p in parallel}
    cells = [(c, p) for c in chunks for p in parallel]
    bar = tqdm(total=repeat * len(cells), desc="probe", unit="cell", disable=not progress)
    readers = {p: FlashReader(path, threads=p) for p in parallel}
    try:
        direct = all(r.direct for r in readers.values())
        for _ in range(repeat):  # rounds interleave the grid, so the disk's drift over minutes hits every cell
            rng.shuffle(cells)
            for c, p in cells:
                runs[(c, p)].append(measure_cell(readers[p], c, p, cell_s, file_size, buffers, rng))
                bar.update()
    finally:
        bar.close()
        for r in readers.values():
            r.close()
    grid = []
    for (c, p), rs in sorted(runs.items()):
        row = {"chunk_bytes": c, "parallel": p}
        for key in ("mb_per_s", "latency_us", "iops"):
            values = [r[key] for r in rs]
            row[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        grid.append(row)
    profile = {"file": str(path), "file_bytes": file_size, "o_direct": direct, "repeat": repeat,
               "seconds_per_cell": cell_s, "grid": grid, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    profile["max_gap"] = coalescing_gap(profile)
    return profile


def throughput(profile: dict, size: int, parallel: int = ENGINE_PARALLEL) -> float:
    """Median MB/s for reads of `size` bytes at `parallel` in flight, interpolated (log-size) between grid points."""
    import math

    nearest = min({r["parallel"] for r in profile["grid"]}, key=lambda q: abs(q - parallel))
    rows = sorted((r["chunk_bytes"], r["mb_per_s"]["median"]) for r in profile["grid"] if r["parallel"] == nearest)
    if size <= rows[0][0]:
        return rows[0][1] * size / rows[0][0]  # below the smallest size, requests bound the rate
    for (s0, t0), (s1, t1) in zip(rows, rows[1:]):
        if size <= s1:
            f = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return t0 + f * (t1 - t0)
    return rows[-1][1]


def coalescing_gap(profile: dict, bundle_bytes: int = 8 << 10) -> int:
    """The largest gap g (multiple of 4 KiB) such that one read of 2b + g takes no longer than two reads of b."""
    def cost(size: int) -> float:
        return size / throughput(profile, size)

    b = (bundle_bytes + ALIGN - 1) // ALIGN * ALIGN
    gap = 0
    while gap < (1 << 20) and cost(2 * b + gap + ALIGN) <= 2 * cost(b):
        gap += ALIGN
    return gap


def plot(profile: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in sorted({r["parallel"] for r in profile["grid"]}):
        rows = [r for r in profile["grid"] if r["parallel"] == p]
        x = [r["chunk_bytes"] / 1024 for r in rows]
        med = [r["mb_per_s"]["median"] for r in rows]
        ax1.plot(x, med, marker="o", label=f"{p} in flight")
        ax1.fill_between(x, [r["mb_per_s"]["min"] for r in rows], [r["mb_per_s"]["max"] for r in rows], alpha=0.15)
        ax2.plot(x, [r["latency_us"]["median"] / 1e3 for r in rows], marker="o", label=f"{p} in flight")
    for ax, label in ((ax1, "MB/s (median; band: min-max)"), (ax2, "batch latency, ms (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("read size, KiB")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    direct = "O_DIRECT" if profile["o_direct"] else "buffered + DONTNEED"
    fig.suptitle(f"random reads ({direct}) of {Path(profile['file']).name}; coalescing gap "
                 f"{profile['max_gap'] // 1024} KiB")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


COMPUTE_SHAPES = [(576, 1536), (1536, 8960)]  # (hidden, neurons): SmolLM2-135M and Qwen2.5-1.5B layers
COMPUTE_FRACTIONS = [1.0, 0.5, 0.25, 0.1, 0.05]
COMPUTE_FORMATS = ["float", "int8", "int4", "palette4", "palette3"]  # float = float16 bundles


COMPUTE_ROTATE_BYTES = 128 << 20  # cycle over copies of a layer adding up to this: more than the L3, as a model's
                                  # layers stream from DRAM (one 26 MB layer reused stays in a 32 MB L3: ~30% faster)


COMPUTE_TOKENS = [1, 8]  # one token (decode), and a pass over 8 (a prefill chunk's piece, speculation, a batch)
RESIDENT_SHAPE = (8960, 1536)  # rows x columns of a resident matrix measured (int8, int4): a Qwen2.5 layer's worth


def compute_roofline(shapes: list[tuple[int, int]] | None = None, fractions: list[float] | None = None,
                     seconds_per_cell: float = 0.3, progress: bool = True) -> dict:
    """The FFN kernel's speed (G weights/s) per bundle format over a layer's first `fraction` of neurons (a cache's
    live block; one token), and over whole layers for 8 tokens, each call on another copy of the layer so the
    weights come from DRAM; the resident int8/int4 matrices' (attention, head) for 1 and 8 tokens; and this
    machine's memory bandwidth (a 256 MiB copy): the compute roofline to put next to the disk's. Random weights:
    speed does not depend on their values."""
    import torch

    from .. import native
    from ..store import quant
    from ..ffn.kernels import BundleFFN, available

    rows, shapes, fractions = [], shapes or COMPUTE_SHAPES, fractions or COMPUTE_FRACTIONS
    a = torch.empty(256 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    copy_s = _median_time(lambda: b.copy_(a), 1.0)
    cells = [(s, f, t, fr) for s in shapes for f in COMPUTE_FORMATS for t in COMPUTE_TOKENS
             for fr in (fractions if t == 1 else [1.0])]
    bar = tqdm(total=len(cells) + 2 * len(COMPUTE_TOKENS), desc="compute", unit="cell", disable=not progress)
    for d, n in shapes:
        fields = {"gate": (0, d), "up": (d, 2 * d), "down": (2 * d, 3 * d)}
        bundles = torch.randn(n, 3 * d, generator=torch.Generator().manual_seed(0)) * 0.05
        for fmt in COMPUTE_FORMATS:
            raw, books = (bundles.half().view(torch.uint8).view(n, -1), {}) if fmt == "float" else \
                quant.encode(fmt, bundles, fields)
            kernel = BundleFFN(fmt, fields, torch.float16, raw.shape[1], d, "silu", books=[books] if books else None)
            copies = [raw.clone() for _ in range(max(2, -(-COMPUTE_ROTATE_BYTES // raw.numel())))]
            for _, _, tokens, fr in [c for c in cells if c[0] == (d, n) and c[1] == fmt]:
                m, x = max(1, int(n * fr)), torch.randn(tokens, d)
                if kernel.ok:  # each call on the next copy, then the next slice of m neurons: 128 MiB between repeats
                    blocks = [c[k * m:(k + 1) * m] for k in range(n // m) for c in copies]
                    turn = iter(range(1 << 62))
                    t = _median_time(lambda: kernel(x, blocks[next(turn) % len(blocks)], m), seconds_per_cell)
                    rows.append({"what": "FFN bundles", "hidden": d, "neurons": n, "format": fmt, "tokens": tokens,
                                 "fraction": fr, "ms": t * 1e3, "g_weights_per_s": tokens * 3 * d * m / t / 1e9,
                                 "gb_per_s": m * raw.shape[1] / t / 1e9})
                bar.update()
    r, c = RESIDENT_SHAPE
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(1)) * 0.05
    for fmt, matrix in (("int8", quant.Int8Matrix(*quant.Int8Matrix.quantize(w))),
                        ("int4", quant.Int4Matrix(quant.Int4Matrix.quantize(w)))):
        for tokens in COMPUTE_TOKENS:
            x = torch.randn(tokens, c)
            t = _median_time(lambda: matrix.linear(x), seconds_per_cell)
            rows.append({"what": "resident matrix", "hidden": c, "neurons": r, "format": fmt, "tokens": tokens,
                         "fraction": 1.0, "ms": t * 1e3, "g_weights_per_s": tokens * r * c / t / 1e9,
                         "gb_per_s": None})
            bar.update()
    bar.close()
    return {"kernel": available(), "variant": native.VARIANT, "threads": torch.get_num_threads(),
            "copy_gb_per_s": 2 * a.numel() / copy_s / 1e9, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _median_time(fn, seconds: float) -> float:
    fn()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
