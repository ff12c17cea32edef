"""Report tables: one number formatter, Markdown and escaped HTML from one document."""

import math

import pytest

from conftest import html_tags
from leukotree.report.html import document_to_html, write_document
from leukotree.report.tables import Document, cv_document, fmt, metrics_document

EVIL = "<img src=x onerror=alert(1)>"


@pytest.mark.parametrize("value,percent,text", [
    (None, False, "-"), (math.nan, True, "-"), (0.123456, False, "0.1235"),
    (0.123456, True, "12.35"), (7, False, "7"), (True, False, "True"), ("ALL", False, "ALL"),
])
def test_fmt(value, percent, text):
    assert fmt(value, percent=percent) == text


def test_user_text_never_becomes_markup(tmp_path):
    metrics = {
        "model": f"runs/{EVIL}", "data": "<script>alert(2)</script>", "n_images": 3,
        "accuracy": 0.5, "note": EVIL,
        "per_node": {EVIL: {"children": [EVIL, "b"], "n": 3, "accuracy": 0.5}},
        "per_class": {EVIL: {"precision": 1.0, "recall": 0.5, "f1": 0.66, "support": 2}},
        "patient_level": {"skipped": f"patient {EVIL} has two labels"},
    }
    doc = metrics_document(metrics)
    html_path = write_document(doc, tmp_path / "metrics.md")
    page = html_path.read_text()
    tags = html_tags(page)
    assert "script" not in {t for t, _ in tags} and "img" not in {t for t, _ in tags}
    assert not any(k.startswith("on") for _, attrs in tags for k in attrs)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert EVIL in (tmp_path / "metrics.md").read_text()  # Markdown keeps the text as it is


def test_markdown_tables_escape_pipes_and_keep_figures(tmp_path):
    doc = Document("t")
    doc.table(["class", "n"], [["a|b", "1"]])
    doc.figure("roc.png", "roc")
    text = doc.to_markdown()
    assert "| a\\|b | 1 |" in text and "![roc](roc.png)" in text
    (tmp_path / "roc.png").write_bytes(b"\x89PNG fake")
    page = document_to_html(doc, tmp_path)
    assert "data:image/png;base64," in page and "<td>a|b</td>" in page


def test_cv_table_has_a_row_per_fold_and_the_mean():
    summary = {"model": "multihead/resnet18",
               "folds": [{"accuracy": 0.9, "macro_f1": 0.8}, {"accuracy": 0.7}],
               "mean": {"accuracy": {"mean": 0.8, "std": 0.1414}, "hF": {"mean": 0.9, "std": 0}}}
    text = cv_document([summary]).to_markdown()
    assert "| 1 | 90.00 | 80.00 | - |" in text
    assert "| 2 | 70.00 | - | - |" in text
    assert "| mean ± std | 80.00 ± 14.14 | - ± - | - ± - |" in text
    assert "| hF | 90.00 ± 0.00 |" in text
