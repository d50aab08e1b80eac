"""The model's shape, in one dataclass, normalised from a Hugging Face config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import UnsupportedModelError

# model_type -> the forward that implements it (inaflash/models/<family>.py)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM (SmolLM2, Llama 2), MistralForCausalLM, Qwen2ForCausalLM, OPTForCausalLM"
)
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass
class ModelConfig:
    family: str  # "llama" (SwiGLU, RMSNorm, RoPE) or "opt" (ReLU, LayerNorm, learned positions)
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    pre_norm: bool = True  # OPT-350m is post-norm; everything else here is pre-norm
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d).validated()

    def validated(self) -> "ModelConfig":
        """Refuse shapes no model has (a hand-edited or forged config): zero or negative sizes, heads that do not
        divide, an unknown family or activation. Returns self."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31:
                raise UnsupportedModelError(f"config {name} = {value!r} is not a positive size")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"config num_heads {self.num_heads} is not a multiple of num_kv_heads "
                                        f"{self.num_kv_heads}")
        if self.family not in set(FAMILIES.values()) or self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"config family {self.family!r} / activation {self.hidden_act!r} unknown")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value < float("inf"):
                raise UnsupportedModelError(f"config {name} = {value!r} is not a positive number")
        for name in ("tie_word_embeddings", "pre_norm"):
            if not isinstance(getattr(self, name), bool):
                raise UnsupportedModelError(f"config {name} = {getattr(self, name)!r} is not true or false")
        ids = [self.bos_token_id] if self.bos_token_id is not None else []
        if not isinstance(self.eos_token_ids, list) or any(
                type(i) is not int or not 0 <= i < self.vocab_size for i in ids + self.eos_token_ids):
            raise UnsupportedModelError(f"config token ids bos {self.bos_token_id!r} / eos {self.eos_token_ids!r} "
                                        f"are not ids of a {self.vocab_size}-token vocabulary")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Build from a transformers PretrainedConfig; refuse what our forward does not implement."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in FAMILIES:
            archs = ", ".join(getattr(hf, "architectures", None) or [str(model_type)])
            raise UnsupportedModelError(
                f"unsupported architecture {archs} (model_type {model_type!r}); "
                f"supported: {SUPPORTED_ARCHITECTURES}"
            )
        family = FAMILIES[model_type]
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if family == "opt":
            if hf.word_embed_proj_dim != hf.hidden_size:
                raise UnsupportedModelError(
                    "OPT with word_embed_proj_dim != hidden_size (project_in/out, e.g. OPT-350m) is not supported"
                )
            act = hf.activation_function
            return cls(
                family=family, model_type=model_type, vocab_size=hf.vocab_size,
                hidden_size=hf.hidden_size, intermediate_size=hf.ffn_dim, num_layers=hf.num_hidden_layers,
                num_heads=hf.num_attention_heads, num_kv_heads=hf.num_attention_heads,
                head_dim=hf.hidden_size // hf.num_attention_heads,
                max_position_embeddings=hf.max_position_embeddings, norm_eps=1e-5, hidden_act=_act(act),
                tie_word_embeddings=True, pre_norm=bool(hf.do_layer_norm_before),
                bos_token_id=hf.bos_token_id, eos_token_ids=eos_ids,
            ).validated()
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedModelError(f"RoPE scaling {rope_type!r} is not supported (only the default RoPE)")
        theta = rope.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedModelError("sliding-window attention is not supported")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if getattr(hf, "partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        max_pos = hf.max_position_embeddings
        if model_type == "mistral" and getattr(hf, "sliding_window", None):
            max_pos = min(max_pos, hf.sliding_window)  # within the window, sliding attention is full attention
        return cls(
            family=family, model_type=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim, max_position_embeddings=max_pos, norm_eps=hf.rms_norm_eps,
            hidden_act=_act(hf.hidden_act), tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            rope_theta=float(theta), bos_token_id=hf.bos_token_id, eos_token_ids=eos_ids,
        ).validated()


def _act(name: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return name
