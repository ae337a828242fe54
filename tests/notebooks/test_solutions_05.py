"""Notebook 05's worked solutions and its library helpers (reidkit.dgl.graphical teaching helpers,
reidkit.course.weak_lesson tables, reidkit.viz.bags figures), on the embedded sample (smoke profile)."""

import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from conftest import ROOT

NB = "05_weak_graphical"


@pytest.fixture(scope="module")
def ctx05(smoke_ctx):
    """The smoke run folder with notebook 05's full and unary-only networks trained for two iterations
    (what the solutions load instead of training the profile's epochs)."""
    from reidkit.dgl.method import train_dgl

    ds = smoke_ctx.dataset()
    for variant in ("full", "unary_only"):
        if not smoke_ctx.path(NB, variant, "model_best.pt").is_file():
            train_dgl("smoke", ds, smoke_ctx.path(NB, variant), variant=variant, device="cpu", seed=1,
                      epochs=1, iters=2, evaluate=False, log=lambda s: None)
    return smoke_ctx


SOLUTION = NB  # the conftest fixture `sol` loads notebooks/solutions/<SOLUTION>.py


# ---------------------------------------------------------------------------------------------
# library helpers

def test_appearance_kernel_matches_graph_loss_kernel_and_plain_numpy():
    from reidkit.dgl.graphical import appearance_kernel

    g = np.random.default_rng(0).normal(size=(6, 4))
    plain = np.exp(-((g[:, None] - g[None]) ** 2).sum(-1) / 0.7)
    assert np.allclose(appearance_kernel(g, 0.7), plain)
    t = appearance_kernel(torch.tensor(g, dtype=torch.float32), 0.7)
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), plain, atol=1e-5)
    with pytest.raises(ValueError):
        appearance_kernel(g, 0.0)


def test_simulated_bags_layout():
    from reidkit.dgl.graphical import simulated_bags

    labels = np.repeat(np.arange(6), 5)
    bags = simulated_bags(labels, ids_per_bag=3, images_per_id=4, num_bags=10, seed=0)
    assert len(bags) == 10
    for idx, ids in bags:
        assert len(idx) == 12 and len(set(ids)) == 3 and ids == sorted(ids)
        assert (labels[idx] == np.repeat(ids, 4)).all()  # id-major, 4 images each
    with pytest.raises(ValueError):
        simulated_bags(labels, ids_per_bag=7, images_per_id=2, num_bags=1)


def test_compare_assignments_exact_never_costs_more_and_brute_force_agrees():
    from reidkit.dgl.graphical import (
        assignment_cost,
        compare_assignments,
        exact_balanced_assignment,
        simulated_bags,
    )

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 6)
    scores = rng.normal(size=(30, 5)) + 2.0 * np.eye(5)[labels]
    bags = simulated_bags(labels, 2, 3, 25, seed=1)
    s = compare_assignments(scores, bags, labels)
    assert all(len(v) == 25 for v in s.values())
    assert (s["exact_cost"] <= s["greedy_cost"] + 1e-9).all()
    assert ((s["greedy_cost"] - s["exact_cost"] > 1e-9) <= s["disagree"]).all()
    # the notebook's brute force, on a bag of 7 images with 3 ids (k = 2, remainder 1)
    sc, ids = rng.normal(size=(7, 5)), np.array([0, 2, 4])
    best = min((l for l in itertools.product(ids, repeat=7)
                if min(np.bincount(l, minlength=5)[ids]) >= 2 and max(np.bincount(l, minlength=5)[ids]) <= 3),
               key=lambda l: assignment_cost(sc, ids, l))
    exact = exact_balanced_assignment(sc, ids)
    assert np.isclose(assignment_cost(sc, ids, exact), assignment_cost(sc, ids, best))


def test_median_pick_is_the_kit_lower_median_of_the_whole_bag():
    """d+ = sorted index (n_b - 1) // 2 of the whole bag, the anchor included: on well separated people
    the anchor's own person for bags of 1 or 2 people, another person from 3 up."""
    from reidkit.course.weak_lesson import median_pick
    from reidkit.dgl.graphical import weak_triplet_loss

    rng = np.random.default_rng(0)
    for m, own in ((1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0), (5, 0.0)):
        y = np.repeat(np.arange(2 * m), 4)
        emb = 3 * rng.normal(size=(2 * m, 16))[y] + 0.1 * rng.normal(size=(len(y), 16))
        bag_of = np.repeat([0, 1], 4 * m)
        r = median_pick(emb, y, bag_of)
        assert (r["rank"] == (4 * m - 1) // 2).all() and (r["bag_size"] == 4 * m).all()
        assert r["own"].mean() == own and not r["self"].any()
        assert np.allclose(r["share_own"], 1 / m)
        # the picked image's distance is the kit's d+
        vec = torch.nn.functional.one_hot(torch.as_tensor(bag_of), 2).float()
        _, d_ap, _ = weak_triplet_loss(torch.tensor(emb, dtype=torch.float32), vec)
        dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
        assert np.allclose(dist[np.arange(len(y)), r["picked"]], d_ap.numpy(), atol=1e-4)


def test_relaxed_potts_figure():
    import matplotlib.pyplot as plt

    from reidkit.viz.bags import relaxed_potts_figure

    fig = relaxed_potts_figure(sigma=0.5)
    left, right = fig.axes[0], fig.axes[1]
    curves = {line.get_label().split(":")[0]: line.get_ydata() for line in left.get_lines()
              if not line.get_label().startswith("_")}
    assert np.allclose(curves["same label, both sure"], 0)  # agreeing labels cost nothing
    assert np.isclose(curves["different labels, both sure"][0], 1.0)  # identical look, different labels: k = 1
    assert np.all(np.diff(curves["different labels, both sure"]) < 0)  # falls with the distance
    assert np.allclose(curves["one image unsure"], 0.5 * curves["different labels, both sure"])
    img = right.get_images()[0].get_array()
    assert np.isclose(img[0, 0], 1.0) and np.isclose(img[-1, 0], 0.0)  # q = 0 disagrees, q = 1 agrees
    plt.close(fig)
    with pytest.raises(ValueError):
        relaxed_potts_figure(sigma=0)


def test_example_bag_and_forward_records(smoke_ctx):
    from reidkit.course.weak_lesson import example_bag, forward_records
    from reidkit.nets.weak import build_weak_model

    prof = smoke_ctx.profile
    bag = example_bag(prof, smoke_ctx.dataset(), seed=1)
    n = prof.dgl.ids_per_bag * prof.dgl.images_per_id
    assert len(bag["records"]) == n and len(bag["bag_classes"]) == prof.dgl.ids_per_bag
    assert set(bag["true_cls"].tolist()) == set(bag["bag_classes"])
    assert sorted(bag["bag_vector"]) == bag["bag_classes"]
    assert np.isclose(sum(bag["bag_vector"].values()), 1.0)
    net = build_weak_model(prof, "full", bag["num_classes"], device="cpu")
    out = forward_records(net, bag["records"][:5], prof, "cpu", batch_size=2)
    assert out["logits"].shape == (5, bag["num_classes"]) and out["low"].shape[0] == 5
    assert out["emb"].shape[0] == 5 and out["emb"].ndim == 2


def test_results_and_training_tables(ctx05, tmp_path):
    from types import SimpleNamespace

    from reidkit.course.runctx import RunContext
    from reidkit.course.weak_lesson import (
        RESULT_COLUMNS,
        VARIANT_NAMES,
        evaluate_variants,
        results_table,
        training_table,
        variants_summary,
    )
    from reidkit.nets.weak import load_weak_model

    ds = ctx05.dataset()
    model = load_weak_model(ctx05.path(NB, "full", "model_best.pt"), "smoke", "cpu")
    hist = [{"epoch": 0, "loss": 1.0, "ce": 0.5, "pairwise": -0.01, "triplet": 0.2, "pseudo_acc": 0.5, "t_epoch": 1.0}]
    runs = {"full": SimpleNamespace(model=model, history=hist, network="reidnet", num_classes=16)}
    ctx = RunContext.open("smoke", None, str(tmp_path), "cpu", 1, name=NB)
    results = evaluate_variants(runs, ds, "smoke", ctx.out, "cpu")
    assert (ctx.out / f"eval_{VARIANT_NAMES['full']}.npz").is_file()
    with np.load(ctx.out / "eval_DGL_full.npz") as z:
        assert set(z.files) == {"qf", "gf", "tf"} and z["tf"].shape[0] == len(ds.train)
    columns, rows = results_table(ctx, results, ds)
    assert columns == RESULT_COLUMNS and rows[0][0] == "DGL_full" and 0 <= rows[0][2] <= 100
    # reopened on a finished run: features newer than the variant's network are read, not extracted
    final = ctx.out / "full" / "model_best.pt"
    final.parent.mkdir()
    final.write_bytes(b"")
    import os
    t = (ctx.out / "eval_DGL_full.npz").stat().st_mtime
    os.utime(final, (t - 10, t - 10))
    unusable = {"full": SimpleNamespace(model=None, history=hist, network="reidnet", num_classes=16)}
    assert evaluate_variants(unusable, ds, "smoke", ctx.out, "cpu") == results
    with pytest.raises(AttributeError):  # a network newer than its features is evaluated again (None.eval)
        os.utime(final, (t + 10, t + 10))
        evaluate_variants(unusable, ds, "smoke", ctx.out, "cpu")
    assert [r[0] for r in rows[1:]] == ["HHCL (notebook 04)", "ImageNet features (notebook 02)"]  # nothing else ran
    assert rows[1][2] == "not run"
    # a model another notebook left is scored with the same code
    f = np.load(ctx.out / "eval_DGL_full.npz")
    (tmp_path / "04_hybrid_contrast").mkdir()
    np.savez(tmp_path / "04_hybrid_contrast" / "eval_HHCL_CMhybrid.npz", qf=f["qf"], gf=f["gf"], tf=f["tf"])
    _, rows2 = results_table(ctx, results, ds)
    hhcl = next(r for r in rows2 if r[0] == "HHCL CMhybrid")
    assert hhcl[2:] == rows2[0][2:] and not any(r[0] == "HHCL (notebook 04)" for r in rows2)
    # notebook 02's untrained network is labelled "ImageNet features", whatever its file is called
    (tmp_path / "02_backbone").mkdir()
    np.savez(tmp_path / "02_backbone" / "eval_direct_transfer.npz", qf=f["qf"], gf=f["gf"], tf=f["tf"])
    _, rows3 = results_table(ctx, results, ds)
    names = [r[0] for r in rows3]
    assert "ImageNet features" in names and not any("direct transfer" in n for n in names)
    assert rows3[names.index("ImageNet features")][1] == "ImageNet only"
    tcols, trows = training_table(runs)
    assert trows == [["full", 0, 1.0, 0.5, -0.01, 0.2, 50.0, 1.0]] and len(tcols) == 8
    summary = variants_summary(runs, results)
    assert summary["full"]["final_pseudo_acc"] == 0.5 and "market" in summary["full"]


# ---------------------------------------------------------------------------------------------
# figures and the widget

def test_bag_figures_and_committed_diagram(tmp_path):
    import matplotlib.pyplot as plt

    from reidkit import viz
    from reidkit.data.datasets import load_dataset
    from reidkit.dgl.graphical import appearance_kernel

    recs = load_dataset("mini-mars", None).train[:6]
    paths = [r.path for r in recs]
    g = np.random.default_rng(0).normal(size=(6, 3))
    true = np.array([0, 0, 0, 1, 1, 1])
    K = appearance_kernel(g, 2.0)
    for fig in (viz.dgl_graph_diagram(), viz.bag_graph(paths, K, true, [0, 1]), viz.kernel_matrix(K, true),
                viz.kernel_sigma_figure(g, true, [0.1, 1, 10]),
                viz.bag_inference_figure(paths, true, [0, 1, 0, 1, 1, 1], np.full((6, 2), 0.5)),
                viz.weak_triplet_figure(g[:, :2], true),
                viz.weak_training_curves({"full": [{"epoch": 0, "loss": 1.0, "pseudo_acc": 0.5}]})):
        assert isinstance(fig, plt.Figure)
        plt.close(fig)
    with pytest.raises(ValueError):
        viz.bag_graph(paths, K[:3, :3], true, [0, 1])
    c = viz.kernel_contrast(np.array([[1, .9, .1], [.9, 1, .2], [.1, .2, 1]]), [0, 0, 1])
    assert np.isclose(c["same"], 0.9) and np.isclose(c["different"], 0.15) and np.isclose(c["gap"], 0.75)
    out = viz.save_dgl_graph_diagram(tmp_path / "d.png")
    assert out.stat().st_size > 10_000
    committed = ROOT / "notebooks" / "figures" / "dgl_graph.png"
    assert committed.is_file() and committed.stat().st_size > 10_000


def test_kernel_widget_redraws_when_sigma_moves(monkeypatch):
    import io

    import matplotlib.pyplot as plt

    from reidkit import viz
    from reidkit.data.datasets import load_dataset
    from reidkit.viz import bags

    recs = load_dataset("mini-mars", None).train[:4]
    paths = [r.path for r in recs]
    g = np.random.default_rng(1).normal(size=(4, 3))
    drawn = []
    real_view = bags._sigma_view

    def spy(*args):
        drawn.append(args[-1])
        return real_view(*args)

    monkeypatch.setattr(bags, "_sigma_view", spy)
    w = viz.kernel_widget(g, paths, [0, 0, 1, 1], [0, 1], sigma=1.0)
    slider = w.children[0]
    assert slider.continuous_update is False
    slider.value = slider.max
    assert drawn == [1.0, slider.max]  # one render at start, one per move

    def png(sigma):
        fig = real_view(g, paths, [0, 0, 1, 1], [0, 1], sigma)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()

    assert png(10 ** slider.min) != png(10 ** slider.max)  # what the student sees changes (log slider)


# ---------------------------------------------------------------------------------------------
# the worked solutions

def test_exercise_1_wrong_label_set(ctx05, sol, capsys):
    r = sol.exercise_1(ctx05)
    assert r["impostor"] not in r["clean_set"] and r["removed"] not in r["corrupted_set"]
    n, lost = r["n_images"], r["n_images_of_removed"]
    assert lost > 0 and np.isclose(r["best_possible"], (n - lost) / n)
    k = n // len(r["corrupted_set"])
    for method in ("map", "greedy", "exact"):
        bad = r[f"corrupted {method}"]
        assert bad["accuracy"] <= r["best_possible"] + 1e-9  # the removed person's images are always wrong
        assert r[f"clean {method}"]["on_impostor"] == 0
        assert r["stolen"][method] == max(0, bad["on_impostor"] - lost)
    for method in ("greedy", "exact"):
        assert r[f"corrupted {method}"]["on_impostor"] in (k, k + 1)  # the balance forces k images onto it
    out = capsys.readouterr().out
    assert "Conclusion:" in out and "constraint" in out
    # the conclusion follows the numbers
    forced = [r[f"corrupted {m}"]["on_impostor"] for m in ("map", "greedy", "exact")]
    assert ("MAP put only" in r["explanation"]) == (forced[0] < min(forced[1:]))
    assert ("were taken from them" in r["explanation"]) == (max(r["stolen"].values()) > 0)


def test_exercise_2_greedy_exact_disagree(ctx05, sol, capsys):
    r = sol.exercise_2(ctx05)
    assert r["bag"] is not None and r["bags_tried"] == r["bag"] + 1
    assert (r["greedy"] != r["exact"]).any() and len(r["differ_at"]) >= 2
    assert r["exact_cost"] <= r["greedy_cost"] + 1e-9
    for lab in (r["greedy"], r["exact"]):
        counts = np.bincount(np.searchsorted(r["ids"], lab), minlength=len(r["ids"]))
        assert (counts == 5).all()  # 15 images, 3 ids: exactly 5 each
    assert len(r["locked_first"]) == 5 and (r["greedy"][r["locked_first"]] == r["first_winner"]).all()
    assert np.isclose(r["greedy_acc"], (r["greedy"] == r["truth"]).mean())
    word = ("also more accurate" if r["exact_acc"] > r["greedy_acc"] else
            "but less accurate" if r["exact_acc"] < r["greedy_acc"] else "with the same accuracy")
    assert word in r["explanation"] and "Conclusion:" in capsys.readouterr().out


def test_exercise_3_median_pick_on_real_features(ctx05, sol, capsys):
    r = sol.exercise_3(ctx05, num_bags=10)
    assert r["sizes"] == [1, 2, 3, 4] and r["bag_size"] == [4, 8, 12, 16] and r["rank"] == [1, 3, 5, 7]
    assert r["expected"] == [1.0, 1.0, 0.0, 0.0]  # own person fills half the bag or more: only 1 and 2 people
    assert all(0.0 <= v <= 1.0 for v in r["own"])
    assert len(r["explanation"].split("; ")) == 4 and "Conclusion:" in capsys.readouterr().out
    for m, own, part in zip(r["sizes"], r["own"], r["explanation"].split("; ")):
        assert part.startswith(f"{m} person" if m == 1 else f"{m} people")
        if m >= 3:
            assert ("as predicted" in part) == (own <= 0.05)
        else:
            assert ("as predicted" in part) == (own >= 0.95)


def test_exercise_4_bag_size(ctx05, sol, capsys):
    r = sol.exercise_4(ctx05, num_bags=10)
    assert r["sizes"] == [1, 2, 3, 4, 5] and np.allclose(r["chance"], [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert r["map_acc"][0] == 1.0 and r["exact_acc"][0] == 1.0  # one id per bag = full supervision
    assert all(0 <= a <= 1 for a in r["map_acc"] + r["exact_acc"])
    assert r["map_acc"][-1] < 1.0 and r["exact_acc"][-1] < 1.0
    gain = np.array(r["exact_acc"]) - np.array(r["map_acc"])
    if gain.max() > 0:
        assert r["best_balance_size"] == r["sizes"][int(np.argmax(gain))]
        assert f"helps most at {r['best_balance_size']} " in r["explanation"]
    else:
        assert r["best_balance_size"] is None and "never beats MAP" in r["explanation"]
    below = any(a <= c for a, c in zip(r["exact_acc"][1:], r["chance"][1:]))
    assert ("falls to chance" in r["explanation"]) == below
    assert "Conclusion:" in capsys.readouterr().out


def test_solutions_load_without_work(capsys):
    """``%run solutions/05_weak_graphical.py`` defines the functions and does nothing else."""
    import runpy

    ns = runpy.run_path(str(ROOT / "notebooks" / "solutions" / f"{NB}.py"), run_name="__main__")
    assert all(callable(ns[f"exercise_{k}"]) for k in range(1, 5))
    assert capsys.readouterr().out == ""
