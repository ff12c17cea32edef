"""Self-contained HTML pages from the Markdown reports (figures embedded as data URIs)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import markdown

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef; }
img { max-width: 48%; margin: 0.5em; border: 1px solid #ddd; vertical-align: top; }
blockquote { color: #754; border-left: 4px solid #dca; margin: 1em 0; padding-left: 1em; }
"""


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """Render ``text`` to one HTML page; local images under ``base`` are embedded."""
    body = markdown.markdown(text, extensions=["tables"])

    def embed(match: re.Match[str]) -> str:
        src = match.group(1)
        path = base / src
        if src.startswith(("data:", "http:", "https:")) or not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+)"', embed, body)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def write_html(markdown_path: Path, title: str) -> Path:
    """Write ``<name>.html`` beside a Markdown report."""
    out = markdown_path.with_suffix(".html")
    out.write_text(markdown_to_html(markdown_path.read_text(), markdown_path.parent, title))
    return out
