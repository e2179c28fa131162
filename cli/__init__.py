"""The ``reflowpairs`` command line (Typer + rich): thin commands over the library."""

from reflowpairs.cli.app import app, main

__all__ = ["app", "main"]
