"""One module per architecture family; each takes resident weights and an FFN provider, and gets its KV cache from
setup_caches(max_seq)."""

from .llama import Llama
from .opt import OPT

FORWARDS = {"llama": Llama, "opt": OPT}


def build_model(cfg, weights, ffn):
    return FORWARDS[cfg.family](cfg, weights, ffn)
