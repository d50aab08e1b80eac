"""What the decoding benches (speculation, batching, serve_batching) share: their model options and how a run's
command is written back into its results."""

from __future__ import annotations

import argparse


def model_args(doc: str, context: int, tokens: int) -> argparse.ArgumentParser:
    """STORE (default: the embedded model), --mode, --memory, --context, --tokens."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?", help="a store, .gguf or HF folder (default: the embedded SmolLM2)")
    ap.add_argument("--mode", default="naive")
    ap.add_argument("--memory", default=None)
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--tokens", type=int, default=tokens)
    return ap


def command(script: str, a: argparse.Namespace, *extra: str) -> str:
    """The command line that reproduces a run (for the markdown)."""
    parts = [f"python bench/{script}"] + ([a.store] if a.store else []) + [f"--mode {a.mode}"] + \
        ([f"--memory {a.memory}"] if a.memory else []) + [f"--context {a.context}", f"--tokens {a.tokens}", *extra]
    return " ".join(parts)
