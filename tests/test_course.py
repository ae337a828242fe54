"""The course's shape, for every notebook (reidkit/course.py): front matter, LaTeX, prose at least
that of a d2l section, no library logic in cells, short code cells, a summary and exercises whose
worked solutions exist."""

import json
import re

import pytest
from conftest import SOLUTIONS

from reidkit.course.lesson_rules import notebook_stats, prose_words
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
