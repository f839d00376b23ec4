"""Execute one page of the site (a MyST notebook) and time each cell, without building the site.

    python docs/run_notebook.py docs/tutorials/01_energies.md [...]

For writing a tutorial: the build (`make docs`) runs the same kernel on the same cells; a cell that
raises fails both. Prints the seconds of each cell and of the whole page.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbclient
from myst_nb.core.read import read_myst_markdown_notebook
from myst_parser.config.main import MdParserConfig


def run(path: Path) -> float:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    nb = read_myst_markdown_notebook(path.read_text(), MdParserConfig(enable_extensions={"dollarmath", "amsmath", "colon_fence", "deflist"}))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t = time.perf_counter()
            client.execute_cell(cell, i)
            first = cell.source.strip().splitlines()[0][:70] if cell.source.strip() else ""
            print(f"  {time.perf_counter() - t:6.1f} s  cell {i:2d}  {first}", flush=True)
    total = time.perf_counter() - start
    print(f"{path}: {total:.1f} s")
    return total


if __name__ == "__main__":
    for p in sys.argv[1:]:
        run(Path(p))
