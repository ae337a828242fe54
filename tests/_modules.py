"""Python files that are not importable packages (benchmark scripts, worked solutions, a wheel's
own network definition) loaded as modules for tests."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_module(path: str | Path, name: str):
    """The file ``path`` executed as a module called ``name`` (no ``__main__`` block runs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module."""
    return load_module(BENCHMARKS / f"{name}.py", name)
