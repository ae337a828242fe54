"""The golden reference outputs: one loader and one case finder.

The files are ``tests/golden/<name>.npz`` (see its README). ``REIDKIT_GOLDEN_DIR=/some/folder``
points every golden test at another folder of ``.npz`` files with the same keys, so the same tests
check other reference cases.
"""

import os
from pathlib import Path

import numpy as np

BUNDLED_DIR = Path(__file__).resolve().parent / "golden"


def golden_dir() -> Path:
    """The folder the golden tests read: ``$REIDKIT_GOLDEN_DIR`` when set, else ``tests/golden``."""
    return Path(os.environ.get("REIDKIT_GOLDEN_DIR") or BUNDLED_DIR)


GOLDEN_DIR = golden_dir()


def load_golden(name: str) -> dict:
    """All arrays of ``<golden dir>/<name>.npz``."""
    path = golden_dir() / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"golden file {path} not found (REIDKIT_GOLDEN_DIR="
                                f"{os.environ.get('REIDKIT_GOLDEN_DIR', 'unset')})")
    return dict(np.load(path))


def case_prefixes(z: dict, input_key: str, output_key: str) -> list[str]:
    """Prefixes of the cases in a file: '' for the public case, a prefix for any larger case
    (a case is an ``<prefix><input_key>`` array with its ``<prefix><output_key>``)."""
    return [k[: -len(input_key)] for k in z
            if k.endswith(input_key) and k[: -len(input_key)] + output_key in z]
