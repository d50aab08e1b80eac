"""The store's tokenizer without transformers: `tokenizers` for the ids, jinja2 for the chat template, from the files
the store carries (tokenizer.json, tokenizer_config.json, chat_template.jinja). transformers' tokenizer objects cost
the runtime ~16 MB for the import and a second copy of the vocabulary besides; they stay for conversion only.
The same ids and text as transformers' PreTrainedTokenizerFast on the same files (tests/test_tokenizer.py)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict with its content."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Backend

        self.path = Path(path)
        self._tok = Backend.from_file(str(self.path / "tokenizer.json"))
        config_file = self.path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template_file = self.path / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.special = {k: _token_text(config.get(k)) for k in SPECIAL}
        eos = self.special["eos_token"]
        self.eos_token_id = self._tok.token_to_id(eos) if eos else None
        self._compiled = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True):
        """The chat template rendered as transformers renders it (a sandboxed jinja2 environment with trim_blocks and
        lstrip_blocks, loop controls, raise_exception and strftime_now; the special tokens as variables)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
                x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
            env.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._compiled = env.from_string(self.chat_template)
        text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, **{k: v for k, v in self.special.items() if v is not None})
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text

    def __deepcopy__(self, memo) -> Tokenizer:
        """An independent copy (the server tokenizes on another thread than the one that decodes)."""
        return Tokenizer(self.path)
