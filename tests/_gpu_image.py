"""The GPU machine's Python, as far as the kit's imports go.

The image a rented or lent GPU comes with holds PyTorch, scikit-learn, SciPy, matplotlib, tqdm and
PyYAML, but not the notebook stack or faiss (the device this kit's GPU check was prepared for:
torch 2.11, no network). The training and evaluation commands, and ``benchmarks/gpu_check.py``,
must run there; a test runs them in a subprocess that cannot find these packages, as they are
not found on such a machine.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the kit's dependencies (and what they bring) that such an image lacks
LACKS = ("papermill", "nbformat", "nbconvert", "mistune", "nbclient", "jupyter_client", "jupyter_core",
         "traitlets", "IPython", "ipykernel", "ipywidgets", "jupyterlab", "faiss")

_SITECUSTOMIZE = '''\
import sys

_LACKS = frozenset({lacks!r})


class _Without:
    """One of Python's module finders, blind to the packages this GPU image does not have: they
    are not found (``find_spec`` gives None, ``import`` raises ModuleNotFoundError), as there."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _LACKS:
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [_Without(f) for f in sys.meta_path]
'''


def gpu_image_env(folder: Path) -> dict:
    """The environment of a subprocess that sees Python as the GPU image has it: a
    ``sitecustomize`` in ``folder``, first on ``PYTHONPATH`` (so subprocesses inherit it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(lacks=sorted(LACKS)))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
