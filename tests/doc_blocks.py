"""Code blocks and tables of the README and the documentation pages (docs/**/*.md) that the tests run or check.

Code blocks are extracted by mktestdocs (`grab_code_blocks`). mktestdocs executes a block as written, in an empty
namespace; the docs' examples need a quick variant (a tiny local model in place of a Hub id, CPU settings, one step),
and some tests need one block or one table by name, so the lookup by marker (``<!-- example: NAME -->`` before a
python block, ``<!-- table: NAME -->`` before a markdown table) and the table reader are here.
"""

from __future__ import annotations

from pathlib import Path

from mktestdocs import grab_code_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def doc_files() -> list[Path]:
    """The README and every documentation page."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def code_blocks(path: Path, lang: str) -> list[str]:
    """The ``lang`` code blocks of one markdown file, in order."""
    return grab_code_blocks(path.read_text(), lang=lang)


def _marked(marker: str, kind: str) -> tuple[Path, str]:
    """The file that holds ``<!-- {kind}: {marker} -->`` (exactly one must) and its text from the marker on."""
    tag = f"<!-- {kind}: {marker} -->"
    found = [(path, path.read_text()) for path in doc_files() if tag in path.read_text()]
    assert len(found) == 1, f"{tag} must appear in exactly one doc file, found {[str(p) for p, _ in found]}"
    path, text = found[0]
    return path, text[text.index(tag) :]


def doc_block(marker: str, kind: str = "example") -> str:
    """The python block (``kind="example"``) or markdown table (``kind="table"``) that follows the marker."""
    _, text = _marked(marker, kind)
    if kind == "example":
        return grab_code_blocks(text, lang="python")[0]
    lines = text.splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if not line.startswith("|"))
    return "\n".join(lines[:end])


def marked_blocks() -> set[str]:
    """Every python block that follows an ``example`` marker (the tests that name them run them)."""
    blocks = set()
    for path in doc_files():
        for part in path.read_text().split("<!-- example: ")[1:]:
            blocks.add(grab_code_blocks(part, lang="python")[0])
    return blocks
