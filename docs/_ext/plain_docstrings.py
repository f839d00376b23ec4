"""jsm's docstrings are plain text, as `help()` shows them; this makes them reStructuredText for autodoc.

The conventions they follow, and what each becomes:

- a block indented under a paragraph (an equation, a code sketch, a table) is shown as written:
  a literal block, with no `::` needed in the source;
- Google sections (Args:, Returns:, Raises:, ...) are left to napoleon;
- `*`, `|` and a name's trailing `_` are plain characters, not emphasis, substitutions or links;
- `name` in backquotes is code (a link to its entry where there is one: `default_role` in conf.py).
"""

from __future__ import annotations

import re

SECTION = re.compile(r"^\s*(Args|Arguments|Attributes|Example|Examples|Keyword Args|Note|Notes|Parameters|Raises|"
                     r"Returns|Return|Warning|Warns|Yields|Yield|See Also|References):\s*$")
BULLET = re.compile(r"^(\s*)([-*+]|\d+[.)])\s+")
CODE = re.compile(r"(``.+?``|`[^`]+`)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape(text: str) -> str:
    """Markup characters outside backquoted spans made literal."""
    parts = CODE.split(text)
    for i in range(0, len(parts), 2):
        p = parts[i].replace("\\", "\\\\").replace("*", r"\*").replace("|", r"\|")
        parts[i] = re.sub(r"(\w)_(?=\W|$)", r"\1\\_", p)
    return "".join(parts)


def _escape_line(line: str) -> str:
    bullet = BULLET.match(line)
    head = bullet.group(0) if bullet else line[: _indent(line)]
    return head + _escape(line[len(head):])


def to_rst(lines: list[str]) -> list[str]:
    out: list[str] = []
    i, n = 0, len(lines)
    para_indent = None  # indent of the paragraph (or list item text) the next lines belong to
    section_indent = None
    while i < n:
        line = lines[i]
        if not line.strip():
            out.append(line)
            i += 1
            continue
        ind = _indent(line)
        if section_indent is not None and ind <= section_indent:
            section_indent = None
        if section_indent is not None:  # napoleon's: escaped, never turned into a literal block
            out.append(_escape_line(line))
            i += 1
            continue
        if SECTION.match(line):
            section_indent, para_indent = ind, None
            out.append(line)
            i += 1
            continue
        if para_indent is not None and ind > para_indent:  # an indented block: shown as written
            last = next((l for l in reversed(out) if l.strip()), "")
            if out and out[-1].strip():
                out.append("")
            if not last.rstrip().endswith("::"):
                out += [" " * para_indent + "::", ""]
            while i < n and (not lines[i].strip() or _indent(lines[i]) > para_indent):
                out.append(lines[i])
                i += 1
            out.append("")
            continue
        bullet = BULLET.match(line)
        para_indent = len(bullet.group(0)) - 1 if bullet else ind
        out.append(_escape_line(line))
        i += 1
    return out


def _process(app, what, name, obj, options, lines):
    lines[:] = to_rst(lines)


def _skip_tuple_fields(app, what, name, obj, skip, options):
    """A NamedTuple's fields are listed with the class (napoleon's Parameters); their own entries only say
    "Alias for field number k"."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _process, priority=400)  # before napoleon (500)
    app.connect("autodoc-skip-member", _skip_tuple_fields)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
