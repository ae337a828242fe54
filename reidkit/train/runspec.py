"""One run, resolved once: the profile with its overrides, the device, the AMP dtype, the dataset with
its identity subset applied, and whether its training set is streamed.

``reidkit train``, ``reidkit reproduce``, the notebooks' ``RunContext`` and the Python API
(``train_hhcl``, ``train_dgl``) build a :class:`RunSpec` the same way, through
:func:`reidkit.methods.resolve_run` (which supplies the method's AMP policy), and pass it down: a
method reads its device, AMP dtype and dataset from it and decides none of them again, every epoch
or evaluation. Kernels below take the device they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from reidkit.config import Profile, apply_overrides
from reidkit.core.device import amp_dtype, resolve_device
from reidkit.data.records import ReIDDataset
from reidkit.data.subset import load_profile_dataset, streams_sysu30k

AmpPolicy = Callable[[Profile, torch.device], "torch.dtype | None"]


@dataclass
class RunSpec:
    profile: Profile                   # overrides applied
    method: str                        # the name the method registry knows it by
    overrides: dict                    # ``{"section.field": value}``, as validated
    data_root: str | None
    device: torch.device               # resolved: never "auto"
    amp: torch.dtype | None            # the method's AMP policy on this device; None: fp32
    streamed: bool                     # SYSU-30k's training set, streamed from its folders, never listed
    _dataset: ReIDDataset | None = field(default=None, repr=False, compare=False)

    @classmethod
    def resolve(cls, profile: str | Profile, data_root: str | None = None, device: Any = "auto",
                overrides: dict | None = None, method: str | None = None, amp_policy: AmpPolicy = amp_dtype,
                dataset: ReIDDataset | None = None) -> "RunSpec":
        """Resolve a run: the overrides checked and applied, the device resolved, the AMP dtype decided
        by ``amp_policy`` (the method's). ``dataset``: one already parsed (else read on first use)."""
        prof = apply_overrides(profile, overrides or {})
        dev = resolve_device(device)
        return cls(prof, method or prof.method, dict(overrides or {}), data_root or None, dev,
                   amp_policy(prof, dev), streams_sysu30k(prof), dataset)

    def dataset(self) -> ReIDDataset:
        """The run's dataset, read once: ``profile.data.dataset`` under ``data_root`` with the identity
        subset applied (SYSU-30k's training set is streamed, not listed)."""
        if self._dataset is None:
            self._dataset = load_profile_dataset(self.profile, self.data_root)
        return self._dataset
