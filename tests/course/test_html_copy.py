"""The run's static web copy (reidkit.course.html_copy): every picture inside the page, links between
notebooks leading to their pages, links into the kit's folder named instead of broken."""

import base64
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
