"""The run as static web pages: what a laptop that cannot install PyTorch reads, and what a teacher
projects.

``export_html(RUN_DIR)`` renders every executed notebook ``RUN_DIR/notebooks/NN_name.ipynb`` to
``RUN_DIR/html/NN_name.html`` (nbconvert's JupyterLab template: prose, code, printed outputs and
figures, which nbconvert embeds in the page) and writes ``RUN_DIR/html/index.html``: report.md
rendered, its figures embedded, and a link to every page. The folder needs nothing beside it: it
can be zipped, mailed or served as it is. Links between notebooks (``03_clustering.ipynb``) point to
their pages. Formulas are typeset where the page is made: the ``$...$`` and ``$$...$$`` of the
markdown cells become MathML (latex2mathml), which browsers draw themselves, so the pages show
typeset formulas offline too (a projector in a room without wifi); a formula the converter cannot
read stays as its LaTeX source, for MathJax to set when the page is online.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

from reidkit.core.io import atomic_write_bytes, nbformat_read
from reidkit.course.formulas import MATH, outside_code

#: links to a notebook of the course, in a rendered page: ``href="03_clustering.ipynb#anchor"``
_NB_LINK = re.compile(r'href="(?:\.\./|\./)?(?:notebooks/)?(\d\d_[\w-]+)\.ipynb(#[^"]*)?"')

_IMG = re.compile(r'<img([^>]*?)src="([^":#]+)"')


#: a relative link (no scheme, no anchor alone): ``href="../docs/cameras.md"``
_REL_LINK = re.compile(r'href="(?![a-zA-Z][\w+.-]*:|#)([^"]+)"')


def _page_links(text: str, stems: set[str]) -> str:
    """Links to a course notebook become links to its page (when the run rendered it); any other
    relative link (a file of the kit's folder, which the copy does not carry) keeps its text and
    names the file in a tooltip instead of leading nowhere."""
    text = _NB_LINK.sub(lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"' if m.group(1) in stems
                        else m.group(0), text)
    pages = {f"{s}.html" for s in stems}
    return _REL_LINK.sub(lambda m: m.group(0) if m.group(1).split("#")[0] in pages
                         else f'title="{m.group(1)} (in the kit\'s folder)"', text)


def _embed_images(text: str, base: Path) -> str:
    """``<img src="rel/path.png">`` with the file embedded as a data URI (relative to ``base``)."""

    def embed(m: re.Match) -> str:
        path = base / html.unescape(m.group(2))
        if not path.is_file():
            return m.group(0)
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img{m.group(1)}src="data:{mime};base64,{data}"'

    return _IMG.sub(embed, text)


def _mathml(tex: str, display: bool) -> str | None:
    """``tex`` as a MathML element (its source kept in ``alttext``), or None where latex2mathml
    cannot read it."""
    from latex2mathml.converter import convert  # imported with the notebook stack, as nbconvert

    # a row break's extra space (``\\[4pt]``), which the converter would print: the break alone
    body = re.sub(r"\\\\\[[^\]]*\]", lambda m: "\\\\", tex.strip())
    try:
        out = convert(body, display="block" if display else "inline")
    except Exception:  # the converter raises its own errors, and others on unexpected input
        return None
    return out.replace("<math ", f'<math alttext="{html.escape(tex.strip())}" ', 1)


def typeset_markdown(nb) -> dict[str, tuple[str, str]]:
    """Swap every formula of ``nb``'s markdown cells for a plain-letter token, which the markdown
    renderer leaves alone; returns ``{token: (source, MathML)}`` for :func:`_put_math`. Code spans
    and fenced blocks keep their dollars; a formula the converter cannot read stays."""
    found: dict[str, tuple[str, str]] = {}

    def swap(m: re.Match) -> str:
        ml = _mathml(m.group(1) if m.group(1) is not None else m.group(2), m.group(1) is not None)
        if ml is None:
            return m.group(0)
        token = f"reidkitmath{len(found)}x"
        found[token] = (m.group(0), ml)
        return token

    for cell in nb.cells:
        if cell.cell_type == "markdown" and "$" in cell.source:
            cell.source = outside_code(cell.source, lambda text: MATH.sub(swap, text))
    return found


def _put_math(body: str, found: dict[str, tuple[str, str]]) -> str:
    """The tokens of :func:`typeset_markdown` back: MathML in the page's text, the formula's source
    inside a tag (a heading's anchor, a link's title)."""
    if not found:
        return body
    token = re.compile(r"reidkitmath\d+x")

    def put(part: str, inside_tag: bool) -> str:
        def one(m: re.Match) -> str:
            if m.group(0) not in found:
                return m.group(0)
            src, ml = found[m.group(0)]
            return html.escape(src) if inside_tag else ml
        return token.sub(one, part)

    parts = re.split(r"(<[^>]*>)", body)
    return "".join(put(part, k % 2 == 1) for k, part in enumerate(parts))


_MATH_STYLE = ("<style>math{font-family:math,'STIX Two Math','Cambria Math','Latin Modern Math',serif;"
               "font-size:1.15em}math[display=block]{margin:.5em 0}</style>\n")


def render_notebook(executed: Path, stems: set[str]) -> str:
    """One executed notebook as a standalone HTML page (figures embedded by nbconvert)."""
    # a measured start-up cost, as core.io.nbformat_read's: nbconvert is imported when a run writes its pages
    from nbconvert import HTMLExporter

    nb = nbformat_read(executed)
    found = typeset_markdown(nb)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    body = _put_math(body, found)
    if found:  # the body text's size (browsers set MathML a size smaller), room around displays
        body = body.replace("</head>", _MATH_STYLE + "</head>", 1)
    return _page_links(_embed_images(body, executed.parent), stems)  # the lessons' drawn figures too


def _index(run_dir: Path, pages: list[str]) -> str:
    report = run_dir / "report.md"
    text = report.read_text() if report.is_file() else f"# {run_dir.name}\n\nNo report.md in this run folder.\n"
    text = "\n".join(line for line in text.splitlines() if "(html/index.html)" not in line)  # this page
    # nbconvert's Markdown renderer, imported with it: the notebook stack is not needed to train or
    # evaluate (a GPU image without it runs every other command)
    import mistune

    body = mistune.html(text).replace('href="html/', 'href="')
    body = _embed_images(body, run_dir)
    items = "\n".join(f'<li><a href="{p}.html">{html.escape(p)}</a></li>' for p in pages)
    title = html.escape(f"reidkit run {run_dir.name}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
            "img{max-width:100%}</style></head><body>\n"
            f"<nav><h2>The executed notebooks</h2><ol id=\"pages\">\n{items}\n</ol></nav>\n<hr>\n{body}\n"
            "</body></html>\n")


def export_html(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/html/``: a page per executed notebook and ``index.html``; returns the index."""
    run_dir = Path(run_dir)
    executed = sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    stems = {p.stem for p in executed}
    out = run_dir / "html"
    for nb in executed:
        atomic_write_bytes(out / f"{nb.stem}.html", render_notebook(nb, stems).encode())
    index = out / "index.html"
    atomic_write_bytes(index, _index(run_dir, [p.stem for p in executed]).encode())
    return index
