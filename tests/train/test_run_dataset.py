"""The dataset a run reads is decided in one place: the Python API and the CLI read the same
identity subset of a profile, and SYSU-30k is streamed by every entry point."""

import dataclasses

from trees import market1501_tree

from reidkit.config import get_profile
from reidkit.data.subset import load_profile_dataset, streams_sysu30k
from reidkit.dgl.method import DGL
from reidkit.hhcl.method import HHCL
from reidkit.methods import resolve_run


def _pids(recs) -> set:
    return {r.pid for r in recs}


def test_python_api_and_cli_read_the_same_subset(tmp_path):
    root = market1501_tree(tmp_path / "data", train_ids=8, test_ids=6)
    base = get_profile("laptop")
    prof = dataclasses.replace(base, data=dataclasses.replace(base.data, dataset="market1501", subset_ids=3))
    via_cli = resolve_run(prof, str(root.parent), "cpu", {}, method="hhcl").dataset()  # as reidkit train
    hhcl = HHCL(prof, None, data_root=str(root.parent))
    hhcl.prepare("cpu", "last", 0, print)
    dgl = DGL(prof, None, data_root=str(root.parent))
    assert len(_pids(via_cli.train)) == 3          # the subset, not the 8 identities of the tree
    assert _pids(hhcl.ds.train) == _pids(via_cli.train)
    assert _pids(hhcl.ds.query) == _pids(via_cli.query)
    assert _pids(dgl._load_dataset().train) == _pids(via_cli.train)
    assert _pids(load_profile_dataset(prof, str(root.parent)).train) == _pids(via_cli.train)


def test_sysu30k_is_recognised_by_name_and_alias():
    prof = get_profile("sysu30k")
    assert streams_sysu30k(prof)
    alias = dataclasses.replace(prof, data=dataclasses.replace(prof.data, dataset="SYSU"))
    assert streams_sysu30k(alias)
    assert not streams_sysu30k(get_profile("laptop"))
