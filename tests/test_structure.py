"""The library's shape: one home per name, no import cycle, `__all__` everywhere, a light `import jsm`."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jsm

PACKAGE = Path(jsm.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
PUBLIC = [m for m in MODULES if not m.startswith("_")]


def _top_level_jsm_imports(module: str) -> set[str]:
    """The jsm modules that `module` imports when it is imported (top-level statements only)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jsm":
            if node.module == "jsm":
                found |= {a.name for a in node.names if a.name in MODULES}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jsm.")}
    return found


def test_no_module_imports_itself_through_a_cycle():
    graph = {m: _top_level_jsm_imports(m) for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if m in done:
            return
        path.append(m)
        for n in graph[m]:
            visit(n)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


def test_a_planted_cycle_is_found(monkeypatch):
    """The cycle check bites: samplers importing diffusion at the top (as it once did) is a cycle."""
    real = _top_level_jsm_imports
    monkeypatch.setitem(globals(), "_top_level_jsm_imports",
                        lambda m: real(m) | ({"diffusion"} if m == "samplers" else set()))
    with pytest.raises(AssertionError, match="import cycle: .*samplers -> diffusion -> samplers|diffusion -> samplers"):
        test_no_module_imports_itself_through_a_cycle()


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_module_declares_all_and_defines_it(module):
    mod = __import__(f"jsm.{module}", fromlist=["_"])
    assert hasattr(mod, "__all__"), f"jsm.{module} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"jsm.{module}.__all__ names what it does not define: {missing}"


def test_each_public_name_has_one_home():
    """No module exports what another defines: functions and classes carry their home in __module__;
    a constant of the same name and value in two modules' __all__ is one constant written twice."""
    constants = {}
    for module in PUBLIC:
        mod = __import__(f"jsm.{module}", fromlist=["_"])
        for name in mod.__all__:
            obj = getattr(mod, name)
            home = getattr(obj, "__module__", None)
            if isinstance(obj, type) or callable(obj) and home is not None:
                assert home == f"jsm.{module}", f"jsm.{module}.{name} is {home}.{name} re-exported"
            elif name.isupper():
                constants.setdefault((name, repr(obj)), []).append(module)
    twice = {k: ms for k, ms in constants.items() if len(ms) > 1}
    assert not twice, twice


def test_import_jsm_is_light_and_every_submodule_is_an_attribute():
    code = ("import sys, jsm\n"
            "heavy = [m for m in ('orbax.checkpoint', 'diffrax', 'matplotlib', 'flax', 'optax') if m in sys.modules]\n"
            "print(','.join(heavy) or 'none')\n"
            f"assert all(hasattr(jsm, m) for m in {PUBLIC!r})\n"
            "assert jsm.fit is jsm.train.fit and jsm.laplacian is jsm.scores.laplacian\n"
            "print('diffrax' in sys.modules, 'matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    # nothing heavy until a submodule is used; diffrax not even then, until a solve needs it
    assert out.stdout.split() == ["none", "False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        jsm.no_such_module  # noqa: B018
