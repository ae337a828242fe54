"""The course's own rules, measured: what every notebook must contain to teach.

``python -m reidkit.course [NOTEBOOK ...]`` prints, per notebook, the prose word count, the
formulas, the longest code cell, the functions defined outside exercises, and every rule it
breaks; ``tests/course/test_course.py`` asserts the rules for every notebook.

The lesson shape (``../shared/spec/course.md``, DESIGN.md "A notebook as a lesson"):
- the first cell is front matter: learning goals, prerequisites, time, what it reads and writes;
- the maths in LaTeX (``$...$`` inline, ``$$...$$`` display);
- no ``def`` or ``class`` in code cells except those tagged ``exercise``;
- no code cell longer than :data:`MAX_CODE_LINES` non-blank lines;
- a ``## Summary`` cell with 5-8 points, then ``## Exercises`` with 3-6 ``### Exercise`` items;
- a lesson body of :data:`MIN_WORDS` to :data:`MAX_WORDS` words of prose; logistics and numerical
  fine print go to one final ``## For the teacher`` cell, counted apart (at most
  :data:`MAX_APPENDIX_WORDS`);
- no run-dependent figure typed into markdown (:func:`typed_figures`): a number a run produces is
  printed by a cell, and a paper's figure carries its citation, ``[Hu et al. 2021]``, on its line.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reidkit.course.formulas import CODE, MATH, formulas, outside_code
from reidkit.course.reproduce import list_notebooks

MIN_WORDS = 1200


#: the lesson body's ceiling: about 2,000 words is about ten minutes of reading at 200 words a minute
MAX_WORDS = 2000


#: the ``## For the teacher`` appendix, counted apart from the lesson
MAX_APPENDIX_WORDS = 400


APPENDIX = "For the teacher"


#: a decimal number or a percentage in prose: the shapes a run's figures take (mAP, loss, seconds, rates)
_FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?:\s?%)?|(?<![\w.])\d+\s?%")


#: a citation with a year on the same line makes a figure a paper's: ``[Hu et al. 2021]``, ``[Wang 2019a]``
_CITATION = re.compile(r"\[[A-Z][^\]\n]*\b(?:19|20)\d\d[a-z]?\]")


MAX_CODE_LINES = 15


FRONT_MATTER = ("goals", "prerequisites", "time", "reads", "writes")


EXERCISE_TAG = "exercise"


_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


_HTML = re.compile(r"<[^>]+>")


_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d[\d,.]*")


@dataclass
class NotebookStats:
    name: str
    words: int = 0                  # the lesson body (everything but the teacher appendix)
    appendix_words: int = 0         # the final ``## For the teacher`` cell
    typed_figures: list = field(default_factory=list)   # "cell K: 34.7" run figures typed into markdown
    code_lines: int = 0
    display_formulas: int = 0
    inline_formulas: int = 0
    longest_code_cell: int = 0
    definitions: list = field(default_factory=list)      # "cell K: def name" outside exercises
    summary_points: int = 0
    exercises: int = 0
    front_matter_missing: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def words_per_code_line(self) -> float:
        return round(self.words / max(1, self.code_lines), 2)


def prose_words(markdown: str) -> int:
    """Words of prose: markdown without code, formulas, link targets or HTML tags."""
    return len(_WORD.findall(_strip_markup(markdown)))


def _strip_markup(markdown: str) -> str:
    text = CODE.sub(" ", outside_code(markdown, lambda stretch: MATH.sub(" ", stretch)))
    text = _LINK.sub(r"\1", text)
    return _HTML.sub(" ", text)


def typed_figures(markdown: str) -> list[str]:
    """The decimal numbers and percentages typed into ``markdown``'s prose (formulas, code spans
    and fenced code excluded) on lines that cite no paper. A run's figures are printed by the
    cells, so that a student whose run differs is not contradicted by the page; hyper-parameters
    go in code or maths (``eps=0.6``, ``$\\tau=0.05$``); a paper's figure cites it on its line."""
    found = []
    for line in _strip_markup(markdown).splitlines():
        if not _CITATION.search(line):
            found += [m.group(0).replace(" ", "") for m in _FIGURE.finditer(line)]
    return found


def _is_appendix(markdown: str) -> bool:
    return re.match(rf"\s*## +{APPENDIX}\b", markdown, re.I) is not None


def _code_lines(source: str) -> list[str]:
    return [ln for ln in source.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _definitions(source: str) -> list[str]:
    clean = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.splitlines())
    try:
        tree = ast.parse(clean)
    except SyntaxError:
        return ["(does not parse)"]
    return [f"{type(n).__name__.replace('Def', '').lower()} {n.name}" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _section(cells: list[dict], title: str) -> list[dict] | None:
    """The cells from the ``## <title>`` heading up to the next ``## `` heading."""
    out, inside = [], False
    for c in cells:
        src = "".join(c.get("source", ""))
        heads = re.findall(r"^## +(.+)$", src, re.M) if c["cell_type"] == "markdown" else []
        if heads:
            if inside and not any(h.strip().lower().startswith(title.lower()) for h in heads):
                break
            if any(h.strip().lower().startswith(title.lower()) for h in heads):
                inside = True
                src_after = src[src.lower().index("## " + title.lower()):]
                out.append({**c, "source": src_after})
                continue
        if inside:
            out.append(c)
    return out if inside else None


def solution_hint(stem: str, k: int) -> str:
    """How a student loads exercise ``k``'s worked solution, in a new cell (docs/workshop.md)."""
    return f"`%run solutions/{stem}.py`, then `exercise_{k}(ctx)`"


def _solution_hints(exercises_md: str, stem: str, n: int) -> list[str]:
    """Every ``### Exercise`` item ends with :func:`solution_hint` for its own number."""
    items = re.split(r"^### +Exercise\b", exercises_md, flags=re.M)[1:]
    return [f"exercise {k} does not end with the hint {solution_hint(stem, k)}"
            for k, item in enumerate(items, 1) if solution_hint(stem, k) not in item]


def notebook_stats(path: str | Path) -> NotebookStats:
    path = Path(path)
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    st = NotebookStats(path.stem)
    for k, c in enumerate(cells):
        src = "".join(c.get("source", ""))
        tags = c.get("metadata", {}).get("tags", [])
        if c["cell_type"] == "markdown":
            st.typed_figures += [f"cell {k}: {f}" for f in typed_figures(src)]
            if k == len(cells) - 1 and _is_appendix(src):
                st.appendix_words = prose_words(src)
                continue
            st.words += prose_words(src)
            maths = formulas(src)
            st.display_formulas += sum(1 for m in maths if m.group(1) is not None)
            st.inline_formulas += sum(1 for m in maths if m.group(1) is None)
        elif c["cell_type"] == "code":
            lines = _code_lines(src)
            st.code_lines += len(lines)
            if EXERCISE_TAG in tags:
                continue
            st.longest_code_cell = max(st.longest_code_cell, len(lines))
            if len(lines) > MAX_CODE_LINES:
                st.problems.append(f"cell {k}: {len(lines)} code lines (> {MAX_CODE_LINES})")
            st.definitions += [f"cell {k}: {d}" for d in _definitions(src)]
    first = "".join(cells[0].get("source", "")).lower() if cells and cells[0]["cell_type"] == "markdown" else ""
    st.front_matter_missing = [w for w in FRONT_MATTER if w not in first]
    summary = _section(cells, "Summary")
    if summary:
        text = "\n".join("".join(c.get("source", "")) for c in summary if c["cell_type"] == "markdown")
        st.summary_points = len(re.findall(r"^\s*(?:[-*]|\d+\.)\s+\S", text, re.M))
    exercises = _section(cells, "Exercises")
    if exercises:
        text = "\n".join("".join(c.get("source", "")) for c in exercises if c["cell_type"] == "markdown")
        st.exercises = len(re.findall(r"^### +Exercise\b", text, re.M))
        st.problems += _solution_hints(text, path.stem, st.exercises)
    if st.front_matter_missing:
        st.problems.append(f"front matter lacks: {', '.join(st.front_matter_missing)}")
    if st.words < MIN_WORDS:
        st.problems.append(f"{st.words} words of prose (< {MIN_WORDS})")
    if st.words > MAX_WORDS:
        st.problems.append(f"{st.words} words of prose in the lesson (> {MAX_WORDS}): fine print goes to a "
                           f"final '## {APPENDIX}' cell")
    if st.appendix_words > MAX_APPENDIX_WORDS:
        st.problems.append(f"'## {APPENDIX}' has {st.appendix_words} words (> {MAX_APPENDIX_WORDS})")
    if st.typed_figures:
        st.problems.append("run figures typed into markdown (print them from a cell, or cite the paper on "
                           "the line): " + "; ".join(st.typed_figures))
    if st.definitions:
        st.problems.append("definitions outside exercises: " + "; ".join(st.definitions))
    if not 5 <= st.summary_points <= 8:
        st.problems.append(f"summary has {st.summary_points} points (want 5-8 under '## Summary')")
    if not 3 <= st.exercises <= 6:
        st.problems.append(f"{st.exercises} exercises (want 3-6 '### Exercise' under '## Exercises')")
    if st.display_formulas + st.inline_formulas == 0:
        st.problems.append("no LaTeX formula")
    return st


def main(argv: list[str] | None = None) -> int:

    paths = [Path(a) for a in (argv or [])] or list_notebooks()
    report = []
    for p in paths:
        st = notebook_stats(p)
        report.append({**asdict(st), "words_per_code_line": st.words_per_code_line})
    print(json.dumps(report, indent=2))
    return 1 if any(r["problems"] for r in report) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
