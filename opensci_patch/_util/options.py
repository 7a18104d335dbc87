"""Parsed command-line options handed on, by name, to the function that does the work.

A subcommand's options are mostly the keyword arguments of one function under the same names; naming
them once here spares each entry point a block of `name=args.name` lines. Standard library only.
"""

from __future__ import annotations

import argparse
from typing import Any


def kwargs_from(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """`{name: args.name}` for each of `names` (an option missing from `args` is an AttributeError, as a typo is)."""
    return {name: getattr(args, name) for name in names}
