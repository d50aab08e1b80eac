"""The `inaflash` command line; each command mirrors a Python function of the package. app.py: the app, the shared
run options, the entry point; model.py: the commands that use or make a model (run, serve, chat, convert, info);
tools.py: the measuring tools' commands."""

from . import model, tools  # noqa: F401 (their commands register on the app)
from .app import app, main

__all__ = ["app", "main"]
