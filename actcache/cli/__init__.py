"""The ``actcache`` command line: each command wires one library call to flags and prints its result."""

from actcache.cli.app import main

__all__ = ["main"]
