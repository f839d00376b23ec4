"""Sphinx configuration of jsm's documentation site (`make docs`; built offline, warnings are errors)."""

import os
import shutil
import sys
from pathlib import Path

import mathjax  # django-static-mathjax: MathJax 3's own files in a wheel

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the notebooks' kernels inherit it

project = "jsm"
author = "the jsm authors"
copyright = "2026, the jsm authors"
release = version = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "plain_docstrings",  # docs/_ext: our plain-text docstrings as reStructuredText
]
exclude_patterns = ["_build", "_ext", "**.ipynb_checkpoints", "*.py", "README.md"]
source_suffix = {".md": "myst-nb", ".rst": "restructuredtext"}

# --- MyST and the notebooks ------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "cache"  # a notebook runs again only when its code changed
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_timeout = 300
nb_execution_raise_on_error = True  # a cell that raises fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# --- the API reference from the docstrings -------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
default_role = "py:obj"  # `name` in a docstring links to its entry when there is one, else reads as code
add_module_names = False

# --- formulas, served from a local copy of MathJax 3 (no network needed) ----------------
_MATHJAX = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
_STATIC_MATHJAX = HERE / "_build" / "_mathjax"


def _copy_mathjax() -> None:
    """tex-chtml.js and the fonts it loads, into a static folder of the build (not the 24 MB package)."""
    target = _STATIC_MATHJAX / "mathjax"
    if (target / "tex-chtml.js").exists():
        return
    shutil.rmtree(target, ignore_errors=True)
    (target / "output" / "chtml" / "fonts").mkdir(parents=True)
    shutil.copy(_MATHJAX / "tex-chtml.js", target)
    shutil.copytree(_MATHJAX / "output" / "chtml" / "fonts" / "woff-v2", target / "output" / "chtml" / "fonts" / "woff-v2")


_copy_mathjax()
mathjax_path = "mathjax/tex-chtml.js"
mathjax3_config = {"tex": {"macros": {"E": r"\mathbb{E}", "R": r"\mathbb{R}"}}}

# --- the site -------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "jsm"
html_static_path = [str(_STATIC_MATHJAX)]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
html_last_updated_fmt = None
html_context = {"default_mode": "light"}  # unset, the theme logs a console error on a first visit


# --- top-level names (jsm.fit, jsm.score_of, ...) link to their entries in their home modules -----------


def _top_level_name(app, env, node, contnode):
    import jsm

    target = node.get("reftarget", "")
    name = target.removeprefix("jsm.")
    if node.get("refdomain") != "py" or not target.startswith("jsm.") or name not in jsm._FUNCTIONS:
        return None
    node["reftarget"] = f"jsm.{jsm._FUNCTIONS[name]}.{name}"
    return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"], node["reftarget"],
                                             node, contnode)


def setup(app):
    app.connect("missing-reference", _top_level_name)
