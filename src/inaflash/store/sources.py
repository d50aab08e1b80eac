"""Read a source model (Hugging Face safetensors folder or GGUF file) as float32 tensors with HF names.

Only safetensors and GGUF readers are used: nothing is ever unpickled.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import InaflashError, UnsupportedModelError

# GGUF tensor names -> Hugging Face names (llama.cpp's llama / qwen2 / mistral tensor names).
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)


class ModelSource:
    """A model to convert: its config, tokenizer (or None) and weights by HF name."""

    kind: str
    path: Path
    config: ModelConfig
    hf_config: dict
    tokenizer: object | None

    def names(self) -> set[str]:
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        """The named weight as a float32 tensor in HF layout ([out, in] for linear layers)."""
        raise NotImplementedError


def open_source(path: str | Path) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise InaflashError(f"model not found: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir() and (path / "config.json").exists():
        return HFSource(path)
    if path.is_dir() and (path / "manifest.json").exists():
        raise InaflashError(f"{path} is already an inaflash store; nothing to convert")
    raise InaflashError(
        f"not a model: {path} (expected a .gguf file or a Hugging Face folder with config.json and *.safetensors)"
    )


class HFSource(ModelSource):
    kind = "hf"

    def __init__(self, path: Path):
        from safetensors import safe_open
        from transformers import AutoConfig

        self.path = path
        try:
            hf = AutoConfig.from_pretrained(path)
            self.hf_config = hf.to_dict()
            self.config = ModelConfig.from_hf(hf)
        except InaflashError:
            raise
        except Exception as e:  # transformers' and huggingface_hub's validation errors, a malformed value
            raise UnsupportedModelError(f"cannot read {path / 'config.json'}: {type(e).__name__}: {e}") from None
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
            hint = f" (found {', '.join(pickles)}: pickled checkpoints are never loaded)" if pickles else ""
            raise InaflashError(f"no *.safetensors weights in {path}{hint}")
        self._where: dict[str, tuple] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors' own error names neither the file nor the remedy
                raise InaflashError(f"not a valid safetensors file: {f} ({type(e).__name__}: {e})") from None
            for name in handle.keys():
                self._where[_canonical_hf_name(name)] = (handle, name)
        self.tokenizer = _load_tokenizer(path) if any((path / f).exists() for f in TOKENIZER_FILES[:5]) else None

    def names(self) -> set[str]:
        return set(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        handle, key = self._where[name]
        try:
            return handle.get_tensor(key).float()
        except Exception as e:
            raise InaflashError(f"cannot read tensor {key} of {self.path}: {type(e).__name__}: {e}") from None


def _canonical_hf_name(name: str) -> str:
    # OPT checkpoints come both as "model.decoder.*" and "decoder.*"
    return "model." + name if name.startswith("decoder.") else name


def _load_tokenizer(path: Path, **kw):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path), **kw)


def _open_gguf(path: Path):
    """gguf's reader, told where a file cut short ends: its tensor table says how far the data must reach, and a file
    that stops before that is named truncated (gguf alone failed with numpy's "When changing to a larger dtype, its
    size must be a divisor of ..." on a view past the end). Any other failure to read it: InaflashError naming it."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            need = 0
            for field in fields:
                dims, raw_dtype, offset = field.parts[3], field.parts[4], field.parts[5]
                try:
                    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
                except (ValueError, KeyError):
                    continue  # gguf's own error names it
                elements = int(np.prod(dims.astype(np.uint64)))
                need = max(need, int(start_offs) + int(offset[0]) + elements * size // block)
            if need > len(self.data):
                raise InaflashError(f"not a valid GGUF file: {path} is truncated at byte {len(self.data)} of {need} "
                                    "(where its tensor table says the data ends): copy or download it again")
            return super()._build_tensors(start_offs, fields)

    try:
        return Reader(str(path))
    except InaflashError:
        raise
    except Exception as e:  # the gguf package raises ValueError/struct.error/IndexError on bad files
        raise InaflashError(f"not a valid GGUF file: {path} ({type(e).__name__}: {e})") from None


class GGUFSource(ModelSource):
    kind = "gguf"

    def __init__(self, path: Path):
        import gguf
        from transformers import AutoConfig

        self.path = path
        self._reader = _open_gguf(path)
        arch = self._field("general.architecture")
        if arch not in ("llama", "qwen2", "mistral"):
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: llama, mistral, qwen2"
            )
        self._arch = arch
        try:
            hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            self.hf_config = hf.to_dict()
            self.config = ModelConfig.from_hf(hf)
        except InaflashError:
            raise
        except Exception as e:
            raise UnsupportedModelError(f"transformers cannot map the GGUF config of {path}: {type(e).__name__}: "
                                        f"{e}") from None
        self._tensors = {}
        for t in self._reader.tensors:
            hf_name = _gguf_to_hf(t.name)
            if hf_name is not None:
                self._tensors[hf_name] = t
        try:
            self.tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
        except Exception as e:  # damaged vocabulary metadata
            raise InaflashError(f"cannot read the tokenizer of {path}: {type(e).__name__}: {e}") from None

    def _field(self, key: str):
        f = self._reader.fields.get(key)
        try:
            return None if f is None else f.contents()
        except Exception as e:  # the gguf package decodes values lazily: a damaged string fails here
            raise InaflashError(f"not a valid GGUF file: {self.path} (metadata {key}: {type(e).__name__}: "
                                f"{e})") from None

    def names(self) -> set[str]:
        return set(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        import gguf

        t = self._tensors[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if self._arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            # llama.cpp's converter interleaves the two RoPE halves of each head; undo it for HF's rotate_half
            heads = self.config.num_heads if ".q_proj." in name else self.config.num_kv_heads
            rows = w.shape[0]
            w = w.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        return torch.from_numpy(np.array(w, copy=True))


# bits per weight of the store's formats with their scales (quant.FFN_FORMATS; a resident int8 row's scale is ~0)
STORE_BITS = {"int4": 5.0, "int8": 8.25, "float": 16.0}
_FFN_TENSORS = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_RESIDENT_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")


def closest_formats(path: Path) -> tuple[str, str, str]:
    """The store formats nearest a GGUF's own, (ffn_format, resident_format, why): per part (the FFN's matrices;
    attention and head, a tied embedding being the head), the bits per weight of llama.cpp's types weighted by
    elements (Q4_K 4.5, Q4_1 5.0, Q6_K 6.6, Q8_0 8.5, F16 16), and the format whose bits are nearest (int4 5.0, int8
    8.25, float). Q4_K_M (Qwen2.5-1.5B): FFN 4.8 and resident 5.8 bits -> int4 / int4; SmolLM2's Q4_1 (a Q8_0 tied
    embedding): FFN 5.0 -> int4, resident 6.8 -> int8. Reads the tensor table only."""
    import gguf

    reader = _open_gguf(path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    parts = {"FFN": [0, 0.0, set()], "resident": [0, 0.0, set()]}
    for t in reader.tensors:
        if t.name.endswith(_FFN_TENSORS):
            part = parts["FFN"]
        elif t.name.endswith(_RESIDENT_TENSORS) or t.name == "output.weight" or (tied and t.name == "token_embd.weight"):
            part = parts["resident"]
        else:
            continue
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        part[0] += int(t.n_elements)
        part[1] += int(t.n_elements) * size * 8 / block
        part[2].add(t.tensor_type.name)
    chosen, said = [], []
    for name, (n, bits, types) in parts.items():
        mean = bits / n if n else 16.0
        fmt = min(STORE_BITS, key=lambda f: (abs(STORE_BITS[f] - mean), -STORE_BITS[f]))
        chosen.append(fmt)
        said.append(f"{name} {'/'.join(sorted(types))} {mean:.1f} bits/weight -> {fmt}")
    return chosen[0], chosen[1], "; ".join(said)


def _gguf_to_hf(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in _GGUF_LAYER:
            return f"model.layers.{layer}.{_GGUF_LAYER[rest]}"
    return None  # e.g. rope_freqs: derived from the config instead
