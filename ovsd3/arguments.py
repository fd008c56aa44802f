"""Bounds of command-line values, checked by each command before it opens a folder or loads a model.

argparse converts (``type=int``, ``type=float``); a command then checks its options against a table of rules
(:func:`check_options`), so a value out of bounds, NaN, inf or a path no filesystem can hold is one line naming the
option ("--workers must be between 1 and 64 (got 1000000)"), exit 2, before any work. Bounds that need the
folder (the model's blocks, its largest size, its CLIP depth) are checked by the command itself, later but still
before its slow work.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from ovsd3.errors import OvsdError
from ovsd3.layout import MAX_BLOCKS  # far above any SD3 transformer's; the folder's own count is checked later

NAME_MAX = 255  # bytes in one path component, on every Linux filesystem ovsd3 writes to
PATH_MAX = 4096  # bytes in a whole path (Linux)

Rule = Callable[[str, object], None]  # (option as typed, its value) -> None, or OvsdError


def check_options(args: argparse.Namespace, rules: dict[str, Rule], positionals: dict[str, str] | None = None) -> None:
    """Each rule against its option's value (options left at None are not given and not checked);
    ``rules`` maps argparse's dest ("max_queue") to a rule, ``positionals`` a positional's dest to its name in
    the usage ("source": "IN"); other dests are named as their option ("--max-queue")."""
    names = {**POSITIONALS, **(positionals or {})}
    for dest, rule in rules.items():
        value = getattr(args, dest)
        if value is None:
            continue
        for one in value if isinstance(value, list) else [value]:  # repeatable options: each value
            rule(names.get(dest, "--" + dest.replace("_", "-")), one)


POSITIONALS = {"model_dir": "MODEL_DIR", "folders": "FOLDER", "folder": "MODEL_DIR"}


def integer(low: int, high: int | None = None) -> Rule:
    """A whole number from ``low`` to ``high`` (inclusive; None: no upper bound)."""
    def rule(option: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or \
                (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise OvsdError(f"{option} must be {bound} (got {_shown(value)})")

    return rule


def number(low: float, high: float, *, low_open: bool = False, also: tuple[float, ...] = ()) -> Rule:
    """A finite number from ``low`` to ``high`` (``low_open``: ``low`` itself excluded); ``also``: single values
    allowed besides (NNCF's -1, "off"). NaN fails every comparison, so it is refused with the rest."""
    def rule(option: str, value) -> None:
        inside = isinstance(value, (int, float)) and math.isfinite(value) and \
            (low < value if low_open else low <= value) and value <= high
        if not inside and value not in also:
            extra = "".join(f" or {other:g}" for other in also)
            span = f"above {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
            raise OvsdError(f"{option} must be {span}{extra} (got {_shown(value)})")

    return rule


def path_fits(option: str, value) -> None:
    """A path whose every component fits the filesystem's name limit (NAME_MAX bytes) and whose whole fits
    PATH_MAX: past them every operation on it fails with ENAMETOOLONG, which is the user's to fix."""
    text = os.fspath(value)
    if "\0" in text:
        raise OvsdError(f"{option}: a path cannot hold a NUL character")
    encoded = os.fsencode(text)
    if len(encoded) > PATH_MAX:
        raise OvsdError(f"{option}: the path is {len(encoded)} bytes long; the limit is {PATH_MAX}")
    for part in Path(text).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OvsdError(f"{option}: the name {_shown(part)} is {size} bytes long; a file or folder name holds "
                            f"at most {NAME_MAX}")


def block_list(text: str) -> list[int]:
    """argparse type: block indices separated by commas ("7,8,9"); "none", "off" or "" for none. An empty item
    ("1,,2"), a sign or a repeated index is a typo worth hearing about, not something to skip."""
    if text.strip().lower() in ("", "none", "off"):
        return []
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"block indices (0, 1, 2, ...) separated by commas, such as 7,8,9 "
                                         f"(got {_shown(text)})")
    blocks = [int(part) for part in parts]
    if len(set(blocks)) != len(blocks):
        raise argparse.ArgumentTypeError(f"a block is named twice (got {_shown(text)})")
    if max(blocks) >= MAX_BLOCKS:
        raise argparse.ArgumentTypeError(f"block indices must be below {MAX_BLOCKS} (got {_shown(text)})")
    return blocks


def _shown(value, limit: int = 40) -> str:
    """The value as given, shortened: a 10,000-character name must not become a 10,000-character error line."""
    shown = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
    if isinstance(value, int) and len(shown) > limit:
        return f"a number of {len(shown)} digits"
    return shown if len(shown) <= limit else f"{shown[:limit - 8]}...{shown[-4:]}"
