"""The methods ``reidkit train`` can run, by name: the one registry the command line and
``reproduce`` ask.

A method is a :class:`reidkit.train.engine.Method` subclass in its own module: its ``name``, the
profile ``sections`` that shape its training, its ``default_selection``, and the engine's hooks.
Adding one is that module, one line in :data:`REGISTRY` and its name in ``reidkit.config.METHODS``
(which the configuration checks ``--set method=...`` against without importing the methods).
"""

from __future__ import annotations

from typing import Any

from reidkit.config import METHODS, apply_overrides, get_profile
from reidkit.dgl.method import DGL
from reidkit.hhcl.method import HHCL
from reidkit.hhcl.supervised import Softmax, Supervised
from reidkit.train.engine import Method
from reidkit.train.gpu_cost import DATASET_SIZES, NoCostModel, cost_line, estimate
from reidkit.train.runspec import RunSpec

__all__ = ["REGISTRY", "format_cost", "gpu_cost", "method_class", "resolve_run"]

#: every trainable method by its ``name``
REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (HHCL, Supervised, Softmax, DGL)}

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


def gpu_cost(profile) -> dict[str, Any]:
    """Expected peak GPU memory and time per epoch of a paper profile, **derived** from its method's
    :meth:`~reidkit.train.engine.Method.gpu_plan` (fields: :func:`reidkit.train.gpu_cost.estimate`).
    :class:`~reidkit.train.gpu_cost.NoCostModel` (a ``ValueError``) for a profile on no paper
    dataset, a method without a cost model or a network whose cost is not cached."""

    prof = get_profile(profile)
    if prof.data.dataset not in DATASET_SIZES:
        raise NoCostModel(f"gpu_cost covers the paper datasets ({', '.join(DATASET_SIZES)}); "
                         f"profile {prof.name} reads {prof.data.dataset}")
    plan = method_class(prof.method).gpu_plan(prof)
    if plan is None:
        raise NoCostModel(f"method {prof.method!r} has no GPU cost model (Method.gpu_plan)")
    return estimate(prof, plan)


def format_cost(profile) -> str | None:
    """One line for the start of a run (:func:`reidkit.train.gpu_cost.cost_line`), or None where no
    figure can be derived: a profile on no paper dataset (``smoke``), a method without a cost model,
    a network whose cost is not cached (``laptop``'s MobileNetV2). Any other error propagates."""

    try:
        return cost_line(gpu_cost(profile))
    except NoCostModel:
        return None
