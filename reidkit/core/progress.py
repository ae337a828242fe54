"""Progress bars (tqdm.auto): shown in a terminal or notebook, quiet otherwise."""

from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm.std import tqdm


def _interactive_output() -> bool:
    if os.environ.get("REIDKIT_PROGRESS") == "1":
        return True
    if os.environ.get("REIDKIT_PROGRESS") == "0":
        return False
    try:  # inside a Jupyter kernel
        from IPython import get_ipython  # optional: only present beside a Jupyter kernel

        shell = get_ipython()
        if shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell":
            return True
    except Exception:
        pass
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, **kwargs):
    """A text tqdm progress bar, quiet when output is neither a terminal nor a notebook.

    In a notebook the bar is plain text on stderr, never an ipywidget: a widget bar leaves
    "Error displaying widget: model not found" behind once the notebook is saved and reopened.
    Set ``REIDKIT_PROGRESS=1`` (or ``0``) to force it on (or off)."""

    kwargs.setdefault("disable", not _interactive_output())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
