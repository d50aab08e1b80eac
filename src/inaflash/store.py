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
The manifest is written last and the directory is renamed into place, so anything without a manifest is not a store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ModelConfig
from .errors import InaflashError, StoreError, UnsupportedModelError
from . import quant
from .quant import FFN_FORMATS, PALETTE_FILE, Int8Matrix

FORMAT = "inaflash-store"
FORMAT_VERSION = 1
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
}
EMBED_FILE = "embed.bin"
EMBED_BATCH = 64  # embedding rows looked up per read batch (embedding.py), so its buffer stays small


def is_resident_matrix(name: str) -> bool:
    """The resident tensors --resident-format int8 quantizes: the attention projections, embeddings and head."""
    return name.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight"))


@dataclass(frozen=True)
class LayerExtent:
    offset: int  # byte offset of neuron 0's bundle in ffn.bin (4096-aligned)
    nbytes: int  # neurons * bundle_bytes
    span: int  # nbytes rounded up to the alignment: what a whole-layer O_DIRECT read fetches


class FlashStore:
    """An opened, validated store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        try:
            self.config = ModelConfig.from_dict(m["config"])
        except (TypeError, KeyError, AttributeError) as e:
            raise StoreError(f"store {self.path}: manifest.json's config is malformed ({e})") from None
        self.dtype_name = m["dtype"]
        self.dtype = DTYPES[self.dtype_name]
        ffn = m["ffn"]
        self.ffn_path = _inside(self.path, ffn["file"], "FFN file")
        self.fields = {k: tuple(v) for k, v in ffn["fields"].items()}
        self.bundle_width = ffn["bundle_width"]
        self.bundle_bytes = ffn["bundle_bytes"]  # on flash
        self.ffn_format = ffn.get("format", "float")
        self.quantized = self.ffn_format != "float"
        self.row_bytes = self.bundle_width * self.dtype.itemsize  # one neuron in DRAM, in the compute dtype
        self.resident_format = m.get("resident", {}).get("format", "float")
        self.embed = m.get("resident", {}).get("embed")  # {"file", "row_bytes", "rows"} when embeddings are on flash
        self.palettes = None
        if self.ffn_format.startswith("palette"):
            from safetensors.torch import load_file

            books = load_file(str(self.path / PALETTE_FILE))
            self.palettes = [{f: books[f"{i}.{f}"] for f in quant.palettized(self.fields)} for i in
                             range(len(ffn["layers"]))]
        self.layout = ffn.get("layout", "bundled")
        self.blocks = ffn.get("blocks")  # unbundled: field -> block offset within the layer
        self.layers = [LayerExtent(**e) for e in ffn["layers"]]
        if self.embed is not None:
            _inside(self.path, self.embed.get("file"), "embedding file")
        named = {ffn["file"], "resident.safetensors"} | ({self.embed["file"]} if self.embed else set())
        unlisted = sorted(named - set(m["files"]))
        if unlisted:
            raise StoreError(f"store {self.path}: manifest lists no size or checksum for {unlisted[0]}")
        for name, info in m["files"].items():
            f = _inside(self.path, name, "file")
            if not f.exists():
                raise StoreError(f"store {self.path} is missing {name}")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise StoreError(
                    f"store {self.path}: {name} is {size} bytes but the manifest says {info['bytes']} "
                    f"(truncated or modified; re-run inaflash convert)"
                )

    def decode(self, raw: torch.Tensor, layer: int) -> torch.Tensor:
        """Bundles of `layer` as stored ([m, bundle_bytes] uint8) -> [m, bundle_width] in the compute dtype."""
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
        """What the resident part holds in DRAM: its tensors, the palettes' codebooks, and for an embedding on flash
        only the read buffer of its lookups."""
        files = self.manifest["files"]
        embed_buffer = EMBED_BATCH * (round_up(self.embed["row_bytes"]) + ALIGN) if self.embed else 0
        return files["resident.safetensors"]["bytes"] + files.get(PALETTE_FILE, {}).get("bytes", 0) + embed_buffer

    def resident_weights(self) -> dict[str, torch.Tensor]:
        """Name -> tensor, or quant.Int8Matrix for int8 matrices (stored as `name` codes + `name.scale`)."""
        from safetensors.torch import load_file

        w = load_file(str(self.path / "resident.safetensors"))
        for name in [n for n in w if n.endswith(".scale")]:
            base = name[: -len(".scale")]
            w[base] = Int8Matrix(w[base], w.pop(name))
        return w

    def tokenizer(self):
        tok_dir = self.path / "tokenizer"
        return _load_tokenizer(str(tok_dir.resolve())) if tok_dir.is_dir() else None

    def verify(self) -> None:
        """Check every file's sha256 against the manifest (reads the whole store)."""
        for name, info in self.manifest["files"].items():
            if _sha256(_inside(self.path, name, "file")) != info["sha256"]:
                raise StoreError(f"store {self.path}: {name} does not match its sha256 (corrupt; re-convert)")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    """Shared by every engine on the same store. tokenizer.json loads as is (PreTrainedTokenizerFast): the same ids
    and chat template as AutoTokenizer here, with less memory (Qwen2.5's: 78 vs 136 MB of RSS after trimming)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _read_manifest(path: Path) -> dict:
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
    return m


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The shape the config implies for a source tensor (None for names it does not constrain)."""
    d, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tail = name.split(".layers.", 1)[-1].split(".", 1)[-1] if ".layers." in name else name
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "model.norm.weight": (d,),
              "model.decoder.embed_tokens.weight": (v, d),
              "mlp.gate_proj.weight": (n, d), "mlp.up_proj.weight": (n, d), "mlp.down_proj.weight": (d, n),
              "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
              "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
              "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
              "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
              "fc1.weight": (n, d), "fc1.bias": (n,), "fc2.weight": (d, n), "fc2.bias": (d,),
              "self_attn.out_proj.weight": (d, q)}
    return shapes.get(tail)


def _checked(source, name: str, cfg: ModelConfig) -> torch.Tensor:
    """source.tensor(name), refused (nothing written) if its shape is not the one the config implies: a GGUF whose
    feed_forward_length says 1535 for 1536-row tensors once converted and ran with a neuron silently dropped."""
    t = source.tensor(name)
    want = expected_shape(cfg, name)
    if want is not None and tuple(t.shape) != want:
        raise InaflashError(f"source {source.path}: tensor {name} has shape {list(t.shape)}, but the model's config "
                            f"implies {list(want)} (a config or file that does not match its weights)")
    return t


def _check_replaceable(out: Path, source: Path) -> None:
    """--overwrite replaces an inaflash store only: never another directory or file, never the source model or a
    directory holding it (`convert src src --overwrite` once deleted the model's own weights)."""
    if out.is_symlink() or not out.is_dir():
        raise InaflashError(f"refusing to overwrite {out}: it is not an inaflash store (a file or a link)")
    src, dst = source.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise InaflashError(f"refusing to overwrite {out}: it holds the source model {source}")
    try:
        m = json.loads((out / "manifest.json").read_text())
        ours = isinstance(m, dict) and m.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise InaflashError(f"refusing to overwrite {out}: it is not an inaflash store (no inaflash manifest.json); "
                            "remove it yourself or choose another output")


def _remove_dead_partials(out: Path) -> None:
    """Leftovers of conversions into `out` that were killed (SIGKILL, power loss): `.NAME.partial-PID` whose process
    is gone. Those of a live process (a conversion running beside this one) are left alone."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or leftover.is_symlink() or not leftover.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def _inside(root: Path, name: object, what: str) -> Path:
    """`root / name` for a file named by a manifest, refused unless it is a plain relative path that stays inside
    the store (no absolute path, no `..`, no symlink out): a manifest never makes inaflash read elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise StoreError(f"store {root}: manifest names {what} {name!r}, not a file inside the store")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"store {root}: manifest's {what} {name!r} leads outside the store (a symlink)")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _layer_bytes(cfg: ModelConfig, bundles: torch.Tensor, layout: str, ffn_format: str) -> list[memoryview]:
    """One layer's data for ffn.bin: the bundle matrix, or (unbundled) each field's block padded to alignment."""
    if ffn_format != "float":
        raise AssertionError("compressed bundles are encoded by write_store")
    if layout == "bundled":
        return [_tensor_bytes(bundles)]
    parts = []
    for a, b in bundle_fields(cfg).values():
        data = _tensor_bytes(bundles[:, a:b])
        parts += [data, memoryview(bytes(round_up(len(data)) - len(data)))]
    return parts[:-1]  # the layer's own padding follows


def write_store(source, out: str | Path, dtype: str = "float16", overwrite: bool = False,
                progress: bool = True, layout: str = "bundled", ffn_format: str = "float",
                resident_format: str = "float", embeddings_on_flash: bool = True) -> Path:
    """Convert `source` (a sources.ModelSource) into a store at `out`, atomically.

    `embeddings_on_flash`: an untied input embedding goes to embed.bin (one row read per token) instead of DRAM;
    a tied one is the output head, which every token needs whole, so it stays resident either way."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise InaflashError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if layout not in LAYOUTS:
        raise InaflashError(f"unknown FFN layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if ffn_format not in FFN_FORMATS:
        raise InaflashError(f"unknown FFN format {ffn_format!r}; choose one of {', '.join(FFN_FORMATS)}")
    if resident_format not in RESIDENT_FORMATS:
        raise InaflashError(f"unknown resident format {resident_format!r}; choose one of {', '.join(RESIDENT_FORMATS)}")
    if ffn_format != "float" and layout != "bundled":
        raise InaflashError(f"FFN format {ffn_format} is written bundled only (not with --unbundled)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InaflashError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() or out.is_symlink():
        _check_replaceable(out, Path(source.path))
    cfg, tdtype = source.config, DTYPES[dtype]
    names = source.names()
    ffn_names = {n for layer in range(cfg.num_layers) for n in ffn_tensor_names(cfg, layer)}
    missing = sorted(ffn_names - names)
    if missing:
        raise InaflashError(f"source {source.path} lacks FFN weights, e.g. {missing[0]}")
    if any(n.endswith(("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")) for n in names):
        raise UnsupportedModelError("Llama-family MLP biases (mlp_bias=True) are not supported")
    cfg.tie_word_embeddings = "lm_head.weight" not in names

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = bundle_fields(cfg)
        width = max(end for _, end in fields.values())
        bundle_bytes = quant.bundle_bytes(ffn_format, width, fields, tdtype.itemsize)
        layers, files, palettes = [], {}, {}
        h = hashlib.sha256()
        with open(tmp / "ffn.bin", "wb") as f:
            for layer in tqdm(range(cfg.num_layers), desc="convert FFN", unit="layer", disable=not progress):
                bundles = build_bundles(cfg, [_checked(source, n, cfg) for n in ffn_tensor_names(cfg, layer)])
                offset = f.tell()
                if ffn_format == "float":
                    parts = _layer_bytes(cfg, bundles.to(tdtype), layout, ffn_format)
                else:
                    raw, books = quant.encode(ffn_format, bundles, fields)
                    parts = [_tensor_bytes(raw)]
                    palettes.update({f"{layer}.{k}": v for k, v in books.items()})
                for data in parts:
                    f.write(data)
                    h.update(data)
                size = f.tell() - offset
                pad = bytes(round_up(size) - size)
                f.write(pad)
                h.update(pad)
                layers.append({"offset": offset, "nbytes": cfg.intermediate_size * bundle_bytes,
                               "span": size + len(pad)})
        files["ffn.bin"] = {"bytes": (tmp / "ffn.bin").stat().st_size, "sha256": h.hexdigest()}
        if palettes:
            save_file(palettes, str(tmp / PALETTE_FILE))

        resident, embed = {}, None
        embed_name = next((n for n in names if n.endswith("embed_tokens.weight")), None)
        for n in tqdm(sorted(names - ffn_names), desc="convert resident", unit="tensor", disable=not progress):
            t = _checked(source, n, cfg)
            if n == embed_name and embeddings_on_flash and not cfg.tie_word_embeddings:
                rows = _tensor_bytes(t.to(tdtype))
                with open(tmp / EMBED_FILE, "wb") as f:  # padded: O_DIRECT reads whole aligned pages
                    f.write(rows)
                    f.write(bytes(round_up(len(rows)) - len(rows)))
                embed = {"name": n, "file": EMBED_FILE, "rows": t.shape[0], "row_bytes": t.shape[1] * tdtype.itemsize}
            elif t.dim() == 1:  # norms, biases: tiny and precision-sensitive, kept float32
                resident[n] = t.contiguous()
            elif resident_format == "int8" and is_resident_matrix(n):
                resident[n], resident[n + ".scale"] = Int8Matrix.quantize(t)
            else:
                resident[n] = t.to(tdtype).contiguous()
        save_file(resident, str(tmp / "resident.safetensors"))
        for name in ["resident.safetensors"] + ([PALETTE_FILE] if palettes else []) + ([EMBED_FILE] if embed else []):
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            for p in sorted((tmp / "tokenizer").iterdir()):
                files[f"tokenizer/{p.name}"] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "dtype": dtype,
            "source": {"kind": source.kind, "path": str(source.path)},
            "ffn": {
                "file": "ffn.bin", "layout": layout, "format": ffn_format, "alignment": ALIGN, "fields": fields,
                **({"group": quant.GROUP[ffn_format]} if ffn_format in quant.GROUP else {}),
                "bundle_width": width, "bundle_bytes": bundle_bytes, "neurons": cfg.intermediate_size,
                "layers": layers,
                **({"blocks": field_blocks(cfg, tdtype.itemsize)} if layout == "unbundled" else {}),
            },
            "resident": {"format": resident_format, "embed": embed},
            "files": files,
            "hf_config": json.loads(json.dumps(source.hf_config, default=str)),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
