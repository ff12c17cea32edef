"""Self-contained HTML pages: one stylesheet, every piece of text escaped, figures embedded.

Pages are built from data (a :class:`~leukotree.report.tables.Document`, or the
patient report's parts) with :func:`esc` applied to every string, so no class name,
patient id or path can become markup or script.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from leukotree.report.tables import Document, Figure, Heading, Note, Paragraph, Table
from leukotree.rundir import write_text

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef; }
figure { display: inline-block; margin: 0.5em; max-width: 48%; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #666; font-size: 0.85em; }
blockquote { color: #754; border-left: 4px solid #dca; margin: 1em 0; padding-left: 1em; }
.diag { font-size: 1.6em; padding: 0.6em 1em; border-radius: 8px; background: #eef6ee; }
.refer { background: #fff3e0; border: 2px solid #f0a040; }
.err { color: #a00; font-weight: bold; }
.bar { display: inline-block; height: 0.8em; background: #4a7; vertical-align: middle; }
.cells { display: flex; flex-wrap: wrap; gap: 12px; }
.cell { text-align: center; font-size: 0.85em; }
.cell img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #bbb; }
pre { background: #f6f6f6; padding: 0.8em; }
"""


def esc(text: object) -> str:
    """``text`` as HTML text or attribute value (``& < > " '`` escaped)."""
    return html.escape(str(text), quote=True)


def png_data_uri(pixels: np.ndarray) -> str:
    """An RGB uint8 image as a ``data:image/png`` URI."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def page(title: str, body: str) -> str:
    """A whole HTML page around ``body`` (already-escaped HTML) with the one stylesheet."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def document_to_html(doc: Document, base: Path) -> str:
    """``doc`` as one page; figures under ``base`` are embedded, links stay relative."""
    parts = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            link = f": <a href='{esc(b.link)}'>report</a>" if b.link else ""
            parts.append(f"<h{b.level}>{esc(b.text)}{link}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Note):
            parts.append(f"<blockquote>{esc(b.text)}</blockquote>")
        elif isinstance(b, Table):
            parts.append(table_html(b.header, b.rows))
        elif isinstance(b, Figure) and (base / b.src).is_file():
            parts.append(f"<figure><img src='{file_data_uri(base / b.src)}' "
                         f"alt='{esc(b.caption)}'><figcaption>{esc(b.caption)}"
                         "</figcaption></figure>")
    return page(doc.title, "\n".join(parts))


def write_document(doc: Document, markdown_path: Path) -> Path:
    """Write ``doc`` as Markdown at ``markdown_path`` and as HTML beside it; returns the
    HTML path."""
    write_text(markdown_path, doc.to_markdown())
    out = markdown_path.with_suffix(".html")
    write_text(out, document_to_html(doc, markdown_path.parent))
    return out
