import os
from pathlib import Path

import pytest

# tests never reach the network for weights, and show no progress bars
os.environ.setdefault("REIDKIT_OFFLINE", "1")
os.environ.setdefault("REIDKIT_PROGRESS", "0")

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
