"""The documentation site's own tools: plain-text docstrings made reStructuredText, the page checker,
and an API reference that covers every public module."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


plain = _load("plain_docstrings", DOCS / "_ext" / "plain_docstrings.py")
check = _load("docs_check", DOCS / "check.py")


def test_an_indented_block_is_shown_as_written_and_markup_characters_are_plain():
    doc = ["The step, everywhere in jsm:", "    x' = x + a s(x) + sqrt(2a) u,  |u| ~ 1", "",
           "with *args passed on; `f(x, *args)` is code; a name_ is no link."]
    rst = plain.to_rst(doc)
    assert rst[:4] == ["The step, everywhere in jsm:", "", "::", ""]
    assert rst[4] == "    x' = x + a s(x) + sqrt(2a) u,  |u| ~ 1"  # verbatim inside the literal block
    assert rst[-1] == r"with \*args passed on; `f(x, *args)` is code; a name\_ is no link."


def test_sections_lists_and_explicit_literal_blocks_keep_their_structure():
    doc = ["Summary::", "", "    code", "", "- a bullet", "  that continues", "", "Args:",
           "  x: one example, shape (d,)", "    continued under the argument"]
    rst = plain.to_rst(doc)
    assert rst[:4] == ["Summary::", "", "    code", ""]  # no second `::`
    assert "  that continues" in rst and rst.count("::") == 0
    assert rst[-3:] == ["Args:", "  x: one example, shape (d,)", "    continued under the argument"]


PAGE = '<html><head></head><body><main>{body}</main></body></html>'
TEXT = "A paragraph long enough to count as the content of a page, with words. " * 2


def test_the_checker_passes_a_good_page_and_names_each_problem_of_a_bad_one():
    source = PAGE.format(body=TEXT + '<span class="math notranslate nohighlight">x</span>' * 2 + "<img src='a.png'>")
    good = PAGE.format(body=TEXT + "<mjx-container></mjx-container>" * 2 + "<img src='a.png'>")
    assert check.problems("tutorials/01_energies.html", source, good, "") == []
    bad = PAGE.format(body=TEXT + "<mjx-container><mjx-merror></mjx-merror></mjx-container>").replace(
        "<html>", '<html data-check-errors="[&quot;failed to load http://x/a.png&quot;]">')
    log = '[1:1:INFO:CONSOLE:3] "Uncaught TypeError: boom", source: x (3)'
    found = check.problems("tutorials/01_energies.html", source, bad, log)
    assert found == ["console: failed to load http://x/a.png", "console: Uncaught TypeError: boom",
                     "formulas: 1 of 2 typeset by MathJax", "formulas: MathJax reported 1 TeX error(s)",
                     "figures: an executed tutorial with no figure"]
    assert check.problems("index.html", source, "<html></html>", "") == ["did not load (no content)",
                                                                         "formulas: 0 of 2 typeset by MathJax"]


def test_every_public_module_has_a_page_in_the_api_reference():
    import jsm

    documented = set(re.findall(r"automodule:: (jsm\.\w+)", "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))))
    modules = {f"jsm.{n}" for n in jsm.__all__ if n in jsm._SUBMODULES}
    assert modules <= documented, f"not in docs/api/: {sorted(modules - documented)}"


def test_the_readme_quickstart_is_the_code_the_docs_execute():
    """The README's first Python block is the quickstart page's first cell (which the docs build runs),
    but for the last line: the README saves the figure, the page shows it."""
    readme = re.search(r"```python\n(.*?)```", (DOCS.parent / "README.md").read_text(), re.S).group(1).splitlines()
    page = re.search(r"```\{code-cell\} python\n(.*?)```", (DOCS / "quickstart.md").read_text(), re.S).group(1).splitlines()
    assert readme[:-1] == page[:-1]
    assert readme[-1].replace('plt.savefig("quickstart.png", dpi=120)', "plt.show()") == page[-1]
