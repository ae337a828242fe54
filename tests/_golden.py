"""The golden reference outputs (tests/golden/*.npz, see its README): one loader and one case finder."""

from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def load_golden(name: str) -> dict:
    """All arrays of ``tests/golden/<name>.npz``."""
    return dict(np.load(GOLDEN_DIR / f"{name}.npz"))


def case_prefixes(z: dict, input_key: str, output_key: str) -> list[str]:
    """Prefixes of the cases in a file: '' for the public case, a prefix for any larger case
    (a case is an ``<prefix><input_key>`` array with its ``<prefix><output_key>``)."""
    return [k[: -len(input_key)] for k in z
            if k.endswith(input_key) and k[: -len(input_key)] + output_key in z]
