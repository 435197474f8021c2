"""Code blocks taken from the docs, so the tests run exactly what a page shows."""

from __future__ import annotations

import re


def block_after(doc: str, marker: str, language: str) -> str:
    """The ```language block right after `<!-- marker -->` in `doc`."""
    m = re.search(rf"<!-- {re.escape(marker)} -->\s*```{language}\n(.*?)```", doc, flags=re.S)
    assert m, f"no ```{language} block after <!-- {marker} --> in the page"
    return m.group(1)


def swap(text: str, old: str, new: str) -> str:
    """Replace what must stand exactly once in a documented example (a hub name, a path)."""
    assert text.count(old) == 1, f"expected {old!r} exactly once in the documented example"
    return text.replace(old, new)
