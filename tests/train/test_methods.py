"""The method registry (reidkit.methods): every method the command line trains is a
``Method`` subclass found by name, and a new one is one class plus one registry entry. A stub
third method, defined here, is trained through ``reidkit train`` with no other change."""

import json

import pytest
import torch
from _tiny import tiny_dataset
from torch import nn
from torch.utils.data import DataLoader

from reidkit import cli, commands, config, methods
from reidkit.config import METHODS, get_profile
from reidkit.core.io import read_train_checkpoint
from reidkit.data import transforms
from reidkit.train.checkpoints import run_settings
from reidkit.train.engine import Method
from reidkit.train.runspec import RunSpec

pytestmark = pytest.mark.usefixtures("one_thread")  # torch at one thread (conftest)


class Shrink(Method):
    """A stub: a 3 -> 4 linear map of the mean colour, trained to shrink its output."""

    name = "shrink"
    sections = ("data", "seed")

    def __init__(self, profile, dataset=None, epochs=None, data_root=None):
        self.prof, self.dataset = get_profile(profile), dataset
        self.epochs, self.eval_every, self.batch_size, self.ghost_bn = epochs or 2, 0, 4, None
        self.label = "shrink"

    def describe(self):
        return f"shrink | profile {self.prof.name}"

    def settings(self):
        return run_settings(self.prof, self.name, self.sections)

    def prepare(self, dev, selection, seed, log):
        self.ds = self.dataset

    def build_model(self, dev):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).to(dev)

    def optimizer(self, model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, 1)

    def begin_epoch(self, epoch, eseed, model, dev, entry, log):
        data = transforms.ImageDataset(self.ds.train[:8], transforms.test_transform(32, 16))
        return DataLoader(data, batch_size=self.batch_size), 2

    def step(self, net, batch, opt, dev):
        loss = net(batch["img"].to(dev)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "images": int(batch["img"].shape[0])}

    def end_epoch(self, steps):
        return {"loss": float(torch.stack([s["loss"] for s in steps]).mean())}

    def evaluate(self, model, dev, split, log):
        with torch.no_grad():
            out = model(torch.ones(1, 3, 32, 16))
        return {"mAP": float(1 / (1 + out.pow(2).sum()))}  # rises as the map shrinks

    @staticmethod
    def epoch_line(e):
        return f"epoch {e['epoch']} | loss {e['loss']:.4f}"


def test_the_registry_names_every_configured_method():
    assert set(methods.REGISTRY) == set(METHODS)
    for name, cls in methods.REGISTRY.items():
        assert issubclass(cls, Method) and cls.name == name and cls.default_selection in ("val", "test", "last")
    with pytest.raises(KeyError, match="unknown method 'nope'; known: hhcl"):
        methods.method_class("nope")


def test_a_method_must_implement_every_hook():
    class Half(Method):
        name = "half"

        def describe(self):
            return "half"

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_a_stub_method_trains_through_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(methods.REGISTRY, "shrink", Shrink)
    monkeypatch.setattr(config, "METHODS", config.METHODS + ("shrink",))  # the method's name, as documented
    monkeypatch.setattr(RunSpec, "dataset", lambda self: tiny_dataset())   # the run's data: a tiny set
    out = tmp_path / "run"
    rc = cli.main(["train", "--method", "shrink", "--profile", "smoke", "--out", str(out), "--epochs", "2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "shrink" and res["selection"] == "last" and res["selected_epoch"] == 1
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1] and hist[1]["loss"] < hist[0]["loss"]
    assert read_train_checkpoint(out / "checkpoint.pt")["settings"]["method"] == "shrink"
    assert "shrink | profile smoke" in (out / "train.log").read_text()


def test_gpu_cost_asks_the_profiles_method_for_its_plan(monkeypatch):
    """The derived GPU cost is the method's own account of a run (``Method.gpu_plan``); a method
    without one has no cost line rather than HHCL's."""
    from reidkit.hhcl.method import HHCL

    monkeypatch.setitem(methods.REGISTRY, "shrink", Shrink)
    prof = get_profile("market1501").replace(method="shrink")
    assert methods.format_cost(prof) is None
    with pytest.raises(ValueError, match="method 'shrink' has no GPU cost model"):
        methods.gpu_cost(prof)

    class BrokenPlan(Shrink):  # a bug in a cost model is not "no figure": it is raised
        @classmethod
        def gpu_plan(cls, prof):
            return {}["batch"]

    monkeypatch.setitem(methods.REGISTRY, "shrink", BrokenPlan)
    with pytest.raises(KeyError, match="batch"):
        methods.format_cost(prof)

    class CostedShrink(Shrink):
        @classmethod
        def gpu_plan(cls, prof):
            return HHCL.gpu_plan(prof) | {"method": cls.name, "batch": 64}

    monkeypatch.setitem(methods.REGISTRY, "shrink", CostedShrink)
    cost, hhcl = methods.gpu_cost(prof), methods.gpu_cost("market1501")
    assert cost["method"] == "shrink" and cost["batch"] == 64 and hhcl["batch"] == 256
    assert cost["memory_gb"] < hhcl["memory_gb"] and cost["epoch_minutes"] == hhcl["epoch_minutes"]
    assert methods.format_cost(prof).startswith("GPU cost of market1501 (derived")


def test_the_start_of_a_run_prints_its_own_methods_cost(monkeypatch, capsys):
    """``reidkit train`` prints the cost of the method it runs on the profile as defined, not the
    profile's default method's."""
    from types import SimpleNamespace

    market = get_profile("market1501").replace(hhcl__iters=1)        # a run's override: not in the cost
    commands._print_cost(SimpleNamespace(profile=market, method="hhcl"))
    assert capsys.readouterr().out == methods.format_cost("market1501") + "\n"
    commands._print_cost(SimpleNamespace(profile=market, method="dgl"))
    assert "mgn with 8 x Linear(256, 751)" in methods.gpu_cost(get_profile("market1501").replace(method="dgl"))["basis"]
    assert capsys.readouterr().out == methods.format_cost(get_profile("market1501").replace(method="dgl")) + "\n"
    monkeypatch.setitem(methods.REGISTRY, "shrink", Shrink)
    commands._print_cost(SimpleNamespace(profile=market, method="shrink"))
    assert capsys.readouterr().out == ""


def test_the_run_is_resolved_once_and_the_python_api_reads_the_clis_subset(tmp_path, monkeypatch):
    """``train_hhcl("laptop", data_root=R)`` from Python and ``reidkit train --profile laptop`` read
    the same identity subset: both resolve one RunSpec, whose dataset is read once."""
    from market_trees import synthetic_market_tree

    from reidkit.hhcl import method as hhcl_method

    root = tmp_path / "data"
    synthetic_market_tree(root, train_ids=160, test_ids=152, train_per_id=2, query_per_id=1, gallery_per_id=2,
                          distractors=4)     # more identities than the laptop profile's 150
    seen = {}

    def capture(method, out_dir, **kwargs):
        seen.setdefault("pids", []).append(sorted({r.pid for r in method.spec.dataset().train}))
        seen.setdefault("amp", []).append(method.spec.amp)
        raise SystemExit(0)

    monkeypatch.setattr(hhcl_method, "fit", capture)
    with pytest.raises(SystemExit):
        hhcl_method.train_hhcl("laptop", data_root=str(root), out_dir=tmp_path / "py", device="cpu")
    monkeypatch.setattr(commands, "fit", capture)
    with pytest.raises(SystemExit):
        cli.main(["train", "--profile", "laptop", "--data-root", str(root), "--out", str(tmp_path / "cli"),
                  "--device", "cpu"])
    api, command_line = seen["pids"]
    assert api == command_line and len(api) == get_profile("laptop").data.subset_ids == 150
    assert seen["amp"][0] == seen["amp"][1]
    spec = methods.resolve_run("laptop", str(root), "cpu", {"data.subset_ids": 3})
    assert spec.dataset() is spec.dataset() and len({r.pid for r in spec.dataset().train}) == 3
    assert spec.device == torch.device("cpu") and spec.method == "hhcl" and not spec.streamed
    assert methods.resolve_run("sysu30k", str(root)).streamed
