"""Progress bars: ``tqdm.auto`` (widgets in Jupyter, text in a terminal), imported once here.

Where Jupyter runs without ipywidgets, tqdm.auto falls back to text bars, which work, and warns
with the path of this machine's site-packages; that warning would end up in the notebooks'
stored outputs, so it is silenced.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
