"""The native library built for x86-64-v3 (what setup.py builds) against -march=native on this CPU: the FFN kernel's
G weights/s per bundle format on a Qwen2.5-shaped layer (1536 x 8960, one token; probe's compute_roofline), each
build in a child process, alternated `--rounds` times.

    python bench/march_ab.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "inaflash"
PROBE = r"""
import json, sys
from inaflash.tools.probe import compute_roofline
r = compute_roofline(shapes=[(1536, 8960)], fractions=[1.0], seconds_per_cell=1.5, progress=False)
print(json.dumps({row["format"]: round(row["g_weights_per_s"], 2) for row in r["rows"]
                  if row["what"] == "FFN bundles" and row["tokens"] == 1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    installed = next(SRC.glob("_kernels.*so"))
    original = installed.read_bytes()
    out = Path(tempfile.mkdtemp())
    builds = {}
    for march in ("x86-64-v3", "native"):
        builds[march] = out / f"k-{march}.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O3", f"-march={march}", "-fopenmp", "-std=c11",
                        f"-I{sysconfig.get_paths()['include']}", *(str(SRC / f) for f in
                        ("kernels.c", "crc32c.c", "ops.c", "uring.c")), "-o", str(builds[march])], check=True)
    try:
        for r in range(a.rounds):
            for march, lib in builds.items():
                installed.write_bytes(lib.read_bytes())
                res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                     env={**os.environ, "INAFLASH_KERNEL": "avx2"})  # the library built here
                print(f"round {r + 1}, -march={march}: G weights/s {json.loads(res.stdout.splitlines()[-1])}",
                      flush=True)
    finally:
        installed.write_bytes(original)


if __name__ == "__main__":
    main()
