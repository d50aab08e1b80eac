"""`inaflash chat`: a multi-turn REPL over Model.chat_stream."""

from __future__ import annotations

import sys

from .api import Model
from .errors import InaflashError

HELP = "commands: /reset (forget the conversation), /stats (last answer), /exit; Ctrl-C stops an answer"


def repl(model: Model, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7,
         top_p: float = 0.95, seed: int | None = None, input_fn=input, out=sys.stdout) -> list[dict]:
    """Read lines until EOF or /exit; returns the conversation (for tests)."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"inaflash chat with {model.name} ({model.engine.mode}); {HELP}", file=out)
    while True:
        try:
            line = input_fn("> ").strip()
        except EOFError:
            print(file=out)
            return messages
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit to leave)", file=out)
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return messages
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=out)
            continue
        if line == "/stats":
            s = model.last_stats
            print("(no answer yet)" if s is None else
                  f"{s.generated_tokens} tokens, {s.ms_per_token:.1f} ms/token (I/O {s.io_ms_per_token:.1f}), "
                  f"{s.bytes_read_per_token / 1e6:.1f} MB read/token, prefill {s.prefill_ms:.0f} ms, "
                  f"{s.tokens_per_pass:.2f} tokens/pass", file=out)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=out)
            continue
        messages.append({"role": "user", "content": line})
        gen = None
        try:
            gen = model.start_chat(messages, max_tokens, temperature, top_p, seed)
            for piece in gen:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except InaflashError as e:  # e.g. the conversation outgrew the context
            messages.pop()
            print(f"inaflash: error: {e} (/reset starts over)", file=out)
            continue
        finally:
            if gen is not None:
                gen.close()
                model.last_stats = gen.stats
        print(file=out)
        messages.append({"role": "assistant", "content": gen.text})
