"""What a user gives the HunyuanImage-3 road, and the error that refuses a bad one with a one-line message
saying what to do. Torch-free and import-light."""

from __future__ import annotations

from typing import Any


class LoaderError(ValueError):
    """A load that cannot work as asked; the message says what to change."""


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile value cannot flood or break a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of an exception, for a one-line error that quotes it."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:limit]}"
