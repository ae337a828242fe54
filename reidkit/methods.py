"""The methods ``reidkit train`` can run, by name: the one registry the command line and
``reproduce`` ask.

A method is a :class:`reidkit.train.engine.Method` subclass in its own module: its ``name``, the
profile ``sections`` that shape its training, its ``default_selection``, and the engine's hooks.
Adding one is that module, one line in :data:`REGISTRY` and its name in ``reidkit.config.METHODS``
(which the configuration checks ``--set method=...`` against without importing the methods).
"""

from __future__ import annotations

from typing import Any

from reidkit.config import METHODS, apply_overrides
from reidkit.dgl.method import DGL
from reidkit.hhcl.method import HHCL
from reidkit.hhcl.supervised import Supervised
from reidkit.train.engine import Method
from reidkit.train.runspec import RunSpec

__all__ = ["REGISTRY", "method_class", "resolve_run"]

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


def resolve_run(profile, data_root: str | None = None, device: Any = "auto", overrides: dict | None = None,
                method: str | None = None, dataset=None) -> RunSpec:
    """The run resolved once (:class:`RunSpec`), with the AMP policy of its method (``method``, else
    the profile's). What ``reidkit train``, ``reproduce`` and ``RunContext`` build and pass down."""
    prof = apply_overrides(profile, overrides or {})          # the one place the overrides are applied
    cls = method_class(method or prof.method)
    spec = RunSpec.resolve(prof, data_root, device, method=cls.name, amp_policy=cls.amp_policy, dataset=dataset)
    spec.overrides = dict(overrides or {})
    return spec
