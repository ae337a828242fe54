"""Worked solutions of notebook 04 (hybrid contrast: cluster memories and the HHCL loop).

Load them in a new cell of the notebook and run one exercise:

    %run solutions/04_hybrid_contrast.py
    exercise_1(ctx)

Running this file only defines functions; nothing is computed until an ``exercise_K(ctx)`` is
called. Each ``exercise_K`` reads the run's ImageNet features and pseudo-labels through
``ctx.features("train")`` and ``ctx.pseudo_labels()``, works on frozen features (a few seconds on
a CPU), prints a conclusion drawn from the numbers it measured, and returns those numbers (with
the conclusion under ``"explanation"``).
"""

import numpy as np
import torch
import torch.nn.functional as F

from reidkit.hhcl import memory as hmem
from reidkit.hhcl import memory_probe as mm
from reidkit.hhcl.memory import ClusterMemory


def _train_data(ctx):
    feats, labels = ctx.features("train"), ctx.pseudo_labels()
    cams = np.array([r.camid for r in ctx.dataset().train])
    return feats, labels, cams


def _batch_shape(ctx):
    """(clusters per batch, images per cluster) of the profile's PK batch."""
    h = ctx.profile.hhcl
    return h.batch_size // h.num_instances, h.num_instances


def _say(out):
    print(out["explanation"])
    return out


def exercise_1(ctx, plot=True):
    """Set the temperature to 0.5 and explain the curve.

    Train the probe (a linear head on frozen features, memory rebuilt from the centroids every 20
    iterations) at tau = 0.05 and tau = 0.5, and compare the loss curves with the smallest loss that
    K well-separated proxies allow.
    """
    feats, labels, cams = _train_data(ctx)
    k = int(labels.max()) + 1
    runs = {t: mm.train_probe(feats, labels, cams, temp=t, seed=ctx.seed) for t in (0.05, 0.5)}
    table = {r["temp"]: r for r in mm.temperature_table(feats, labels, temps=(0.05, 0.5))}
    # K unit proxies spread as far apart as possible (a regular simplex) have cosines -1/(K-1);
    # a feature sitting on its own proxy then has the logit gap (1 + 1/(K-1)) / tau to every negative.
    gap = (1 + 1 / (k - 1)) / 0.5
    floor = float(np.log(1 + (k - 1) * np.exp(-gap)))
    if plot:
        from reidkit import viz

        viz.probe_figure({f"tau {t}": h for t, h in runs.items()})
    end = {t: float(np.mean(h["loss"][-10:])) for t, h in runs.items()}
    out = {
        "clusters": k,
        "loss_start": {t: h["loss"][0] for t, h in runs.items()},
        "loss_end": end,
        "floor_tau_0.5": floor,
        "log_K": float(np.log(k)),
        "grad_norm": {t: table[t]["grad_norm"] for t in table},
        "effective_negatives": {t: table[t]["effective_negatives"] for t in table},
    }
    words = [f"With K = {k} clusters, the loss at tau = 0.5 ends at {end[0.5]:.2f} against {end[0.05]:.2f} "
             f"at tau = 0.05 (log K = {np.log(k):.2f}; the floor at 0.5 is {floor:.2f})."]
    if end[0.5] - floor < 0.5 * (np.log(k) - floor):
        words.append("At 0.5 the curve flattens near its floor: the own proxy can beat a negative by at most "
                     "2/tau = 4 in the logits, so the softmax can never become confident and the loss stops "
                     "reporting progress.")
    else:
        words.append("At 0.5 the curve is still far above its floor after the probe's iterations: the weak "
                     "1/tau push trains slowly.")
    g, e = out["grad_norm"], out["effective_negatives"]
    words.append(f"The gradient norm is {g[0.05]:.2f} at 0.05 and {g[0.5]:.2f} at 0.5, "
                 + ("stronger at the low temperature (the 1/tau factor)" if g[0.05] > g[0.5]
                    else "not stronger at the low temperature: most samples are already solved there")
                 + f"; it is spread over {e[0.5]:.1f} effective negatives at 0.5 against {e[0.05]:.1f} at 0.05"
                 + (", so the high temperature pushes weakly against many clusters at once."
                    if e[0.5] > e[0.05] else "."))
    out["explanation"] = " ".join(words)
    return _say(out)


def exercise_2(ctx, plot=True):
    """Set the momentum to 0.9 (the old value weighs 0.9) and explain the loss and the proxy lag."""
    feats, labels, cams = _train_data(ctx)
    runs = {m: mm.train_probe(feats, labels, cams, momentum=m, seed=ctx.seed) for m in (0.1, 0.9)}
    if plot:
        from reidkit import viz

        viz.probe_figure({f"m {m}": h for m, h in runs.items()})
    iters = runs[0.1]["iters"]
    out = {"min_lag_first_epoch": {m: float(min(h["lag"][:iters])) for m, h in runs.items()},
           "lag_after_rebuild": {m: float(h["lag"][iters]) for m, h in runs.items()},
           "mean_lag": {m: float(np.mean(h["lag"])) for m, h in runs.items()},
           "loss_end": {m: float(np.mean(h["loss"][-10:])) for m, h in runs.items()}}
    lag, loss, reset = out["min_lag_first_epoch"], out["loss_end"], out["lag_after_rebuild"]
    words = [f"Within the first epoch the lag falls to {lag[0.9]:.2f} with m = 0.9 and to {lag[0.1]:.2f} with m = 0.1:"]
    words.append("the slow memory stays near the centroids it was built from while the head moves the features."
                 if lag[0.9] < lag[0.1] else "the slow memory does not lag more here; the head moves the features little.")
    if loss[0.9] < loss[0.1]:
        words.append(f"The loss ends lower with m = 0.9 ({loss[0.9]:.3f} against {loss[0.1]:.3f}) because fixed targets "
                     "are easier to fit than targets that follow the features, so this low loss is not a better "
                     "feature: the lag is the curve to trust.")
    else:
        words.append(f"The loss does not end lower with m = 0.9 ({loss[0.9]:.3f} against {loss[0.1]:.3f}); "
                     "the lag is still the curve to trust, because the loss is measured against a moving memory.")
    words.append(f"After the rebuild the lag is back at {reset[0.9]:.2f} and {reset[0.1]:.2f}: "
                 + ("the HHCL loop rebuilds the memory from the centroids every epoch, so a slow momentum only "
                    "matters within an epoch." if min(reset.values()) > 0.95
                    else "the rebuild does not bring the memory fully up to date here."))
    out["explanation"] = " ".join(words)
    return _say(out)


def hard_update_hardest_positive(hard, x, y, momentum=0.1):
    """The released rule: h_k <- normalize(m h_k + (1-m) x_j), j the member of k least similar to h_k."""
    sims = x @ hard.T                                    # (B, K)
    new = hard.clone()
    for k in torch.unique(y).tolist():
        members = torch.nonzero(y == k).flatten()
        j = members[torch.argmin(sims[members, k])]
        new[k] = F.normalize(momentum * hard[k] + (1 - momentum) * x[j], dim=0)
    hard.copy_(new)


def hard_update_hardest_negative(hard, x, y, momentum=0.1):
    """Exercise 3: h_k follows the batch feature of ANOTHER cluster that is most similar to h_k."""
    sims = x @ hard.T
    new = hard.clone()
    for k in torch.unique(y).tolist():
        others = torch.nonzero(y != k).flatten()
        j = others[torch.argmax(sims[others, k])]
        new[k] = F.normalize(momentum * hard[k] + (1 - momentum) * x[j], dim=0)
    hard.copy_(new)


def exercise_3(ctx, steps=40):
    """Make the hard proxy follow the hardest negative, and say what goes wrong.

    Both rules run for ``steps`` PK batches (the profile's batch shape) on the frozen training
    features, from a memory built from the centroids. The released rule written here is first
    checked against ``ClusterMemory``.
    """
    feats, labels, cams = _train_data(ctx)
    keep = labels >= 0
    x_all = torch.from_numpy(np.ascontiguousarray(feats)).float()
    y_all = torch.as_tensor(labels).long()
    cent = hmem.cluster_centroids(x_all, labels)
    batches = mm.pk_batches(labels, cams, *_batch_shape(ctx), steps, seed=ctx.seed)

    # the hand-written released rule equals the library's CMhybrid hard rows on the first batch
    lib = ClusterMemory.from_features(x_all, labels, mode="CMhybrid")
    lib.update(x_all[batches[0]], y_all[batches[0]])
    mine = cent.clone()
    hard_update_hardest_positive(mine, x_all[batches[0]], y_all[batches[0]])
    torch.testing.assert_close(mine, lib.features[:len(cent)], rtol=1e-5, atol=1e-6)

    out = {}
    for name, rule in (("hardest positive", hard_update_hardest_positive),
                       ("hardest negative", hard_update_hardest_negative)):
        hard = cent.clone()
        for idx in batches:
            rule(hard, x_all[idx], y_all[idx])
        nearest = (x_all[keep] @ hard.T).argmax(1)
        own_cos = (hard * cent).sum(1)
        other_cos = (hard @ cent.T).masked_fill(torch.eye(len(cent), dtype=torch.bool), -2).max(1).values
        mem = ClusterMemory(x_all.shape[1], len(cent), mode="CMhybrid")
        mem.features = torch.cat([hard, cent])      # the hard rows, and mean proxies at the centroids
        with torch.no_grad():
            loss = float(mem(x_all[keep], y_all[keep]))
        out[name] = {"own_proxy_accuracy": float((nearest == y_all[keep]).float().mean()),
                     "cos_own_centroid": float(own_cos.mean()), "cos_nearest_other_centroid": float(other_cos.mean()),
                     "hhcl_loss": loss}
    pos, neg = out["hardest positive"], out["hardest negative"]
    words = [f"With the released rule {pos['own_proxy_accuracy']:.0%} of the training features find their own hard "
             f"proxy the most similar; with the hardest-negative rule {neg['own_proxy_accuracy']:.0%}. The hard proxy's "
             f"cosine to its own centroid is {pos['cos_own_centroid']:.2f} against {neg['cos_own_centroid']:.2f}, and "
             f"to the nearest other centroid {pos['cos_nearest_other_centroid']:.2f} against "
             f"{neg['cos_nearest_other_centroid']:.2f}; the loss is {pos['hhcl_loss']:.2f} against {neg['hhcl_loss']:.2f}."]
    if neg["cos_nearest_other_centroid"] > neg["cos_own_centroid"]:
        words.append("Following the hardest negative moves each hard proxy onto another person: it now describes a "
                     "neighbouring cluster better than its own. In training, the positive term would pull the "
                     "members of one cluster towards a different person while that person's proxy pushes them "
                     "away, and neighbouring identities would merge. Hardest negatives belong in the denominator "
                     "of the softmax, as CMhybrid_v2 uses them, never as the target a positive proxy follows.")
    elif neg["own_proxy_accuracy"] < pos["own_proxy_accuracy"]:
        words.append("The hardest-negative rule drags the hard proxies towards other clusters, and fewer features "
                     "recognise their own proxy: the positive target is corrupted, though no proxy has crossed "
                     "over entirely in these steps.")
    else:
        words.append("On these features the two rules end alike: the batches bring too few close negatives for the "
                     "wrong rule to show; try more steps.")
    out["explanation"] = " ".join(words)
    return _say(out)


def exercise_4(ctx, rates=(0.0, 0.15, 0.3), steps=40):
    """Noisy clusters: give a fraction of the clustered images a wrong pseudo-label and measure
    what the hard proxy follows, against the member farthest from the centroid and a random member."""
    feats, labels, cams = _train_data(ctx)
    pids = np.array([r.pid for r in ctx.dataset().train])
    ids_per_batch, num_instances = _batch_shape(ctx)
    k = int(labels.max()) + 1
    rng = np.random.default_rng(ctx.seed)
    out = {}
    for rate in rates:
        noisy = labels.copy()
        flip = (rng.random(len(labels)) < rate) & (labels >= 0)
        noisy[flip] = (labels[flip] + rng.integers(1, k, flip.sum())) % k   # a random OTHER cluster
        r = mm.follow_hard_proxy(feats, noisy, cams, pids, steps=steps, ids_per_batch=ids_per_batch,
                                 num_instances=num_instances, seed=ctx.seed)
        out[rate] = {key: r[key] for key in ("intruder", "intruder_vs_centroid", "intruder_share", "cos_hard_mean")}
    lines = [f"noise {rate:.0%}: hard proxy picks an intruder {v['intruder']:.2f}, the member farthest from the "
             f"centroid is one {v['intruder_vs_centroid']:.2f}, a random member {v['intruder_share']:.2f}; "
             f"cos(hard, mean proxy) {v['cos_hard_mean']:.3f}" for rate, v in ((r, out[r]) for r in rates)]
    noisy_rates = [r for r in rates if r > 0]
    words = []
    if noisy_rates and all(out[r]["intruder_vs_centroid"] > out[r]["intruder_share"] for r in noisy_rates):
        words.append("On noisy clusters the member farthest from the centroid is an intruder more often than a "
                     "random member: 'hardest positive' increasingly means 'wrong member'.")
    else:
        words.append("Here the member farthest from the centroid is not reliably an intruder: the wrong labels "
                     "land on images that sit close to their new cluster.")
    hi = max(rates)
    if out[hi]["intruder_share"] > 1.5 * hi:
        words.append(f"Intruders make up {out[hi]['intruder_share']:.0%} of the batch members although only "
                     f"{hi:.0%} of the labels are wrong: the camera-aware sampler prefers members from another "
                     "camera than the anchor's, and an intruder often is one.")
    if out[hi]["intruder"] > out[hi]["intruder_share"]:
        words.append("The hard proxy follows intruders more often than chance, and so drags its cluster towards them.")
    else:
        words.append("The hard proxy's own rule (least similar to the proxy, which has just jumped to its previous "
                     "pick) dilutes this to about the rate at which intruders occur in the batches.")
    if out[hi]["cos_hard_mean"] < out[min(rates)]["cos_hard_mean"]:
        words.append("As the noise grows, the hard proxy drifts away from the mean proxy: on a real dataset the "
                     "hardest members mix true cross-camera views (HHCL's signal) with intruders (its noise), and "
                     "the mean proxy, weight 0.25, keeps a stable description of the cluster beside it.")
    else:
        words.append("The hard and mean proxies stay as close as without noise, so on this sample the mean proxy "
                     "has little to correct; on a real dataset with impure clusters it is the stable anchor.")
    out["explanation"] = "\n".join(lines) + "\n" + " ".join(words)
    return _say(out)
