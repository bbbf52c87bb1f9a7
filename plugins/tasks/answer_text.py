"""Text helpers shared by the tasks' answer extraction (thinking traces, \\boxed{})."""

from __future__ import annotations

import re


def after_think(text: str) -> str:
    """The text after the last ``</think>`` (the whole text when there is none)."""
    i = text.rfind("</think>")
    return text if i < 0 else text[i + len("</think>"):]


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (and ``\\fbox{...}``) in ``text``, braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1])
    return out
