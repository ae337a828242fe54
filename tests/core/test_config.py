"""The paper profiles carry the specs' checklist values (spec hhcl §10, dgl-sysu30k appendix)."""

import dataclasses
import typing

import pytest

from reidkit.config import DGL_ERASING_FILL, PROFILES, Profile, dgl_input_size, get_profile

HHCL_CHECKLIST = {
    "k1": 30, "k2": 6, "min_samples": 4,
    "memory": "CMhybrid", "temp": 0.05, "momentum": 0.1, "hard_weight": 0.5,
    "epochs": 60, "batch_size": 256, "num_instances": 16, "lr": 3.5e-4, "weight_decay": 5e-4,
    "step_size": 20, "gamma": 0.1, "eval_step": 10, "ghost_bn": 64, "amp": False, "camera_aware": True,
}
EPS_ITERS = {"market1501": (0.45, 200), "dukemtmcreid": (0.6, 200), "msmt17": (0.7, 300)}


@pytest.mark.parametrize("name", list(EPS_ITERS))
def test_hhcl_paper_profiles_match_the_checklist(name):
    p = get_profile(name)
    got = {**vars(p.cluster), **vars(p.hhcl)}
    for key, want in HHCL_CHECKLIST.items():
        assert got[key] == want, f"{name}.{key} = {got[key]!r}, spec says {want!r}"
    assert (p.cluster.eps, p.hhcl.iters) == EPS_ITERS[name]
    assert (p.model.arch, p.model.pooling, p.model.last_stride) == ("resnet50", "avg", 1)
    assert (p.data.height, p.data.width, p.data.pad, p.data.erasing_p) == (256, 128, 10, 0.5)
    assert p.data.erasing_fill == (0.485, 0.456, 0.406)
    assert p.data.dataset == name
    assert p.seed == 1


def test_paper_numbers():
    assert get_profile("market1501").paper["mAP"] == 84.2 and get_profile("market1501").paper["rank1"] == 93.4
    assert get_profile("dukemtmcreid").paper["mAP"] == 73.3 and get_profile("dukemtmcreid").paper["rank1"] == 85.1
    assert get_profile("sysu30k").paper["rank1"] == 26.9


def test_sysu30k_profile_carries_dgl_values():
    d = get_profile("sysu30k").dgl
    assert dgl_input_size("sysu30k") == (384, 128) and d.input_size is None  # the data section's size
    assert (d.ids_per_bag, d.ids_per_batch, d.images_per_id, d.num_heads) == (2, 16, 4, 8)
    assert (d.margin, d.sigma, d.pairwise_weight, d.ce_weight, d.triplet_weight) == (1.2, 1.0, 2.0, 1.0, 2.0)
    assert (d.lr, d.weight_decay, d.amsgrad, d.epochs, d.milestones, d.gamma) == (2e-4, 5e-4, True, 300, (250, 290), 0.1)
    assert DGL_ERASING_FILL == (0.0, 0.0, 0.0)
    assert (d.uo_batch_size, d.uo_bags_per_batch, d.uo_lr_backbone, d.uo_lr_head, d.uo_epochs) == (180, 12, 1e-4, 1e-3, 8)
    assert (d.uo_height, d.uo_width, d.uo_color_jitter) == (192, 96, 0.1)


# the image input each consumer reads, per profile: HHCL / evaluation (data.height, data.width,
# data.erasing_fill) and DGL's full model (dgl_input_size, fill DGL_ERASING_FILL)
REF_FILL, ZERO = (0.485, 0.456, 0.406), (0.0, 0.0, 0.0)
INPUTS = {
    "smoke": ((128, 64), REF_FILL, (128, 64)),
    "workshop": ((256, 128), REF_FILL, (256, 128)),
    "laptop": ((256, 128), REF_FILL, (256, 128)),
    "market1501": ((256, 128), REF_FILL, (384, 128)),
    "dukemtmcreid": ((256, 128), REF_FILL, (384, 128)),
    "msmt17": ((256, 128), REF_FILL, (384, 128)),
    "sysu30k": ((384, 128), ZERO, (384, 128)),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_input_sizes_and_fills_per_consumer(name):
    p = get_profile(name)
    data_size, data_fill, dgl_size = INPUTS[name]
    assert (p.data.height, p.data.width) == data_size and p.data.erasing_fill == data_fill
    assert dgl_input_size(p) == dgl_size
    # dgl.input_size is set only where DGL's input differs from the data section's
    assert (p.dgl.input_size is not None) == (dgl_size != data_size)


def test_dgl_input_follows_data_overrides():
    p = get_profile("laptop").replace(data__height=128, data__width=64)
    assert dgl_input_size(p) == (128, 64)
    assert dgl_input_size(get_profile("market1501").replace(data__height=128)) == (384, 128)
    from reidkit.config import OverrideError, apply_overrides, parse_set

    assert dgl_input_size(apply_overrides("smoke", parse_set(["dgl.input_size=[192, 64]"]))) == (192, 64)
    with pytest.raises(OverrideError, match="dgl has no field 'height'"):
        parse_set(["dgl.height=128"])


def test_no_field_is_repeated_across_sections():
    hints = typing.get_type_hints(Profile)
    sections = [f.name for f in dataclasses.fields(Profile) if dataclasses.is_dataclass(hints[f.name])]
    assert set(sections) == {"data", "model", "cluster", "hhcl", "camera", "dgl", "eval"}
    where: dict[str, list[str]] = {}
    for section in sections:
        for f in dataclasses.fields(hints[section]):
            where.setdefault(f.name, []).append(section)
    repeated = {name: secs for name, secs in where.items() if len(secs) > 1}
    # only the two methods' own optimisation schedules share names (each method has its own values)
    per_method = {"epochs", "lr", "weight_decay", "gamma", "amp", "eval_step", "ghost_bn", "iters"}
    assert set(repeated) <= per_method, f"fields repeated across sections: {repeated}"
    assert all(secs == ["hhcl", "dgl"] for secs in repeated.values())


def test_cpu_profiles_use_the_embedded_sample_and_mobilenet():
    for name in ("smoke", "workshop"):
        p = get_profile(name)
        assert p.data.dataset == "mini-mars" and p.model.arch == "mobilenetv2"
    assert get_profile(None).name == "workshop"
    assert set(PROFILES) >= {"smoke", "workshop", "market1501", "dukemtmcreid", "msmt17", "sysu30k"}


def test_replace_and_unknown_profile():
    p = get_profile("smoke").replace(hhcl__epochs=3, seed=7)
    assert p.hhcl.epochs == 3 and p.seed == 7 and get_profile("smoke").hhcl.epochs == 1
    with pytest.raises(KeyError, match="has no field"):
        get_profile("smoke").replace(hhcl__nope=1)
    with pytest.raises(KeyError, match="unknown profile"):
        get_profile("imagenet")


def test_laptop_profile_is_a_real_dataset_subset():
    p = get_profile("laptop")
    assert p.data.dataset == "market1501" and p.data.subset_ids == 150 and p.data.subset_seed == 0
    assert p.model.arch == "mobilenetv2" and p.model.pretrained is True
    assert p.data.workers == 0 and p.hhcl.ghost_bn is None
    assert get_profile("workshop").data.subset_ids is None and get_profile("market1501").data.subset_ids is None


def test_parse_set_converts_to_field_types():
    from reidkit.config import apply_overrides, parse_set, validate_overrides

    got = parse_set(["hhcl.iters=400", "data.dataset=dukemtmcreid", "hhcl.lr=1e-4", "hhcl.amp=false",
                     "dgl.milestones=[3, 5]", "data.subset_ids=null", "hhcl.ghost_bn=32", "seed=3",
                     "cluster.eps=1", "model.pretrained=/w/x.pth"])
    assert got == {"hhcl.iters": 400, "data.dataset": "dukemtmcreid", "hhcl.lr": 1e-4, "hhcl.amp": False,
                   "dgl.milestones": (3, 5), "data.subset_ids": None, "hhcl.ghost_bn": 32, "seed": 3,
                   "cluster.eps": 1.0, "model.pretrained": "/w/x.pth"}
    assert isinstance(got["cluster.eps"], float)
    # JSON round trip (run.json) gives the same profile
    assert validate_overrides({"dgl.milestones": [3, 5]}) == {"dgl.milestones": (3, 5)}
    p = apply_overrides("laptop", {"data.subset_ids": 50, "data.dataset": "dukemtmcreid"})
    assert (p.name, p.data.subset_ids, p.data.dataset) == ("laptop", 50, "dukemtmcreid")
    assert apply_overrides("laptop", None) == get_profile("laptop")


@pytest.mark.parametrize("pair, message", [
    ("hhcl.iters=many", "expected an integer"), ("hhcl.iters=2.5", "expected an integer"),
    ("hhcl.amp=perhaps", "true or false"), ("hhcl.lr=fast", "expected a number"),
    ("hhcl.nope=1", "has no field 'nope'"), ("train.iters=1", "SECTION.FIELD"), ("hhcl.iters", "KEY=VALUE|FIELD=VALUE"),
    ("data.erasing_fill=[1, 2]", "expected 3 values"), ("data.subset_ids=lots", "expected an integer"),
])
def test_parse_set_rejects_with_one_line(pair, message):
    from reidkit.config import OverrideError, parse_set

    with pytest.raises(OverrideError, match=message) as exc:
        parse_set([pair])
    assert "\n" not in str(exc.value)
