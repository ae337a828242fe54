"""The run's static web copy (reidkit.course.html_copy): every picture inside the page, links between
notebooks leading to their pages, links into the kit's folder named instead of broken."""

import base64
import html
import re

import nbformat
import numpy as np
from PIL import Image

from reidkit.course.html_copy import export_html
from reidkit.course.reproduce import _copy_lesson_figures


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(path)
    return path.read_bytes()


def _notebook(path, *markdown):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(m) for m in markdown])
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def test_the_lessons_drawn_figures_travel_with_the_executed_notebooks(tmp_path):
    src = _notebook(tmp_path / "notebooks" / "04_x.ipynb", "![loop](figures/loop.png)")
    drawn = _png(tmp_path / "notebooks" / "figures" / "loop.png", 200)
    run = tmp_path / "run"
    _copy_lesson_figures([src], run / "notebooks")
    assert (run / "notebooks" / "figures" / "loop.png").read_bytes() == drawn


def test_pages_embed_every_picture_and_rewrite_links(tmp_path):
    run = tmp_path / "run"
    _notebook(run / "notebooks" / "01_a.ipynb",
              "![loop](figures/loop.png) see [the next](02_b.ipynb#top) and [cameras](../docs/cameras.md)")
    _notebook(run / "notebooks" / "02_b.ipynb", "# B")
    drawn = _png(run / "notebooks" / "figures" / "loop.png", 200)
    measured = _png(run / "01_a" / "figures" / "camera_map.png", 50)
    (run / "report.md").write_text("# report\n\n![camera_map](01_a/figures/camera_map.png)\n\n"
                                   "[html/index.html](html/index.html)\n")
    index = export_html(run)
    page = (run / "html" / "01_a.html").read_text()
    assert base64.b64encode(drawn).decode() in page and 'src="figures/loop.png"' not in page
    assert 'href="02_b.html#top"' in page
    assert 'href="../docs/cameras.md"' not in page and "../docs/cameras.md (in the kit" in page
    text = index.read_text()
    assert base64.b64encode(measured).decode() in text
    assert re.findall(r'<li><a href="([^"]+)"', text) == ["01_a.html", "02_b.html"]
    assert "index.html" not in text                       # report.md's line that points to this page


def test_formulas_are_typeset_in_the_page_and_code_keeps_its_dollars(tmp_path):
    """The pages must read offline: every formula of a markdown cell becomes MathML (drawn by the
    browser, no MathJax from the web); code spans, fenced code, escaped dollars and printed output
    keep their text; a formula the converter cannot read stays as its source; a formula in a
    heading leaves the heading's anchor plain text."""
    run = tmp_path / "run"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell(
            "## What $\\tau$ does\n\nA proxy $c_k$ and\n$$c_k = \\frac{\\bar f_k}{\\|\\bar f_k\\|}, "
            "\\qquad \\begin{cases} 1 & a \\\\[4pt] 0 & b \\end{cases}$$\n"
            "Run `echo $HOME $PATH` for \\$5, not $a^$.\n\n```\nx = \"$y$\"\n```"),
        nbformat.v4.new_code_cell("print('$z$')", outputs=[nbformat.v4.new_output("stream", text="$z$\n")]),
    ])
    (run / "notebooks").mkdir(parents=True)
    nbformat.write(nb, str(run / "notebooks" / "04_m.ipynb"))
    page = (export_html(run).parent / "04_m.html").read_text()
    maths = re.findall(r'<math alttext="([^"]*)"[^>]*display="(\w+)"', page)
    assert [(html.unescape(t), d) for t, d in maths] == [
        ("\\tau", "inline"), ("c_k", "inline"),
        ("c_k = \\frac{\\bar f_k}{\\|\\bar f_k\\|}, \\qquad \\begin{cases} 1 & a \\\\[4pt] 0 & b \\end{cases}",
         "block")]
    assert "<mfrac>" in page and "4pt" not in page.split("display=\"block\"")[1].split("</math>")[0]
    assert "echo $HOME $PATH" in page and "$5" in page and "$a^$" in page   # code, escaped, unreadable
    assert '<pre><code>x = "$y$"' in page                                    # fenced code
    assert page.count("$z$") == 2                                           # the code cell and its output
    assert re.search(r'id="What-\$\\tau\$-does"', page)                      # the anchor: the source
    assert "reidkitmath" not in page
