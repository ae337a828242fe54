"""The backbone architectures the kit builds, and the names each one answers to."""

from reidkit.config import ARCHS

__all__ = ["ARCHS", "canonical_arch"]


_ALIASES = {
    "resnet50": "resnet50", "resnet-50": "resnet50",
    "resnet_ibn50a": "resnet_ibn50a", "resnet50_ibn_a": "resnet_ibn50a", "resnet_ibn_a": "resnet_ibn50a",
    "ibn50a": "resnet_ibn50a",
    "mobilenetv2": "mobilenetv2", "mobilenet_v2": "mobilenetv2", "mobilenet-v2": "mobilenetv2",
}


def canonical_arch(arch: str) -> str:
    key = str(arch).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return _ALIASES[key]
