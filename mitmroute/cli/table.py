"""Plain-text tables: a header, a rule, rows; the first `left` columns left-aligned, the rest
right-aligned (numbers)."""

from __future__ import annotations

from collections.abc import Sequence


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    left: int | None = None,
    footer: Sequence[str] | None = None,
) -> str:
    """The table as text; `footer` is a last row set off by a rule (a TOTAL line)."""
    left = len(headers) if left is None else left
    table = [list(headers), *map(list, rows)] + ([list(footer)] if footer else [])
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    text = [line(headers), rule, *(line(r) for r in rows)]
    if footer:
        text += [rule, line(footer)]
    return "\n".join(text)
