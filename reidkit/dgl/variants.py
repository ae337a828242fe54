"""DGL's three variants, each a small strategy chosen once per run: what it trains on (input size,
augmentation, batch of bags, sampler), how it optimises, and its loss. And the two ways a batch's
bags are known: simulated from consecutive identities of a PK batch, or read from the SYSU-30k
stream's bag tensors.

``reidkit.dgl.method.DGL`` holds one :class:`Variant` and one bag view per batch and never asks
which variant or which source it has.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
import torchvision.transforms as T

from reidkit.config import DGL_ERASING_FILL, DGL_VARIANTS, Profile
from reidkit.data.records import check_batch_fill
from reidkit.data.samplers import ConsecutiveBagSampler, PKBagSampler
from reidkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomErasing, train_transform
from reidkit.dgl.graphical import bag_label_vectors
from reidkit.dgl.objectives import bag_matrix, bags_of_batch, balanced_targets, full_dgl_loss, supervised_loss
from reidkit.nets.weak import UO_RESIZE, check_variant, weak_input_size

__all__ = ["Full", "FullySupervised", "SimulatedBags", "StreamedBags", "UnaryOnly", "VARIANTS", "Variant", "variant_for"]


# ----------------------------------------------------------------------------- a batch's bags

class SimulatedBags:
    """The bags of a records batch, as the reference simulates them: consecutive identities of a PK
    batch form a bag (full), or consecutive ``bag_size`` images do (unary-only's bag batches)."""

    def __init__(self, y: torch.Tensor, cfg, num_classes: int, bag_size: int):
        self.y, self.cfg, self.num_classes, self.bag_size = y, cfg, num_classes, bag_size

    def vectors(self) -> torch.Tensor:
        """(B, C): ``1 / ids_per_bag`` at each id of the image's bag (``bag_label_vectors``)."""
        c = self.cfg
        return bag_label_vectors(self.y, c.ids_per_bag, c.ids_per_batch, c.images_per_id, self.num_classes)

    def spans(self) -> list[tuple[int, int, list[int]]]:
        """(start, end, ids) of each bag along the batch."""
        yl, size = self.y.tolist(), self.bag_size
        return [(s, s + size, sorted(set(yl[s:s + size]))) for s in range(0, len(yl), size)]


class StreamedBags:
    """The bags of a SYSU-30k stream batch: each image carries its bag's index and id vector."""

    def __init__(self, batch_bags: dict, num_classes: int):
        self.bag, self.bag_labels, self.num_classes = batch_bags["bag"], batch_bags["bag_labels"], num_classes

    def vectors(self) -> torch.Tensor:
        return bag_matrix(self.bag_labels, self.num_classes)

    def spans(self) -> list[tuple[int, int, list[int]]]:
        return bags_of_batch(self.bag, self.bag_labels)


# ----------------------------------------------------------------------------- the variants

class Variant(abc.ABC):
    """What differs between DGL's variants. The defaults are the MGN recipe the full model and the
    supervised baseline share (spec dgl-sysu30k §3.2): PK bag batches, Adam, MultiStepLR."""

    name: str = ""
    #: DDP's ``find_unused_parameters``: a part of the network outside the loss
    find_unused = False

    def epochs(self, cfg) -> int:
        return cfg.epochs

    def batch_layout(self, cfg) -> tuple[int, int]:
        """(bag size, bags per batch)."""
        return cfg.ids_per_bag * cfg.images_per_id, cfg.ids_per_batch // cfg.ids_per_bag

    def train_transform(self, prof: Profile):
        """Resize, flip, random erasing filled with 0 (``DGL_ERASING_FILL``; no crop, spec §3.2)."""
        h, w = weak_input_size(prof, self.name)
        return train_transform(h, w, flip=prof.data.flip, pad=0, erasing_p=prof.data.erasing_p,
                               erasing_fill=DGL_ERASING_FILL)

    def check_fill(self, records, num_classes: int, bags_per_batch: int, cfg, name: str) -> None:
        """Stop at the start when not one batch can be drawn from the training identities."""
        check_batch_fill(records, cfg.ids_per_batch, cfg.images_per_id, f"{name} training split",
                         hint="Lower dgl.ids_per_batch or dgl.images_per_id with --set, or use more identities")

    def sampler(self, labels, cfg, seed: int):
        return PKBagSampler(labels, ids_per_batch=cfg.ids_per_batch, images_per_id=cfg.images_per_id,
                            ids_per_bag=cfg.ids_per_bag, seed=seed)

    def optimizer(self, model: torch.nn.Module, cfg):
        params = [p for p in model.parameters() if p.requires_grad]  # the frozen neck bias is left out
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)

    def gpu_shape(self, prof: Profile) -> dict:
        """What the GPU cost model counts of the variant (``DGL.gpu_plan``): its network, training
        and evaluation input, classifier heads and their width, optimiser states per parameter, and
        whether evaluation runs the heads."""
        cfg, size = prof.dgl, weak_input_size(prof, self.name)
        return {"network": "mgn", "input": size, "eval_input": size, "heads": cfg.num_heads, "dim": 256,
                "opt_states": 3 if cfg.amsgrad else 2, "eval_head": False}

    def records_epoch(self, cfg, n_train: int, classes: int) -> tuple[int, str]:
        """Images of one epoch on a records dataset, and its description: PK bags draw every identity once."""
        return classes * cfg.images_per_id, f"{classes:,} identities x {cfg.images_per_id} images"

    @abc.abstractmethod
    def loss(self, logits, embeddings, low, y, bags, cfg, assignment: str) -> tuple[dict, float | None]:
        """``({"loss", "ce", "pairwise", "triplet"}, pseudo-label accuracy or None)`` of one global
        batch; ``bags`` is its :class:`SimulatedBags` or :class:`StreamedBags`."""


class Full(Variant):
    """Per head, the MAP labels among the bag's ids, their CE, the relaxed Potts pairwise energy,
    plus the weakly supervised triplet (spec §2.4)."""

    name = "full"

    def loss(self, logits, embeddings, low, y, bags, cfg, assignment):
        res = full_dgl_loss(logits, embeddings, low, bags.vectors(), cfg)
        return res, float(torch.stack([(p == y).float().mean() for p in res["pseudo"]]).mean())


class FullySupervised(Variant):
    """The same network and batches with the true ids: MGN's own CE + batch-hard triplet."""

    name = "supervised"

    def loss(self, logits, embeddings, low, y, bags, cfg, assignment):
        return supervised_loss(logits, embeddings, y, cfg), None


class UnaryOnly(Variant):
    """ft_net on bags of 1, 3 or 5 adjacent classes, CE against the balanced assignment inside each
    bag (spec §3.3); SGD with its own head and backbone rates, StepLR."""

    name = "unary_only"
    find_unused = True  # ft_net's BN neck is outside the loss

    def epochs(self, cfg) -> int:
        return cfg.uo_epochs

    def batch_layout(self, cfg) -> tuple[int, int]:
        return cfg.uo_batch_size // cfg.uo_bags_per_batch, cfg.uo_bags_per_batch

    def train_transform(self, prof: Profile):
        """Colour jitter when asked, resize by 224/192, random crop, flip, erasing (spec §3.3)."""
        h, w = weak_input_size(prof, self.name)
        steps = []
        jitter = float(getattr(prof.dgl, "uo_color_jitter", 0.0) or 0.0)
        if jitter:
            steps.append(T.ColorJitter(jitter, jitter, jitter, 0))
        steps += [T.Resize((round(h * UO_RESIZE), round(w * UO_RESIZE)), interpolation=T.InterpolationMode.BICUBIC),
                  T.RandomCrop((h, w))]
        if prof.data.flip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if prof.data.erasing_p > 0:
            steps.append(RandomErasing(p=prof.data.erasing_p, fill=DGL_ERASING_FILL))
        return T.Compose(steps)

    def check_fill(self, records, num_classes, bags_per_batch, cfg, name):
        if num_classes < bags_per_batch:  # a batch of bags: each bag holds its own identities
            raise ValueError(f"{name}: {num_classes} training identities cannot fill a batch of {bags_per_batch} "
                             "bags (dgl.uo_bags_per_batch); lower it with --set, or use more identities")

    def sampler(self, labels, cfg, seed):
        return ConsecutiveBagSampler(labels, batch_size=cfg.uo_batch_size, bags_per_batch=cfg.uo_bags_per_batch,
                                     seed=seed)

    def optimizer(self, model, cfg):
        head = [p for p in model.classifier.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        opt = torch.optim.SGD([{"params": body, "lr": cfg.uo_lr_backbone, "name": "body"},
                               {"params": head, "lr": cfg.uo_lr_head, "name": "classifier"}],
                              lr=cfg.uo_lr_backbone, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.uo_step, gamma=cfg.gamma)

    def gpu_shape(self, prof):
        return {"network": "reidnet:resnet50:ls2", "input": weak_input_size(prof, self.name),
                "eval_input": (256, 128),  # the official SYSU-30k test size
                "heads": 1, "dim": 2048, "opt_states": 1, "eval_head": True}

    def records_epoch(self, cfg, n_train, classes):
        return n_train, f"one pass over the {n_train:,} training images"

    def loss(self, logits, embeddings, low, y, bags, cfg, assignment):
        targets = balanced_targets(logits[0], bags.spans(), assignment)
        ce = F.cross_entropy(logits[0], targets)
        return {"loss": ce, "ce": float(ce.detach()), "pairwise": None, "triplet": None}, \
            float((targets == y).float().mean())


#: every variant by the name ``dgl.variant`` and ``--variant`` give it
VARIANTS: dict[str, type[Variant]] = {cls.name: cls for cls in (Full, UnaryOnly, FullySupervised)}
if set(VARIANTS) != set(DGL_VARIANTS):  # pragma: no cover - a wiring error, found on import
    raise RuntimeError(f"reidkit.dgl.variants {sorted(VARIANTS)} and config.DGL_VARIANTS {sorted(DGL_VARIANTS)} differ")


def variant_for(name: str) -> Variant:
    """The variant called ``name`` (``ValueError`` naming the known ones)."""
    check_variant(name)
    return VARIANTS[name]()
