"""Worked solutions to the exercises of notebook 05 (weak supervision: a graphical model over bags).

Load them in a new notebook cell with ``%run solutions/05_weak_graphical.py``, then call
``exercise_K(ctx)`` with the notebook's ``RunContext``. Loading does no work. Each function
prints its numbers and a conclusion drawn from them, and returns the numbers. The trained networks
are the notebook's own (``RUN_DIR/05_weak_graphical/<variant>/model_best.pt``); when the notebook
has not run in this run folder they are trained here with the profile's settings (the same call as
the notebook, so the notebook then resumes from them).
"""

import numpy as np

from reidkit.course.weak_lesson import example_bag, forward_records, median_pick
from reidkit.data.records import relabel
from reidkit.dgl.evaluate import bag_inference
from reidkit.dgl.graphical import (
    assignment_cost,
    compare_assignments,
    exact_balanced_assignment,
    greedy_balanced_assignment,
    simulated_bags,
)
from reidkit.dgl.method import train_dgl
from reidkit.nets.weak import load_weak_model

NOTEBOOK = "05_weak_graphical"


def trained_model(ctx, variant):
    """The notebook's trained network of ``variant``, loaded from the run folder or trained here."""
    final = ctx.path(NOTEBOOK, variant, "model_best.pt")
    if final.is_file():
        return load_weak_model(final, ctx.profile, ctx.device)
    print(f"no trained {variant} network in {ctx.run_dir}: training it here")
    return train_dgl(ctx.profile, ctx.dataset(), ctx.path(NOTEBOOK, variant), variant=variant, device=ctx.device,
                     seed=ctx.seed, evaluate=False).model


def _n(count, word):
    """``1 image``, ``2 images``; ``1 person``, ``2 people``."""
    plural = {"person": "people", "image": "images"}.get(word, word + "s")
    return f"{count} {word if count == 1 else plural}"


def _training_labels(ctx):
    ds = ctx.dataset()
    labels, _ = relabel(ds.train)
    return ds, np.asarray(labels)


def exercise_1(ctx):
    """What breaks if a bag's label set is wrong?

    Replace the last identity of the example bag's label set with the next class index not in the
    set (the impostor) and run the three inference rules (full model MAP, unary-only greedy and
    exact) on the clean and on the corrupted set. Returns, per rule, the accuracy and how many
    images took the impostor."""
    prof = ctx.profile
    bag = example_bag(prof, ctx.dataset(), seed=ctx.seed)
    recs, truth, clean = bag["records"], bag["true_cls"], bag["bag_classes"]
    C = bag["num_classes"]
    removed = clean[-1]
    impostor = next(c % C for c in range(removed + 1, removed + 1 + C) if c % C not in clean)
    corrupted = sorted(clean[:-1] + [impostor])
    models = {"full": trained_model(ctx, "full"), "unary_only": trained_model(ctx, "unary_only")}
    n, lost = len(recs), int((truth == removed).sum())
    result = {"clean_set": clean, "corrupted_set": corrupted, "removed": removed, "impostor": impostor,
              "n_images": n, "n_images_of_removed": lost, "best_possible": (n - lost) / n}
    print(f"label set {clean} -> {corrupted}: person {removed} ({lost} of {n} images) replaced by {impostor}; "
          f"at most {n - lost} of {n} images can still be right")
    for name, label_set in (("clean", clean), ("corrupted", corrupted)):
        for variant, method in (("full", "map"), ("unary_only", "greedy"), ("unary_only", "exact")):
            inf = bag_inference(models[variant], recs, label_set, prof, ctx.device, variant=variant, method=method)
            r = {"accuracy": float((inf["pseudo"] == truth).mean()),
                 "on_impostor": int((inf["pseudo"] == impostor).sum())}
            result[f"{name} {method}"] = r
            print(f"  {name:9s} {method:6s}: {r['accuracy']:.0%} right, "
                  f"{_n(r['on_impostor'], 'image')} on the impostor")
    forced = {m: result[f"corrupted {m}"]["on_impostor"] for m in ("map", "greedy", "exact")}
    stolen = {m: max(0, forced[m] - lost) for m in forced}  # impostor images beyond the removed person's
    result["stolen"] = stolen
    if forced["map"] < min(forced["greedy"], forced["exact"]):
        verdict = (f"MAP put only {_n(forced['map'], 'image')} on the impostor, the balanced rules "
                   f"{forced['greedy']} and {forced['exact']}: the balance forces k = n // m images onto a person "
                   "who is not there")
    else:
        verdict = (f"MAP put as many images on the impostor as the balanced rules ({forced['map']} against "
                   f"{forced['greedy']} and {forced['exact']}): the network finds the impostor likely for these images")
    if max(stolen.values()) > 0:
        verdict += (f"; beyond the removed person's {_n(lost, 'image')}, up to {_n(max(stolen.values()), 'image')} "
                    "of people who are in the bag were taken from them too")
    print("Conclusion: " + verdict + ". Nothing in the energy can flag the error: the bag constraint gives +inf "
          "to the true label of the removed person's images, so every labelling the model considers obeys the "
          "wrong set, and training then follows those pseudo-labels with full confidence.")
    result["explanation"] = verdict
    return result


def exercise_2(ctx, num_bags=200, ids_per_bag=3, images_per_id=5):
    """Find a bag where greedy and exact balanced assignments disagree.

    Bags of ``ids_per_bag`` people x ``images_per_id`` images from the training set, labelled with
    the trained unary-only network's logits. Returns the first disagreeing bag: both labellings,
    their unary costs and accuracies, the images they label differently and which of those greedy
    locked in its first round."""
    prof = ctx.profile
    ds, labels = _training_labels(ctx)
    scores = forward_records(trained_model(ctx, "unary_only"), ds.train, prof, ctx.device,
                             variant="unary_only")["logits"]
    bags = simulated_bags(labels, ids_per_bag, images_per_id, num_bags, seed=ctx.seed)
    for b, (idx, ids) in enumerate(bags):
        s = scores[idx]
        greedy = greedy_balanced_assignment(s, ids)
        exact = exact_balanced_assignment(s, ids)
        if not (greedy != exact).any():
            continue
        truth = labels[idx]
        # greedy's first round: every image votes for its best id; the winner locks its k best voters by raw logit
        sub = s[:, ids]
        vote = sub.argmax(1)
        winner = int(np.argmax(np.bincount(vote, minlength=len(ids))))
        voters = np.flatnonzero(vote == winner)
        k = len(idx) // len(ids)
        locked = voters[np.argsort(-sub[voters, winner], kind="stable")[:k]]
        differ = np.flatnonzero(greedy != exact)
        r = {"bag": b, "bags_tried": b + 1, "ids": ids, "truth": truth, "greedy": greedy, "exact": exact,
             "greedy_cost": assignment_cost(s, ids, greedy), "exact_cost": assignment_cost(s, ids, exact),
             "greedy_acc": float((greedy == truth).mean()), "exact_acc": float((exact == truth).mean()),
             "differ_at": differ, "first_winner": int(ids[winner]), "locked_first": locked,
             "locked_and_differ": np.intersect1d(locked, differ)}
        print(f"bag {b} (after {b + 1} tried), people {ids}")
        print(f"  truth  {truth}\n  greedy {greedy}  cost {r['greedy_cost']:.3f}, {r['greedy_acc']:.0%} right")
        print(f"  exact  {exact}  cost {r['exact_cost']:.3f}, {r['exact_acc']:.0%} right")
        print(f"  they differ at images {differ.tolist()}; greedy's first round gave person {r['first_winner']} "
              f"images {sorted(locked.tolist())}")
        gap = r["greedy_cost"] - r["exact_cost"]
        if r["exact_acc"] > r["greedy_acc"]:
            verdict = f"here the exact labelling is cheaper by {gap:.3f} and also more accurate"
        elif r["exact_acc"] < r["greedy_acc"]:
            verdict = (f"here the exact labelling is cheaper by {gap:.3f} but less accurate: the network's "
                       "probabilities are wrong on some of these images, and optimising them harder follows them")
        else:
            verdict = f"here the exact labelling is cheaper by {gap:.3f} with the same accuracy"
        if len(r["locked_and_differ"]):
            one = len(r["locked_and_differ"]) == 1
            verdict += (f"; greedy locked {'image' if one else 'images'} {r['locked_and_differ'].tolist()} in its "
                        f"first round and the exact solver moves {'it' if one else 'them'}: a high raw logit is not a "
                        "high probability, since an image can have all its logits high, and greedy never revisits a "
                        "lock")
        else:
            verdict += ("; the differences come from later rounds, where greedy gives the remaining images to "
                        "whoever is left, without trading them back")
        print("Conclusion: " + verdict + ".")
        r["explanation"] = verdict
        return r
    print(f"Conclusion: greedy and exact agree on all {len(bags)} bags; draw more bags (num_bags) to find one.")
    return {"bag": None, "bags_tried": len(bags), "explanation": "no disagreement in these bags; draw more"}


def exercise_3(ctx, sizes=(1, 2, 3, 4), images_per_id=4, num_bags=40):
    """What does the weak triplet's median pick on real features?

    With the trained full model's embeddings of the training images, draw bags of 1..4 people
    (``images_per_id`` images each) and measure, with ``median_pick``, the share of anchors whose
    in-bag distance ``d+`` (the lower median over the bag, the anchor included) is to an image of
    their own person; ``expected`` is that share when people are perfectly separated (1 when the
    person fills at least half the bag, else 0)."""
    prof = ctx.profile
    ds, labels = _training_labels(ctx)
    emb = forward_records(trained_model(ctx, "full"), ds.train, prof, ctx.device)["emb"]
    out = {"sizes": list(sizes), "own": [], "expected": [], "rank": [], "bag_size": []}
    for m in sizes:
        bags = simulated_bags(labels, m, images_per_id, num_bags, seed=ctx.seed)
        idx = np.concatenate([i for i, _ in bags])
        bag_of = np.repeat(np.arange(len(bags)), m * images_per_id)
        pick = median_pick(emb[idx], labels[idx], bag_of)
        out["own"].append(float(pick["own"].mean()))
        out["expected"].append(float((pick["share_own"] * pick["bag_size"] > pick["rank"]).mean()))
        out["rank"].append(int(pick["rank"][0]))
        out["bag_size"].append(int(pick["bag_size"][0]))
        print(f"bags of {_n(m, 'person')} x {images_per_id}: d+ = sorted index {out['rank'][-1]} of "
              f"{out['bag_size'][-1]}; own person for {out['own'][-1]:.0%} of anchors (perfectly separated "
              f"people: {out['expected'][-1]:.0%})")
    lines = []
    for m, own, exp in zip(sizes, out["own"], out["expected"]):
        if exp == 1.0 and own >= 0.95:
            lines.append(f"{_n(m, 'person')}: as predicted, d+ is a true positive ({own:.0%})")
        elif exp == 1.0:
            lines.append(f"{_n(m, 'person')}: d+ is a true positive for only {own:.0%} of anchors, so the network "
                         "does not yet put all of an anchor's own images before the others in its bag")
        elif own <= 0.05:
            lines.append(f"{_n(m, 'person')}: as predicted, d+ is another person ({1 - own:.0%} of anchors)")
        else:
            lines.append(f"{_n(m, 'person')}: d+ is another person for {1 - own:.0%} of anchors, not all: where the "
                         "features mix people, an own image can land at the median rank by chance")
    print("Conclusion: " + "; ".join(lines) + ".")
    out["explanation"] = "; ".join(lines)
    return out


def exercise_4(ctx, sizes=(1, 2, 3, 4, 5), images_per_id=4, num_bags=40):
    """Bag size against pseudo-label accuracy.

    With the trained full model's logits on the training set, draw bags of 1..5 identities and
    measure the accuracy of the MAP pseudo-labels and of the exact balanced assignment."""
    prof = ctx.profile
    ds, labels = _training_labels(ctx)
    scores = forward_records(trained_model(ctx, "full"), ds.train, prof, ctx.device)["logits"]
    out = {"sizes": list(sizes), "chance": [1.0 / m for m in sizes], "map_acc": [], "exact_acc": []}
    for m in sizes:
        survey = compare_assignments(scores, simulated_bags(labels, m, images_per_id, num_bags, seed=ctx.seed), labels)
        out["map_acc"].append(float(survey["map_acc"].mean()))
        out["exact_acc"].append(float(survey["exact_acc"].mean()))
        print(f"|L_b| = {m}: MAP {out['map_acc'][-1]:.0%}, exact {out['exact_acc'][-1]:.0%}, chance {1 / m:.0%}")
    gain = np.array(out["exact_acc"]) - np.array(out["map_acc"])
    best = int(np.argmax(gain))
    # above chance (a bag of 1 person has chance 100%: it counts as above)
    above = [a > c or m == 1 for m, a, c in zip(sizes, out["exact_acc"], out["chance"])]
    lines = [f"a bag of {sizes[0]} person is full supervision ({out['map_acc'][0]:.0%} right)" if sizes[0] == 1 else
             f"the smallest bags ({sizes[0]} people) give {out['map_acc'][0]:.0%}"]
    lines.append(f"from {sizes[0]} to {_n(sizes[-1], 'person')} MAP falls from {out['map_acc'][0]:.0%} to "
                 f"{out['map_acc'][-1]:.0%} and exact from {out['exact_acc'][0]:.0%} to {out['exact_acc'][-1]:.0%}")
    if gain[best] > 0:
        out["best_balance_size"] = sizes[best]
        lines.append(f"the balance prior helps most at {_n(sizes[best], 'person')} "
                     f"(+{100 * gain[best]:.0f} points over MAP)")
    else:
        out["best_balance_size"] = None
        lines.append("the balance prior never beats MAP here")
    lines.append("exact stays above chance at every size" if all(above) else
                 "exact falls to chance or below at " + ", ".join(str(m) for m, a in zip(sizes, above) if not a)
                 + " people per bag: there the bags teach the network nothing")
    print("Conclusion: " + "; ".join(lines) + ". Cheaper annotation (bigger bags) buys noisier pseudo-labels.")
    out["explanation"] = "; ".join(lines)
    return out
