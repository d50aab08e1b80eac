"""manifest.json: read (and checked against its own sha256), written (sealed, atomically) and finished with the
store's checksums, here only; and the two guards on what a manifest may name (counts in range, files inside the
store)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from . import checksum
from ..errors import StoreError

FORMAT = "inaflash-store"
FORMAT_VERSION = 2  # 2: checksums (pages, resident tensors, the manifest itself)
CHECKSUM_FILE = "checksums.safetensors"


def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise StoreError(f"store not found: {path}")
    mpath = path / "manifest.json"
    if not mpath.exists():
        if (path / "ffn.bin").exists() or ".partial-" in path.name:
            raise StoreError(f"{path} is an incomplete store (no manifest.json): a conversion was interrupted; convert again")
        raise StoreError(f"not an inaflash store: {path} (no manifest.json)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"corrupt manifest {mpath}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"not an inaflash store: {mpath} has no \"format\": \"{FORMAT}\"")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"store {path} has format version {m.get('format_version')}, this inaflash reads version "
            f"{FORMAT_VERSION}: convert the model again"
        )
    if m.get("manifest_sha256") != manifest_digest(m):
        raise StoreError(f"store {path}: manifest.json does not match its own checksum (edited by hand or damaged); "
                         "re-convert the store")
    return m


def peek_manifest(path: Path) -> dict | None:
    """A directory's manifest if it is an inaflash one (any version, checksum unchecked), else None: enough to know
    that a directory is a store (convert --overwrite) or of which version (a cached conversion)."""
    try:
        m = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def manifest_digest(m: dict) -> str:
    """sha256 of a manifest's canonical JSON, its own checksum left out."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def new_manifest(**fields) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}


def write_manifest(directory: Path, manifest: dict) -> dict:
    """The one writer of manifest.json (convert, calibrate, the synthetic store): sealed with its checksum and
    replaced atomically. Returns it as a reader will load it."""
    m = json.loads(json.dumps(manifest))  # canonical: what a reader will load
    m.pop("manifest_sha256", None)
    m["manifest_sha256"] = manifest_digest(m)
    tmp = Path(directory) / ".manifest.json.tmp"
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, Path(directory) / "manifest.json")
    return m


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": checksum.sha256_file(path)}


def seal(directory: Path, manifest: dict, resident: dict[str, torch.Tensor]) -> None:
    """Finish a store whose files are all written: page checksums of the files read from flash, CRC-32C of each
    resident tensor, size and sha256 of every file, then the manifest."""
    from safetensors.numpy import save_file

    paged = [manifest["ffn"]["file"]] + ([manifest["resident"]["embed"]["file"]]
                                         if manifest["resident"].get("embed") else [])
    save_file({name: checksum.file_page_crcs(directory / name) for name in paged}, str(directory / CHECKSUM_FILE))
    manifest["checksums"] = {"file": CHECKSUM_FILE, "algorithm": checksum.ALGORITHM, "page": checksum.PAGE}
    manifest["resident"]["crc32c"] = {n: checksum.crc32c(t) for n, t in sorted(resident.items())}
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest["files"] = {p.relative_to(directory).as_posix(): file_entry(p) for p in files}
    write_manifest(directory, manifest)


def _count(v: object, what: str, low: int = 0) -> int:
    """An integer from a manifest, in range (a bool, float or 10**30 is not a size)."""
    if type(v) is not int or not low <= v < 1 << 48:
        raise ValueError(f"{what} {v!r} is not an integer in [{low}, 2**48)")
    return v


def _inside(root: Path, name: object, what: str) -> Path:
    """`root / name` for a file named by a manifest, refused unless it is a plain relative path that stays inside
    the store (no absolute path, no `..`, no symlink out): a manifest never makes inaflash read elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise StoreError(f"store {root}: manifest names {what} {name!r}, not a file inside the store")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"store {root}: manifest's {what} {name!r} leads outside the store (a symlink)")
    return path


