"""The host CPU as benchmarks and run records state it (reidkit.core.device.cpu_description)."""

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
