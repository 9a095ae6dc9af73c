"""Keyset pagination, the same way for every list: validate the size, fetch one extra, slice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from server.domain.errors import InvalidArgument

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50

T = TypeVar("T")


def page_size(requested: int) -> int:
    """The page size to use for a request's `page_size` (0 means the default).

    Raises:
        InvalidArgument: Negative or above the maximum.
    """
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise InvalidArgument(
            "page_size", f"page_size must be between 0 and {MAX_PAGE_SIZE}, got {requested}"
        )
    return requested or DEFAULT_PAGE_SIZE


def split_page(rows: Sequence[T], size: int) -> tuple[list[T], T | None]:
    """The page (the first `size` of `size + 1` fetched rows) and its last row when
    there are more after it (the cursor to continue from), else None."""
    page = list(rows[:size])
    return page, (page[-1] if len(rows) > size else None)
