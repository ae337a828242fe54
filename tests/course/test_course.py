"""The course's shape, for every notebook (reidkit/course.py): front matter, LaTeX, prose at least
that of a d2l section, no library logic in cells, short code cells, a summary and exercises whose
worked solutions exist."""

import json
import os
import re
from pathlib import Path

import pytest
from conftest import SOLUTIONS

from reidkit.course.lesson_rules import MAX_WORDS, notebook_stats, prose_words, solution_hint, typed_figures
from reidkit.course.reproduce import list_notebooks

NOTEBOOKS = list_notebooks()


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_lesson_shape(nb):
    st = notebook_stats(nb)
    assert not st.problems, f"{nb.name}: " + " | ".join(st.problems)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_worked_solution(nb):
    sol = SOLUTIONS / f"{nb.stem}.py"
    assert sol.is_file(), f"no solutions file {sol}"
    text = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    n = len(re.findall(r"^### +Exercise\b", text, re.M))
    funcs = set(re.findall(r"^def (exercise_\d+)\(", sol.read_text(), re.M))
    assert funcs == {f"exercise_{k}" for k in range(1, n + 1)}, (nb.stem, sorted(funcs), n)


def test_prose_words_ignore_code_and_formulas():
    assert prose_words("One two `three four` $x^2 + y$ and $$\\sum_i x_i$$ five.") == 4
    assert prose_words("```python\nx = 1\n```\n[a link](http://x.org) ![](fig.png)") == 2


def test_typed_figures_are_found_outside_maths_code_and_cited_lines():
    md = ("HHCL reaches 34.7 mAP here and 12 % of ids join.\n"
          "The paper reports 84.2 mAP [Hu et al. 2021].\n"
          "With `eps=0.6` and $\\tau = 0.05$ the run has 32 people.\n"
          "```\nprint(0.5)\n```\n")
    assert typed_figures(md) == ["34.7", "12%"]
    assert typed_figures("A ratio of 3.0x and 50% more") == ["3.0", "50%"]
    assert typed_figures("version v1.2 and 2021 and 16 ids") == []


def test_the_teacher_appendix_is_counted_apart(tmp_path):
    body = "word " * (MAX_WORDS + 10)
    sources = ["# T\ngoals prerequisites time reads writes", body, "## For the teacher\n" + "note " * 50]
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": src} for src in sources],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "09_x.ipynb"
    path.write_text(json.dumps(nb))
    st = notebook_stats(path)
    assert st.appendix_words == 53 and st.words == MAX_WORDS + 10 + 6
    assert any("words of prose in the lesson" in p for p in st.problems)
    nb["cells"][1]["source"] = "word " * 1500
    path.write_text(json.dumps(nb))
    st = notebook_stats(path)
    assert st.words == 1506 and not any("words" in p for p in st.problems)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_guides_solution_step_works_as_written(nb):
    """docs/workshop.md and every exercise say: in a new cell, ``%run solutions/<notebook>.py``, then
    ``exercise_K(ctx)``. Run that magic in a real IPython shell, from the notebooks folder as
    JupyterLab's kernel would: it must define every exercise function and do no work of its own."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    cwd = os.getcwd()
    try:
        os.chdir(nb.parent)
        before = set(shell.user_ns)
        result = shell.run_cell(f"%run solutions/{nb.stem}.py")
    finally:
        os.chdir(cwd)
    assert result.success, result.error_in_exec
    text = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    n = len(re.findall(r"^### +Exercise\b", text, re.M))
    for k in range(1, n + 1):
        assert callable(shell.user_ns.get(f"exercise_{k}")), (nb.stem, k)
        assert solution_hint(nb.stem, k) in text
    for name in set(shell.user_ns) - before:
        shell.user_ns.pop(name, None)


def test_the_guide_gives_the_same_solution_step():
    guide = (Path(__file__).resolve().parents[2] / "docs" / "workshop.md").read_text()
    assert "%run solutions/03_clustering.py" in guide and "exercise_3(ctx)" in guide
    assert "%load" not in guide
