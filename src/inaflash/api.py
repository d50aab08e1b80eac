"""The Python API, mirroring the CLI:

    model = inaflash.load()                                   # or load("store|model.gguf|hf-folder", mode="sparse",
    print(model.generate("Name three rivers.").text)          #         memory="50%")
    for piece in model.stream("Tell me a story.", max_tokens=64):
        print(piece, end="", flush=True)
    reply = model.chat([{"role": "user", "content": "Hi!"}])

One model runs one generation at a time (callers that share it across threads serialise; the server queues).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .engine import Engine
from .generate import (BatchStats, Generation, GenerationResult, GenerationStats, encode_chat, encode_prompt,
                       generate_batch)


class Model:
    def __init__(self, engine: Engine, name: str):
        self.engine, self.name = engine, name
        self.last_stats: GenerationStats | None = None
        self.last_batch_stats: BatchStats | None = None

    @property
    def context(self) -> int:
        """Most tokens (prompt + generated) one generation may use."""
        return self.engine.context if self.engine.bounded else self.engine.config.max_position_embeddings

    def start(self, prompt_ids: list[int], max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = None, stop: list[str] | None = None, batcher=None) -> Generation:
        """A generation from token ids: iterate it for text pieces (see generate.Generation); with a
        generate.Batcher, as one sequence of its running batch (the server's --parallel)."""
        return Generation(self.engine, prompt_ids, max_tokens, temperature, top_p, seed, stop, batcher)

    def start_prompt(self, prompt: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, stop: list[str] | None = None, raw: bool = False) -> Generation:
        """`prompt` as one user turn through the chat template (raw=True: as is)."""
        return self.start(encode_prompt(self.engine, prompt, raw), max_tokens, temperature, top_p, seed, stop)

    def start_chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, stop: list[str] | None = None) -> Generation:
        return self.start(encode_chat(self.engine, messages), max_tokens, temperature, top_p, seed, stop)

    def generate(self, prompt: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, raw: bool = False) -> GenerationResult:
        """`prompt` as one user turn through the chat template (raw=True: as is). Greedy by default."""
        return self._finish(self.start_prompt(prompt, max_tokens, temperature, top_p, seed, stop, raw))

    def generate_batch(self, prompts: list[str], max_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, raw: bool = False) -> list[str]:
        """Several prompts decoded together, one pass over the weights per step for all of them (generate.
        generate_batch); the texts, in order. `last_batch_stats` has the batch's passes and tokens per pass."""
        ids = [encode_prompt(self.engine, p, raw) for p in prompts]
        out, self.last_batch_stats = generate_batch(self.engine, ids, max_tokens, temperature, top_p, seed)
        return [self.engine.tokenizer.decode(o, skip_special_tokens=True) for o in out]

    def stream(self, prompt: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, raw: bool = False) -> Iterator[str]:
        gen = self.start_prompt(prompt, max_tokens, temperature, top_p, seed, stop, raw)
        yield from gen
        self.last_stats = gen.stats

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None) -> GenerationResult:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        return self._finish(self.start_chat(messages, max_tokens, temperature, top_p, seed, stop))

    def chat_stream(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, stop: list[str] | None = None) -> Iterator[str]:
        gen = self.start_chat(messages, max_tokens, temperature, top_p, seed, stop)
        yield from gen
        self.last_stats = gen.stats

    def _finish(self, gen: Generation) -> GenerationResult:
        result = gen.result()
        self.last_stats = result.stats
        return result

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def model_name(path: str | Path | None, engine: Engine) -> str:
    source = engine.store.manifest.get("source", {}).get("path")
    return Path(source or path or engine.store.path).stem
