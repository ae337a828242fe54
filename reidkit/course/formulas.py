"""The formulas and the code of a notebook's markdown cells: one reading of them, shared by the
lesson rules (formulas counted, left out of the prose) and the web copy (formulas typeset)."""

from __future__ import annotations

import re
from typing import Callable, Iterator

#: code, whose dollars are no formula: fenced blocks (``` or ~~~ at a line's start) and inline spans
#: (a run of backticks up to the same run)
CODE = re.compile(r"^(```|~~~).*?^\1|(`+).+?\2", re.S | re.M)

#: ``$$display$$`` (it may span lines), neither opened nor closed by an escaped ``\$``
DISPLAY = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$", re.S)

#: ``$inline$`` (one line), not opened by ``\$`` or by a ``$$``, not closed by ``\$``
INLINE = re.compile(r"(?<![\\$])\$(?!\$)([^$\n]+?)(?<!\\)\$")

#: either: group 1 a display formula's source, group 2 an inline one's
MATH = re.compile(f"{DISPLAY.pattern}|{INLINE.pattern}", re.S)


def stretches(markdown: str) -> Iterator[tuple[str, bool]]:
    """``markdown`` cut into its stretches in order: ``(text, is_code)``."""
    last = 0
    for code in CODE.finditer(markdown):
        yield markdown[last:code.start()], False
        yield code.group(0), True
        last = code.end()
    yield markdown[last:], False


def outside_code(markdown: str, fn: Callable[[str], str]) -> str:
    """``markdown`` with ``fn`` applied to every stretch outside code; the code kept as it is."""
    return "".join(text if is_code else fn(text) for text, is_code in stretches(markdown))


def formulas(markdown: str) -> list[re.Match]:
    """Every formula outside code, in order (:data:`MATH`'s matches: group 1 set for a display)."""
    return [m for text, is_code in stretches(markdown) if not is_code for m in MATH.finditer(text)]
