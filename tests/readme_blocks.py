"""Blocks of the README that tests run or check: examples follow ``<!-- example: NAME -->``, tables ``<!-- table: NAME -->``."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str, kind: str) -> str:
    """The block (``python`` code or a markdown table) that follows ``<!-- {kind}: {marker} -->`` in the README."""
    text = README.read_text()
    start = text.index(f"<!-- {kind}: {marker} -->")
    if kind == "example":
        return re.search(r"```python\n(.*?)```", text[start:], re.DOTALL).group(1)
    lines = text[start:].splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if not line.startswith("|"))
    return "\n".join(lines[:end])
