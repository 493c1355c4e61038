"""Plain-text facts about Lean 4 source that several reward parts need: comments and the server's header split."""
from __future__ import annotations

import re

# Leftmost-first alternation, so `--` inside a block comment and `/-` inside a line comment are handled.
# Block comments are not nested here (Lean nests them); model outputs almost never rely on nesting.
COMMENT_RE = re.compile(r"/-.*?-/|--[^\n]*", re.DOTALL)


def comment_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of the comments in `text`."""
    return [m.span() for m in COMMENT_RE.finditer(text)]


def remove_comments(text: str) -> str:
    """`text` with every comment deleted (line breaks outside comments kept)."""
    return COMMENT_RE.sub("", text)


def split_header(code: str) -> tuple[str, str, int]:
    """Split `code` the way the Kimina Lean Server does before it talks to the REPL (SPEC 11).

    Returns (header, body, header_line_count). The header is the leading run of `import` and blank lines,
    rewritten to one `import Mathlib` (if any Mathlib import) plus the other imports, deduplicated. The body is
    `code.splitlines()[header_line_count:]` joined by newlines: the exact text Lean checks, so the line numbers in
    the server's messages count from line `header_line_count + 1` of `code.splitlines()`.
    """
    lines = code.splitlines()
    count = 0
    while count < len(lines) and (not lines[count].strip() or lines[count].strip().startswith("import ")):
        count += 1
    imports = [line.strip() for line in lines[:count] if line.strip()]
    header_lines = ["import Mathlib"] if any(i.startswith("import Mathlib") for i in imports) else []
    for imp in imports:
        if not imp.startswith("import Mathlib") and imp not in header_lines:
            header_lines.append(imp)
    return "\n".join(header_lines), "\n".join(lines[count:]), count
