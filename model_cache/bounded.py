"""Bounded echoes of untrusted input: error messages and log lines quote at most ``LIMIT`` characters.

A route or a config file may hand us a name of a megabyte or twenty thousand unknown keys; what
we say back names the problem without repeating all of it.
"""

from __future__ import annotations

from collections.abc import Iterable

LIMIT = 200


def shown(value: object, limit: int = LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with a note of the full length when longer."""
    text = value if isinstance(value, str) else repr(value)
    quoted = repr(text[: limit + 1]) if isinstance(value, str) else text
    if len(quoted) <= limit:
        return quoted
    return f"{quoted[:limit]}… ({len(text)} characters)"


def listed(values: Iterable[object], limit: int = LIMIT, most: int = 10) -> str:
    """``a, b, c`` of the first ``most`` values (each ``shown``), then how many more; bounded."""
    items = list(values)
    text = ", ".join(shown(v, limit=60) for v in items[:most])
    if len(items) > most:
        text += f" and {len(items) - most} more"
    return text if len(text) <= limit else text[:limit] + "…"


def cut(message: str, limit: int = 1000) -> str:
    """A whole message (several echoes) cut to ``limit`` characters."""
    return message if len(message) <= limit else message[:limit] + f"… ({len(message)} characters)"
