"""Markdown tables and number formats shared by the probe and contamination reports."""

from __future__ import annotations

import math


def fmt(x: float, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals; "n/a" for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def fmt_p(x: float) -> str:
    """A p-value to 3 significant digits; "n/a" for None or NaN."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
