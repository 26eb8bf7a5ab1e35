"""Maintainer tool: remove the text progress bars that tqdm leaves in a notebook's stored outputs.

Where Jupyter has no widgets, tqdm redraws its bars as text, hundreds of times per epoch; the
history table says the same. ``make notebook-outputs`` runs this after executing the notebooks:

    python notebooks/strip_progress_bars.py notebooks/*.ipynb
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip_progress_bars(path: str | Path) -> int:
    """Remove the progress-bar outputs of the notebook at ``path``, in place; returns how many."""
    notebook = nbformat.read(path, as_version=4)
    removed = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = [o for o in cell.outputs if not _is_progress_bar(o)]
        removed += len(cell.outputs) - len(kept)
        cell.outputs = kept
    nbformat.write(notebook, path)
    return removed


def _is_progress_bar(output: dict) -> bool:
    if output.get("output_type") != "stream" or output.get("name") != "stderr":
        return False
    text = "".join(output.get("text", ""))
    return not text.strip() or "\r" in text or "\x1b[A" in text


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: removed {strip_progress_bars(name)} progress-bar outputs")
