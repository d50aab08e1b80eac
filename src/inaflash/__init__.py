"""inaflash: run LLMs larger than DRAM by streaming the FFN from flash (LLM in a flash, arXiv 2312.11514)."""

from .api import Model
from .engine import Engine
from .errors import InaflashError
from .generate import GenerationResult, generate
from .loader import load
from .options import Options
from .store.format import FlashStore

__all__ = ["Engine", "FlashStore", "GenerationResult", "InaflashError", "Model", "Options", "generate", "load"]
__version__ = "0.1.0"
