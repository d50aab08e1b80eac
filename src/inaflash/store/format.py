"""The flash store: the on-disk format, its writer (convert) and its validating opener.

A store is a directory:
  manifest.json          format version, model config, dtype, file sizes + sha256, FFN layout
  resident.safetensors   everything that stays in DRAM: attention, norms, head, fc2 bias (the embedding too when it is
                         tied to the head); `--resident-format int8`: matrices as int8 codes + `NAME.scale` per row
  embed.bin              an untied input embedding, rows back to back (read one row per token; see embedding.py)
  palettes.safetensors   palette FFN formats: per layer and field, the k-means codebook (see quant.py)
  ffn.bin                per layer, neuron i's bundle [gate_i | up_i | down[:, i]] (OPT: [fc1_i | b1_i | fc2[:, i]]),
                         bundles back to back, each layer starting on a 4096-byte boundary; `--ffn-format` int8,
                         int4, palette4, palette3 compress each bundle in place (see quant.py).
                         `convert --unbundled` (for the bundling ablation) writes instead, per layer, one block per
                         field ([n, field width]: gate rows, up rows, down columns), each block 4096-aligned, so a
                         neuron takes one read per field
  tokenizer/             the tokenizer files (tokenizer.json, chat template, ...)
  checksums.safetensors  CRC-32C of every 4096-byte page of ffn.bin and embed.bin (uint32 per page)
The manifest lists every file's size and sha256 and each resident tensor's CRC-32C, and carries its own sha256
(`manifest_sha256`, over its canonical JSON). So every byte inaflash uses is checked as it is read: pages of flash
reads by the reader (checksum.py), resident tensors as they load, small files (tokenizer, palettes, predictors, the
checksums themselves) whole as they are opened. The manifest is written last, by write_manifest() alone, and the
directory is renamed into place, so anything without a manifest is not a store. convert.py writes stores;
manifest.py reads, checks and writes manifest.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checksum, quant
from ..config import ModelConfig
from ..errors import StoreError
from .manifest import CHECKSUM_FILE, _count, _inside, read_manifest
from .quant import PALETTE_FILE, Int4Matrix, Int8Matrix

ALIGN = 4096
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def bundle_fields(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Column ranges of one neuron's bundle row."""
    d = cfg.hidden_size
    if cfg.family == "opt":
        return {"fc1": (0, d), "fc1_bias": (d, d + 1), "fc2": (d + 1, 2 * d + 1)}
    return {"gate": (0, d), "up": (d, 2 * d), "down": (2 * d, 3 * d)}


def ffn_tensor_names(cfg: ModelConfig, layer: int) -> list[str]:
    """The source tensors that go to ffn.bin (in bundle order); everything else is resident."""
    if cfg.family == "opt":
        p = f"model.decoder.layers.{layer}."
        return [p + "fc1.weight", p + "fc1.bias", p + "fc2.weight"]
    p = f"model.layers.{layer}.mlp."
    return [p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"]


def build_bundles(cfg: ModelConfig, tensors: list[torch.Tensor]) -> torch.Tensor:
    """[intermediate, width] matrix whose row i is neuron i's bundle."""
    if cfg.family == "opt":
        fc1, b1, fc2 = tensors
        return torch.cat([fc1, b1[:, None], fc2.T], dim=1)
    gate, up, down = tensors
    return torch.cat([gate, up, down.T], dim=1)


def field_blocks(cfg: ModelConfig, itemsize: int) -> dict[str, int]:
    """Unbundled layout: each field's block offset from the layer's start (blocks 4096-aligned)."""
    blocks, pos = {}, 0
    for name, (a, b) in bundle_fields(cfg).items():
        blocks[name] = pos
        pos += round_up(cfg.intermediate_size * (b - a) * itemsize)
    return blocks


LAYOUTS = ("bundled", "unbundled")
RESIDENT_FORMATS = {
    "float": "attention, embeddings and head in --dtype",
    "int8": "attention, embeddings and head as int8 with a per-row scale (norms and biases stay float32)",
    "int4": "attention, embeddings and head as int4 with a float16 scale and minimum per 32 (~5 bits; int8 where a "
            "width is not a multiple of 64)",
}
EMBED_FILE = "embed.bin"
EMBED_BATCH = 64  # embedding rows looked up per read batch (embedding.py), so its buffer stays small


def is_resident_matrix(name: str) -> bool:
    """The resident tensors --resident-format int8/int4 quantizes: the attention projections, embeddings and head."""
    return name.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight"))


@dataclass(frozen=True)
class LayerExtent:
    offset: int  # byte offset of neuron 0's bundle in ffn.bin (4096-aligned)
    nbytes: int  # neurons * bundle_bytes
    span: int  # nbytes rounded up to the alignment: what a whole-layer O_DIRECT read fetches


class FlashStore:
    """An opened, validated store: the manifest's checksum, structure, paths and file sizes checked, the page
    checksums of the flash files loaded (checked by the readers as data arrives)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        try:
            self.config = ModelConfig.from_dict(m["config"])
        except (TypeError, KeyError, AttributeError) as e:
            raise StoreError(f"store {self.path}: manifest.json's config is malformed ({e})") from None
        try:
            self._open(m)
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
            raise StoreError(f"store {self.path}: manifest.json is malformed ({type(e).__name__}: {e})") from None

    def _open(self, m: dict) -> None:
        self.dtype_name = m["dtype"]
        if self.dtype_name not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype_name!r}")
        self.dtype = DTYPES[self.dtype_name]
        ffn = m["ffn"]
        self.ffn_path = _inside(self.path, ffn["file"], "FFN file")
        self.fields = {k: tuple(v) for k, v in ffn["fields"].items()}
        self.bundle_width = _count(ffn["bundle_width"], "bundle_width", low=1)
        self.bundle_bytes = _count(ffn["bundle_bytes"], "bundle_bytes", low=1)  # on flash
        self.ffn_format = ffn.get("format", "float")
        if self.ffn_format not in quant.FFN_FORMATS:
            raise ValueError(f"unknown FFN format {self.ffn_format!r}")
        self.quantized = self.ffn_format != "float"
        self.row_bytes = self.bundle_width * self.dtype.itemsize  # one neuron in DRAM, in the compute dtype
        self.resident_format = m.get("resident", {}).get("format", "float")
        self.embed = m.get("resident", {}).get("embed")  # {"file", "row_bytes", "rows"} when embeddings are on flash
        self.layout = ffn.get("layout", "bundled")
        self.blocks = ffn.get("blocks")  # unbundled: field -> block offset within the layer
        self.layers = [LayerExtent(**e) for e in ffn["layers"]]
        # the layout follows from the config and the format: a manifest that says otherwise is not believed
        if self.fields != {k: tuple(v) for k, v in bundle_fields(self.config).items()} or \
                self.bundle_width != max(b for _, b in self.fields.values()) or \
                self.bundle_bytes != quant.bundle_bytes(self.ffn_format, self.bundle_width, self.fields,
                                                        self.dtype.itemsize):
            raise ValueError(f"bundle fields {self.fields} of {self.bundle_bytes} bytes do not follow from the config "
                             f"and format {self.ffn_format}")
        if self.layout not in LAYOUTS or (self.layout == "unbundled") != isinstance(self.blocks, dict) or \
                (self.blocks is not None and self.blocks != field_blocks(self.config, self.dtype.itemsize)):
            raise ValueError(f"FFN layout {self.layout!r} with blocks {self.blocks!r}")
        if self.resident_format not in RESIDENT_FORMATS or not (self.embed is None or isinstance(self.embed, dict)):
            raise ValueError(f"resident format {self.resident_format!r}, embedding {self.embed!r}")
        files = m["files"]
        named = {ffn["file"], "resident.safetensors", m["checksums"]["file"]} | \
            ({self.embed["file"]} if self.embed else set())
        unlisted = sorted(named - set(files))
        if unlisted:
            raise StoreError(f"store {self.path}: manifest lists no size or checksum for {unlisted[0]}")
        for name, info in files.items():
            f = _inside(self.path, name, "file")
            want = _count(info["bytes"], f"{name}'s size")
            if not isinstance(info["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", info["sha256"]):
                raise ValueError(f"{name}'s sha256 is not a sha256")
            if not f.is_file():
                raise StoreError(f"store {self.path} is missing {name}")
            size = f.stat().st_size
            if size != want:
                raise StoreError(f"store {self.path}: {name} is {size} bytes but the manifest says {want} "
                                 f"(truncated or modified; re-run inaflash convert)")
        self._check_tiling(files[ffn["file"]]["bytes"], ffn["file"])
        if self.embed is not None:
            _inside(self.path, self.embed.get("file"), "embedding file")
            rows, row_bytes = _count(self.embed["rows"], "embedding rows", 1), _count(self.embed["row_bytes"], "row", 1)
            if rows * row_bytes > files[self.embed["file"]]["bytes"] or rows != self.config.vocab_size or \
                    row_bytes != self.config.hidden_size * self.dtype.itemsize or not isinstance(self.embed["name"], str):
                raise ValueError(f"embedding of {rows} rows x {row_bytes} bytes does not fit {self.embed['file']}")
        self.palettes = None
        if self.ffn_format.startswith("palette"):
            from safetensors.torch import load

            books = load(self.read_verified(PALETTE_FILE))
            self.palettes = [{f: books[f"{i}.{f}"] for f in quant.palettized(self.fields)} for i in
                             range(len(self.layers))]
        self.page_crcs = self._page_checksums(m["checksums"])

    def _check_tiling(self, ffn_size: int, name: str) -> None:
        """The layers tile the FFN file exactly as convert writes it: layer i starts where layer i-1's span ends (the
        first at 0), each holds its n bundles and spans them rounded up to the alignment (the unbundled layout: its
        field blocks, each rounded up), and the last ends at the file's end. So which bytes are layer i follows from
        the config alone: a manifest that points a layer at another's bytes, or before the file, is refused here;
        the page checksums then bind those bytes (a manifest edited with its sha256 recomputed passed before, and
        a layer read at a negative offset failed as a disk error)."""
        n = self.config.intermediate_size
        nbytes = n * self.bundle_bytes
        span = round_up(nbytes) if self.layout == "bundled" else \
            sum(round_up(n * (b - a) * self.dtype.itemsize) for a, b in self.fields.values())
        if len(self.layers) != self.config.num_layers:
            raise ValueError(f"{len(self.layers)} layer extents for a model of {self.config.num_layers} layers")
        at = 0
        for i, e in enumerate(self.layers):
            if (e.offset, e.nbytes, e.span) != (at, nbytes, span):
                raise ValueError(f"layer {i}'s extent (offset {e.offset}, {e.nbytes} bytes, span {e.span}) is not "
                                 f"where the layers tile {name}: offset {at}, {nbytes} bytes, span {span}")
            at += span
        if at != ffn_size:
            raise ValueError(f"{name} is {ffn_size} bytes; its {len(self.layers)} layers tile {at}")

    def _page_checksums(self, entry: dict) -> dict[str, np.ndarray]:
        """File name -> uint32 CRC-32C per 4096-byte page, for the files read from flash."""
        from safetensors.numpy import load

        if entry.get("algorithm") != checksum.ALGORITHM or entry.get("page") != checksum.PAGE:
            raise ValueError(f"checksums {entry.get('algorithm')!r} per {entry.get('page')} bytes (this inaflash "
                             f"checks {checksum.ALGORITHM} per {checksum.PAGE})")
        data = self.read_verified(entry["file"])
        try:
            tables = load(data)
        except Exception as e:  # safetensors' own errors
            raise StoreError(f"store {self.path}: {entry['file']} is unreadable ({e})") from None
        files = self.manifest["files"]
        for name in [self.manifest["ffn"]["file"]] + ([self.embed["file"]] if self.embed else []):
            t = tables.get(name)
            if t is None or t.dtype != np.uint32 or t.shape != (-(-files[name]["bytes"] // checksum.PAGE),):
                raise StoreError(f"store {self.path}: {entry['file']} has no page checksums for {name}")
        return tables

    def pages(self, path: Path, checked: bool = True) -> np.ndarray | None:
        """The page checksums a reader of `path` (a file of this store) checks, or None when not `checked`."""
        return self.page_crcs[Path(path).relative_to(self.path).as_posix()] if checked else None

    def read_verified(self, name: str) -> bytes:
        """A small file of the store, whole, checked against its sha256."""
        path = _inside(self.path, name, "file")
        info = self.manifest["files"].get(name)
        if info is None:
            raise StoreError(f"store {self.path}: manifest lists no size or checksum for {name}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise StoreError(f"store {self.path}: {name} does not match its sha256 (damaged; re-convert the store)")
        return data

    @functools.cached_property
    def regions(self) -> list[tuple[tuple[int, int], int, int, int]]:
        """Where a neuron's bytes lie in a layer, per region read: (its bundle columns, the region's offset in the
        layer, bytes per neuron, the unit read plans count offsets in). One region for the bundled layout (whole
        bundles, in bytes); one per field block for the unbundled one (in elements)."""
        if self.layout == "bundled":
            return [((0, self.bundle_width), 0, self.bundle_bytes, 1)]
        item = self.dtype.itemsize
        return [((a, b), self.blocks[name], (b - a) * item, item) for name, (a, b) in self.fields.items()]

    def layer_rows(self, buf: torch.Tensor) -> torch.Tensor:
        """A whole layer read into `buf` (uint8) as bundle rows [neurons, bundle_bytes], as stored: the bytes
        themselves in the bundled layout, reassembled from the field blocks in the unbundled one."""
        n = self.config.intermediate_size
        if self.layout == "bundled":
            return buf[: n * self.bundle_bytes].view(n, self.bundle_bytes)
        out = torch.empty(n, self.bundle_width, dtype=self.dtype)
        for (a, b), start, nbytes, _ in self.regions:
            out[:, a:b] = buf[start: start + n * nbytes].view(self.dtype).view(n, b - a)
        return out.view(torch.uint8)

    def decode(self, raw: torch.Tensor, layer: int) -> torch.Tensor:
        """Bundles of `layer` as stored ([m, bundle_bytes] uint8) -> [m, bundle_width] in the compute dtype (a view
        for float stores)."""
        books = self.palettes[layer] if self.palettes else None
        return quant.decode(self.ffn_format, raw, self.fields, self.bundle_width, self.dtype, books)

    @property
    def ffn_bytes(self) -> int:
        """Bytes of FFN weights (all bundles of all layers)."""
        return sum(e.nbytes for e in self.layers)

    @property
    def ffn_read_bytes(self) -> int:
        """Bytes a dense pass reads: every layer's aligned span."""
        return sum(e.span for e in self.layers)

    @property
    def resident_bytes(self) -> int:
        """What the resident part holds in DRAM: its tensors, the palettes' codebooks, the page checksums, and for
        an embedding on flash only the read buffer of its lookups."""
        files = self.manifest["files"]
        embed_buffer = EMBED_BATCH * (round_up(self.embed["row_bytes"]) + ALIGN) if self.embed else 0
        return files["resident.safetensors"]["bytes"] + files.get(PALETTE_FILE, {}).get("bytes", 0) + embed_buffer \
            + files[CHECKSUM_FILE]["bytes"]  # the page checksums stay in DRAM

    def head_name(self) -> str | None:
        """The output head's tensor in the resident part (a tied one is the embedding's), None for a model
        whose head is named otherwise (OPT)."""
        names = self.manifest["resident"].get("crc32c", {})
        return next((n for n in ("lm_head.weight", "model.embed_tokens.weight") if n in names), None)

    @functools.cached_property
    def _resident_header(self) -> tuple[int, dict]:
        """(where the data starts, the header) of resident.safetensors, read once."""
        with open(self.path / "resident.safetensors", "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return 8 + n, json.loads(f.read(n)) if 0 < n < 1 << 27 else {}

    def resident_span(self, name: str) -> tuple[int, int, list[int]]:
        """(file offset, bytes, shape) of tensor `name`'s data in resident.safetensors, from the file's header."""
        try:
            data, header = self._resident_header
            start, end = header[name]["data_offsets"]
            return data + int(start), int(end) - int(start), [int(d) for d in header[name]["shape"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"store {self.path}: resident.safetensors has no readable {name} ({e}); re-convert "
                             "the store") from None

    def resident_weights(self, check: bool = True, unchecked: frozenset = frozenset()) -> dict[str, torch.Tensor]:
        """Name -> tensor, or quant.Int8Matrix for int8 matrices (stored as `name` codes + `name.scale`), or
        quant.Int4Matrix for int4 ones (a uint8 tensor: the format's rows as stored). `check`:
        each tensor's CRC-32C against the manifest's (~50 ms for Qwen2.5-1.5B's 390 MB), but those `unchecked`
        (mapped, never touched here: a head read from flash checks itself, streamed.FlashMatrix)."""
        from safetensors.torch import load_file

        name = "resident.safetensors"
        try:
            w = load_file(str(self.path / name))
        except Exception as e:  # a damaged header: safetensors' own error, naming no file
            raise StoreError(f"store {self.path}: {name} is unreadable ({e}); re-convert the store") from None
        if check:
            want = self.manifest["resident"].get("crc32c", {})
            if sorted(w) != sorted(want):
                raise StoreError(f"store {self.path}: {name} holds other tensors than its manifest lists "
                                 "(damaged; re-convert the store)")
            for n, t in w.items():
                if n not in unchecked and checksum.crc32c(t) != want[n]:
                    raise StoreError(f"store {self.path}: tensor {n} of {name} does not match its checksum "
                                     "(damaged; re-convert the store)")
        for n in [n for n in w if n.endswith(".scale")]:
            base = n[: -len(".scale")]
            w[base] = Int8Matrix(w[base], w.pop(n))
        for n in [n for n, t in w.items() if isinstance(t, torch.Tensor) and t.dtype == torch.uint8]:
            try:
                w[n] = Int4Matrix(w[n])
            except ValueError as e:
                raise StoreError(f"store {self.path}: tensor {n} of {name}: {e} (damaged; re-convert the store)") \
                    from None
        return w

    def tokenizer(self):
        tok_dir = self.path / "tokenizer"
        if not tok_dir.is_dir():
            return None
        for name in self.manifest["files"]:
            if name.startswith("tokenizer/"):
                self.read_verified(name)
        return _load_tokenizer(str(tok_dir.resolve()))

    def verify(self) -> None:
        """Check everything against the manifest (reads the whole store): every file's sha256, every page checksum
        against the data, every resident tensor's checksum. (The manifest's own was checked at open.)"""
        for name, info in self.manifest["files"].items():
            if checksum.sha256_file(_inside(self.path, name, "file")) != info["sha256"]:
                raise StoreError(f"store {self.path}: {name} does not match its sha256 (damaged; re-convert)")
        for name, table in self.page_crcs.items():
            bad = np.flatnonzero(checksum.file_page_crcs(self.path / name) != table)
            if bad.size:
                raise StoreError(f"store {self.path}: page checksums of {name} disagree from byte "
                                 f"{bad[0] * checksum.PAGE} (damaged; re-convert)")
        self.resident_weights(check=True)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    """Shared by every engine on the same store. tokenizer.json loads with `tokenizers` and the chat template renders
    with jinja2 (store/tokenizer.py), without transformers: the same ids and text (tests/test_tokenizer.py). A store
    without tokenizer.json falls back to transformers' AutoTokenizer."""
    if (Path(path) / "tokenizer.json").exists():
        from .tokenizer import Tokenizer

        return Tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
