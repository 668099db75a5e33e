"""Sizes and budgets as people write them, and bytes as people read them.

    parse_bytes("1.5 GB")              # 1500000000
    format_bytes(12_900_000)           # "12.3 MiB"
    parse_budget("60%", 10_000_000)    # 6000000: a share of the unplanned peak
"""

from __future__ import annotations

import re
from decimal import Decimal

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_FACTORS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(?P<number>[-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED = (
    'a positive number of bytes ("123456") or a number with a unit: B, KB, MB, GB, TB (powers of 1000) '
    'or KiB, MiB, GiB, TiB (powers of 1024), such as "6GiB", "6000MB" or "1.5 GB"'
)


def format_bytes(n: int) -> str:
    """`n` bytes in binary units with three significant digits: "512 B", "12.3 MiB", "1.50 GiB"."""
    sign, size = ("-" if n < 0 else ""), float(abs(n))
    unit = 0
    while round(size) >= 1024 and unit < len(_BINARY_UNITS) - 1:
        size /= 1024
        unit += 1
    if unit == 0:
        return f"{sign}{int(size)} B"
    if round(size, 1) >= 100:  # three digits already: no decimals
        return f"{sign}{size:.0f} {_BINARY_UNITS[unit]}"
    digits = 1 if round(size, 2) >= 10 else 2
    return f"{sign}{size:.{digits}f} {_BINARY_UNITS[unit]}"


def parse_bytes(text: str) -> int:
    """A size in bytes from text such as "6GiB", "6000MB", "1.5 GB" or "123456" (case-insensitive).

    KB, MB, GB and TB are powers of 1000, KiB, MiB, GiB and TiB powers of 1024, a bare number is
    bytes. Fractions are rounded to the nearest byte. ValueError, saying which forms are accepted,
    for anything else, and for sizes that are zero or negative.
    """
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None or match["unit"].lower() not in _FACTORS:
        raise ValueError(f"cannot read {text!r} as a size; expected {_ACCEPTED}")
    size = round(Decimal(match["number"]) * _FACTORS[match["unit"].lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive (at least one byte), got {text!r}; expected {_ACCEPTED}")
    return int(size)


def size_bytes(size: int | str) -> int:
    """Bytes from an int (as it is) or a size such as "64GiB" (`parse_bytes`)."""
    return size if isinstance(size, int) else parse_bytes(size)


def parse_budget(budget: int | float | str, unplanned_peak_bytes: int) -> int:
    """Bytes from a size ("6GiB", "6000MB", 123456) or a share of the unplanned peak ("60%")."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        number = budget.strip()[:-1].strip()
        if not re.fullmatch(r"\d+(\.\d*)?|\.\d+", number) or float(number) <= 0:
            raise ValueError(f"budget {budget!r}: a percentage must be a positive number followed by %, like 60%")
        return int(unplanned_peak_bytes * float(number) / 100)
    if isinstance(budget, bool):
        raise ValueError(f"budget {budget!r} is not a size; give bytes, a size like 6GiB or a percentage like 60%")
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise ValueError(f"budget {budget!r} must be positive; give bytes, a size like 6GiB or a percentage")
        return int(budget)
    return parse_bytes(budget)
