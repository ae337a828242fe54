"""The host CPU as benchmarks and run records state it (reidkit.core.device.cpu_description), and
the allocator setting of the kit's CPU loops (tune_cpu_allocator)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from reidkit.core.device import cpu_description, cpu_name

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU E5-2690 v4\nflags\t\t: fpu sse2 avx2\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"


def test_the_bf16_unit_is_read_from_the_flags():
    assert cpu_description(XEON)["bf16"] == "AMX"            # AMX wins over the AVX512-BF16 it also has
    assert cpu_description(EPYC)["bf16"] == "AVX512-BF16"
    assert cpu_description(OLD_XEON)["bf16"] is None
    assert cpu_description(XEON)["model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert cpu_description(EPYC)["model"] == "AMD EPYC"


def test_without_a_model_name_it_still_names_something():
    d = cpu_description(ARM)
    assert d["model"] and d["bf16"] is None and d["cores"] >= 1
    assert cpu_description("")["model"]


def test_the_one_line_form():
    assert cpu_name(EPYC).startswith("AMD EPYC, ") and cpu_name(EPYC).endswith("cores, bf16 on AVX512-BF16")
    assert cpu_name(OLD_XEON).endswith("no native bf16")


def test_this_host_is_described():
    d = cpu_description()
    assert isinstance(d["model"], str) and d["model"] and d["cores"] >= 1
    assert d["bf16"] in (None, "AMX", "AVX512-BF16")


# ------------------------------------------------------------------ the CPU allocator setting
ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _child(code: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_allocator_setting_applies_once_and_can_be_turned_off():
    code = ("import json; from reidkit.core.device import tune_cpu_allocator as t; a = t(); b = t(); "
            "print(json.dumps({'a': a, 'same': a is b}))")
    on = _child(code)
    assert on == {"a": {"tuned": True, "why": "mallopt"}, "same": True}
    off = _child(code, REIDKIT_MALLOC_TUNING="0")
    assert off["a"] == {"tuned": False, "why": "REIDKIT_MALLOC_TUNING=0"}


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_cpu_extraction_applies_it_and_gives_the_same_features():
    # the setting changes where memory comes from, never a value: the features with and without it
    # are equal bit for bit
    code = ("import json, torch; from torch import nn; from reidkit.core import device as d; "
            "from reidkit.nets.features import extract_features; torch.manual_seed(0); "
            "m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()); "
            "x = torch.randn(10, 3, 32, 16); before = dict(d._ALLOCATOR); "
            "f = extract_features(m, [{'img': x[i]} for i in range(10)], device='cpu', batch_size=4, amp=False); "
            "print(json.dumps({'before': before, 'after': d._ALLOCATOR, 'f': f.tolist()}))")
    on, off = _child(code), _child(code, REIDKIT_MALLOC_TUNING="0")
    assert on["before"] == {} and on["after"]["tuned"] is True
    assert off["after"]["tuned"] is False
    assert on["f"] == off["f"]
