"""The methods ``reidkit train`` can run, by name: the one registry the command line and
``reproduce`` ask.

A method is a :class:`reidkit.train.engine.Method` subclass in its own module: its ``name``, the
profile ``sections`` that shape its training, its ``default_selection``, and the engine's hooks.
Adding one is that module, one line in :data:`REGISTRY` and its name in ``reidkit.config.METHODS``
(which the configuration checks ``--set method=...`` against without importing the methods).
"""

from __future__ import annotations

from reidkit.config import METHODS
from reidkit.dgl.method import DGL
from reidkit.hhcl.method import HHCL
from reidkit.hhcl.supervised import Supervised
from reidkit.train.engine import Method

__all__ = ["REGISTRY", "method_class"]

#: every trainable method by its ``name``
REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (HHCL, Supervised, DGL)}

if tuple(sorted(REGISTRY)) != tuple(sorted(METHODS)):  # pragma: no cover - a wiring error, found on import
    raise RuntimeError(f"reidkit.methods.REGISTRY {sorted(REGISTRY)} and config.METHODS {sorted(METHODS)} differ")


def method_class(name: str) -> type[Method]:
    """The method class called ``name`` (``KeyError`` naming the known ones)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None
