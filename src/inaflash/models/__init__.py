"""One module per architecture family; each takes resident weights and an FFN provider."""

from .llama import Llama
from .opt import OPT

FORWARDS = {"llama": Llama, "opt": OPT}


def build_model(cfg, weights, ffn, max_seq: int):
    return FORWARDS[cfg.family](cfg, weights, ffn, max_seq)
