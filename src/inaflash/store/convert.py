"""Convert a model source (GGUF, Hugging Face folder) into a flash store: shapes checked against the config,
written into a partial directory and renamed into place only when complete (format.py owns the format itself: its
layout, manifest and checksums)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from . import quant
from ..config import ModelConfig
from ..errors import InaflashError, UnsupportedModelError
from .quant import FFN_FORMATS, PALETTE_FILE, Int4Matrix, Int8Matrix
from .format import (ALIGN, DTYPES, EMBED_FILE, LAYOUTS, RESIDENT_FORMATS, bundle_fields, build_bundles,
                     field_blocks, ffn_tensor_names, is_resident_matrix, round_up)
from .manifest import new_manifest, peek_manifest, seal


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
    if peek_manifest(out) is None:
        raise InaflashError(f"refusing to overwrite {out}: it is not an inaflash store (no inaflash manifest.json); "
                            "remove it yourself or choose another output")


def _remove_dead_partials(out: Path) -> None:
    """Leftovers of conversions into `out` that were killed (SIGKILL, power loss)."""
    remove_dead_partials(out.parent, out.name)


def remove_dead_partials(folder: Path, name: str = "*") -> None:
    """`.NAME.partial-PID` directories in `folder` whose process is gone: what a killed conversion left (a SIGKILLed
    convert of the default model left 152 MB until the same name was converted again; the loader sweeps its home
    with name "*" on start). Those of a live process (a conversion running beside this one) are left alone; only
    real directories of that pattern in `folder` itself are removed, never what a link points to."""
    for leftover in folder.glob(f".{name}.partial-*"):
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
                resident_format: str = "float", embeddings_on_flash: bool = True, encoder=None) -> Path:
    """Convert `source` (a sources.ModelSource) into a store at `out`, atomically.

    `embeddings_on_flash`: an untied input embedding goes to embed.bin (one row read per token) instead of DRAM;
    a tied one is the output head, which every token needs whole, so it stays resident either way.
    `encoder(layer, bundles, fields) -> (raw, codebooks)`: fits the compressed FFN format in place of quant.encode
    (store/dkm.py's DKMEncoder); its `reports` go into the manifest and its `work` folder is removed at the end."""
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
        layers, palettes = [], {}
        with open(tmp / "ffn.bin", "wb") as f:
            for layer in tqdm(range(cfg.num_layers), desc="convert FFN", unit="layer", disable=not progress):
                bundles = build_bundles(cfg, [_checked(source, n, cfg) for n in ffn_tensor_names(cfg, layer)])
                offset = f.tell()
                if ffn_format == "float":
                    parts = _layer_bytes(cfg, bundles.to(tdtype), layout, ffn_format)
                else:
                    raw, books = (encoder(layer, bundles, fields) if encoder is not None
                                  else quant.encode(ffn_format, bundles, fields))
                    parts = [_tensor_bytes(raw)]
                    palettes.update({f"{layer}.{k}": v for k, v in books.items()})
                for data in parts:
                    f.write(data)
                size = f.tell() - offset
                pad = bytes(round_up(size) - size)
                f.write(pad)
                layers.append({"offset": offset, "nbytes": cfg.intermediate_size * bundle_bytes,
                               "span": size + len(pad)})
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
            elif resident_format == "int4" and is_resident_matrix(n) and t.shape[1] % 64 == 0:
                resident[n] = Int4Matrix.quantize(t)
            elif resident_format in ("int8", "int4") and is_resident_matrix(n):
                resident[n], resident[n + ".scale"] = Int8Matrix.quantize(t)
            else:
                resident[n] = t.to(tdtype).contiguous()
        save_file(resident, str(tmp / "resident.safetensors"))
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp / "tokenizer"))

        manifest = new_manifest(
            config=cfg.to_dict(),
            dtype=dtype,
            source={"kind": source.kind, "path": str(source.path)},
            ffn={
                "file": "ffn.bin", "layout": layout, "format": ffn_format, "alignment": ALIGN, "fields": fields,
                **({"group": quant.GROUP[ffn_format]} if ffn_format in quant.GROUP else {}),
                "bundle_width": width, "bundle_bytes": bundle_bytes, "neurons": cfg.intermediate_size,
                "layers": layers,
                **({"blocks": field_blocks(cfg, tdtype.itemsize)} if layout == "unbundled" else {}),
                **({"fit": {**encoder.settings, "layers": encoder.reports}} if encoder is not None else {}),
            },
            resident={"format": resident_format, "embed": embed},
            hf_config=json.loads(json.dumps(source.hf_config, default=str)),
        )
        seal(tmp, manifest, resident)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        if encoder is not None:
            shutil.rmtree(encoder.work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
