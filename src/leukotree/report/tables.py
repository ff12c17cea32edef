"""Every table leukotree reports, built once as a :class:`Document` and written as Markdown
(:meth:`Document.to_markdown`) or HTML (:func:`leukotree.report.html.document_to_html`).

Numbers go through one formatter, :func:`fmt`. Text from users (class names, patient
ids, paths) is kept as data in the document and escaped by each writer, never pasted
into markup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from leukotree.taxonomy import Taxonomy


def fmt(value: object, *, percent: bool = False) -> str:
    """``-`` for missing or NaN; floats with 4 decimals, or as a percentage with 2."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if percent:
        return f"{100 * value:.2f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def fmt_mean_std(entry: dict[str, float] | None) -> str:
    """``mean ± std`` of a ``{"mean", "std"}`` entry, in percent."""
    if entry is None:
        return "-"
    return f"{fmt(entry['mean'], percent=True)} ± {fmt(entry['std'], percent=True)}"


@dataclass
class Heading:
    text: str
    level: int = 2
    link: str | None = None  # a relative file the heading links to


@dataclass
class Paragraph:
    text: str


@dataclass
class Note:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    src: str  # a file relative to the document's folder
    caption: str


Block = Heading | Paragraph | Note | Table | Figure


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Document:
    """A report as a list of blocks."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2, link: str | None = None) -> None:
        self.blocks.append(Heading(text, level, link))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Paragraph(text))

    def note(self, text: str) -> None:
        self.blocks.append(Note(text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Table(header, rows))

    def figure(self, src: str, caption: str) -> None:
        self.blocks.append(Figure(src, caption))

    def extend(self, other: Document) -> None:
        self.blocks.extend(other.blocks)

    def to_markdown(self) -> str:
        lines: list[str] = []
        for b in self.blocks:
            if isinstance(b, Heading):
                text = f"{b.text}: [report]({b.link})" if b.link else b.text
                lines += ["#" * b.level + " " + text, ""]
            elif isinstance(b, Paragraph):
                lines += [b.text, ""]
            elif isinstance(b, Note):
                lines += [f"> {b.text}", ""]
            elif isinstance(b, Table):
                lines.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
                lines.append("|" + "---|" * len(b.header))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
                lines.append("")
            else:
                lines += [f"![{b.caption}]({b.src})", ""]
        return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------- evaluate
_SUMMARY_KEYS = ("n_images", "accuracy", "macro_f1", "weighted_f1", "auroc_macro",
                 "tree_accuracy")
_BINARY_KEYS = ("tp", "tn", "fp", "fn", "accuracy", "prevalence", "sensitivity",
                "specificity", "ppv", "npv", "auc", "f1")


def metrics_document(m: dict[str, Any]) -> Document:
    """The tables of one ``metrics.json`` (``leukotree evaluate``)."""
    doc = Document(f"Evaluation of {m.get('model', '')}")
    doc.heading(doc.title, 1)
    doc.paragraph(f"Data: {m.get('data', '')}")
    if m.get("note"):
        doc.note(m["note"])
    rows = [[key, fmt(m.get(key))] for key in _SUMMARY_KEYS]
    rows += [[key, fmt(value)] for key, value in m.get("hierarchical", {}).items()]
    doc.table(["metric", "value"], rows)
    doc.heading("Per node (choosing among the children)")
    doc.table(["node", "children", "n", "accuracy"],
              [[node, " / ".join(row["children"]), fmt(row["n"]), fmt(row["accuracy"])]
               for node, row in m.get("per_node", {}).items()])
    if "per_class" in m:
        doc.heading("Per class")
        doc.table(["class", "precision", "recall", "F1", "support"],
                  [[name, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]),
                    fmt(r["support"])] for name, r in m["per_class"].items()])
    if "binary" in m:
        b = m["binary"]
        doc.heading(f"Binary (positive: {b['positive']}, threshold {b['threshold']:.4f}, "
                    f"{b['threshold_source']})")
        doc.table(["metric", "value"], [[key, fmt(b[key])] for key in _BINARY_KEYS])
    cal = m.get("calibration", {})
    if cal.get("uncalibrated") and cal.get("leaves"):
        doc.heading("Calibration (temperature per tree node, fitted on the validation split)")
        doc.table(["", "leaf ECE", "Brier"],
                  [["before", fmt(cal["uncalibrated"]["ece"]), fmt(cal["uncalibrated"]["brier"])],
                   ["after", fmt(cal["leaves"]["ece"]), fmt(cal["leaves"]["brier"])]])
        power = cal.get("distance_power")
        doc.paragraph("Temperatures: " + ", ".join(
            f"{node} {fmt(t)}" for node, t in cal["temperatures"].items()) + "." + (
            f" Each cell's leaf probabilities are then softened by a temperature of (its "
            f"out-of-distribution score / the validation median) ^ {fmt(power)}: cells "
            "unlike the training cells are read less confidently, those nearer than the "
            "median slightly more; none changes its leaf."
            if power else ""))
    ood = m.get("ood")
    if ood:
        doc.heading("Unclassifiable cells (unlike the training cells)")
        doc.table(["flagged", "rate", "expected rate", "accuracy of kept cells",
                   "accuracy of flagged cells"],
                  [[fmt(ood["flagged"]), fmt(ood["rate"]), fmt(ood["expected_rate"]),
                    fmt(ood["accuracy_kept"]), fmt(ood["accuracy_flagged"])]])
        if ood.get("domain_shift"):
            doc.note(ood["domain_shift"])
    if m.get("conformal"):
        _conformal(doc, m["conformal"])
    pl = m.get("patient_level")
    if pl:
        doc.heading("Patient level")
        if "skipped" in pl:
            doc.paragraph(pl["skipped"])
        else:
            doc.paragraph(
                f"{pl['n_patients']} patients, {pl['method']}, "
                f"{len(pl['insufficient'])} with fewer than {pl['min_cells']} cells "
                f"(insufficient); accuracy {fmt(pl.get('accuracy'))}, macro F1 "
                f"{fmt(pl.get('macro_f1'))}.")
            _patient_binary(doc, pl)
    for name, file in m.get("figures", {}).items():
        doc.figure(file, name)
    return doc


def _conformal(doc: Document, c: dict[str, Any]) -> None:
    """The conformal answers' coverage (95% CI), answer sizes and per-class coverage."""
    doc.heading(f"Conformal answers ({c['mode']}, coverage asked {fmt(c['target_coverage'])}, "
                f"fitted on {c['fitted_on']} cells)")
    if c.get("note"):
        doc.note(c["note"])
    lo, hi = c["coverage_ci95"]
    doc.table(["coverage", "95% CI", "mean depth", "mean leaves", "answers that are a leaf"],
              [[fmt(c["coverage"]), f"{fmt(lo)}-{fmt(hi)} ({c['ci_method']})",
                fmt(c["mean_depth"]), fmt(c["mean_leaves"]), fmt(c["leaf_share"])]])
    doc.table(["class", "n", "coverage"],
              [[name, fmt(r["n"]), fmt(r["coverage"])] for name, r in c["per_class"].items()])
    if c.get("curve_skipped"):
        doc.paragraph(f"No coverage-vs-alpha figure: {c['curve_skipped']}.")


def _patient_binary(doc: Document, pl: dict[str, Any]) -> None:
    """AUROC (95% CI) and the confusion of the patient diagnoses, for two leaves."""
    b = pl.get("patient_binary")
    if not b:
        return
    ci = pl.get("patient_auroc_ci95") or (math.nan, math.nan)
    threshold = pl.get("threshold")
    doc.paragraph(f"Positive: {pl.get('patient_positive')}; threshold "
                  f"{fmt(threshold if threshold is not None else b['threshold'])}"
                  + (f" ({pl['threshold_rule']}, chosen on the training patients)"
                     if pl.get("threshold_rule") else "") + ".")
    doc.table(["AUROC", "95% CI", "sensitivity", "specificity", "PPV", "NPV", "TP", "FN",
               "TN", "FP"],
              [[fmt(pl.get("patient_auroc")), f"{fmt(ci[0])}-{fmt(ci[1])}",
                fmt(b["sensitivity"]), fmt(b["specificity"]), fmt(b["ppv"]), fmt(b["npv"]),
                fmt(b["tp"]), fmt(b["fn"]), fmt(b["tn"]), fmt(b["fp"])]])
    if pl.get("miss_rate"):
        _miss_rate_table(doc, [("", pl["miss_rate"])])


def _miss_rate_table(doc: Document, blocks: list[tuple[str, dict[str, Any]]]) -> None:
    """The promised miss rate beside the observed one (positive patients called negative
    over positive patients, exact binomial 95% CI) and the share of patients referred."""
    first = blocks[0][1]
    doc.paragraph(f"Promised: at most {fmt(first['alpha'], percent=True)}% of positive "
                  f"patients called negative, with {fmt(first['confidence'], percent=True)}% "
                  "confidence; patients between the miss-rate threshold and the decision "
                  "threshold are referred.")
    doc.table(["", "positive patients", "missed", "observed miss rate", "95% CI", "referred",
               "referred share"],
              [[name, fmt(b["n_positive"]), fmt(b["missed"]), fmt(b["observed_miss_rate"]),
                f"{fmt(b['observed_miss_rate_ci95'][0])}-"
                f"{fmt(b['observed_miss_rate_ci95'][1])}", fmt(b["referred"]),
                fmt(b["referred_share"])] for name, b in blocks])


# ----------------------------------------------------------------- cross-validation
_TABLE2 = ("accuracy", "macro_f1", "auroc_macro")


def cv_document(summaries: list[dict[str, Any]]) -> Document:
    """Table 2 of the paper: accuracy, F1 and AUROC per fold and model, then mean ± std;
    then the hierarchical and per-node metrics."""
    doc = Document("Cross-validation (values in %)")
    doc.heading(doc.title, 1)
    header = ["Fold"] + [f"{s['model']} {name}" for s in summaries
                         for name in ("ACC", "F1", "AUROC")]
    rows = []
    for k in range(max(len(s["folds"]) for s in summaries)):
        cells = [str(k + 1)]
        for s in summaries:
            row = s["folds"][k] if k < len(s["folds"]) else {}
            cells += [fmt(row.get(key), percent=True) for key in _TABLE2]
        rows.append(cells)
    rows.append(["mean ± std"] + [fmt_mean_std(s["mean"].get(key, {"mean": math.nan,
                                                                    "std": math.nan}))
                                  for s in summaries for key in _TABLE2])
    doc.table(header, rows)
    doc.paragraph("Hierarchical and per-node metrics (mean ± std over folds, %):")
    keys = sorted({k for s in summaries for k in s["mean"]} - set(_TABLE2))
    doc.table(["metric"] + [s["model"] for s in summaries],
              [[key] + [fmt_mean_std(s["mean"].get(key)) for s in summaries] for key in keys])
    if any(s.get("patient_level") for s in summaries):
        _patient_cv_table(doc, summaries)
    return doc


def _patient_cv_table(doc: Document, summaries: list[dict[str, Any]]) -> None:
    """Out-of-fold patients pooled per repeat: AUROC (patient-bootstrap 95% CI),
    accuracy, sensitivity and specificity at each fold's own threshold."""
    doc.heading("Patient level (out-of-fold patients, pooled per repeat)")
    rows = []
    for s in summaries:
        for r, p in enumerate(s.get("patient_level") or []):
            ci = p.get("auroc_ci95") or (math.nan, math.nan)
            rows.append([s["model"] + (f" / {s['patient_model']}" if s.get("patient_model")
                                       and s["patient_model"] != "none" else ""),
                         str(r + 1), str(p["n_patients"]),
                         str(len(p.get("insufficient", []))), fmt(p.get("auroc")),
                         f"{fmt(ci[0])}-{fmt(ci[1])}", fmt(p.get("accuracy")),
                         fmt(p.get("sensitivity")), fmt(p.get("specificity"))])
    doc.table(["model", "repeat", "patients diagnosed", "not diagnosed", "AUROC", "95% CI",
               "accuracy", "sensitivity", "specificity"], rows)
    doc.paragraph("Not diagnosed: patients without a classifiable cell (all flagged "
                  "unclassifiable, or too few cells); the other columns are of the patients "
                  "diagnosed.")
    promised = [(f"{s['model']} repeat {r + 1}", p["miss_rate"]) for s in summaries
                for r, p in enumerate(s.get("patient_level") or []) if p.get("miss_rate")]
    if promised:
        _miss_rate_table(doc, promised)


def repeat_spread_table(doc: Document, spread: dict[str, dict[str, float]]) -> None:
    """Repeated CV: the spread of each repeat's pooled patient AUROC and accuracy."""
    doc.heading("Patient level across repeats")
    doc.table(["metric", "repeats", "mean", "std", "min", "max"],
              [[key, str(row["n"]), fmt(row["mean"]), fmt(row["std"]), fmt(row["min"]),
                fmt(row["max"])] for key, row in spread.items()])


def estimates_table(doc: Document, estimates: dict[str, Any]) -> None:
    """Each protocol's patient-level estimate side by side, and the one to quote."""
    doc.heading("Estimates: plain k-fold beside a simulated new cohort")
    rows = []
    for name, row in estimates["protocols"].items():
        ci = row.get("auroc_ci95")
        rows.append([name + (" (quote this)" if name == estimates["pessimistic"] else ""),
                     str(row["n_patients"]), str(row["repeats"]), fmt(row.get("auroc")),
                     f"{fmt(ci[0])}-{fmt(ci[1])}" if ci else "-", fmt(row.get("accuracy"))])
    doc.table(["protocol", "patients", "repeats", "patient AUROC", "95% CI", "accuracy"],
              rows)
    doc.paragraph("kfold: patient-grouped stratified folds (test patients drawn at random); "
                  "repeated: the same over several seeds (mean); cluster: leave-cluster-out "
                  "(test patients resemble each other and differ from the training ones by "
                  "colour and cell mix, as a later cohort does). " + estimates["note"] + ".")


# ----------------------------------------------------------------- comparison
def _with_ci(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["accuracy"] is None:
        return "-"
    lo, hi = entry["ci95"]
    return (f"{fmt(entry['accuracy'], percent=True)} [{fmt(lo, percent=True)}, "
            f"{fmt(hi, percent=True)}]")


def comparison_document(result: dict[str, Any], taxonomy: Taxonomy) -> Document:
    """Tables 3 and 4 of the paper and the paired tests (``leukotree compare``)."""
    models = result["models"]
    doc = Document("leukotree comparison")
    doc.heading("Table 3: per-node and all-leaves accuracy (%, patient-bootstrap 95% CI)")
    rows = []
    for node in [*taxonomy.inner_nodes, "all_leaves"]:
        label = ("All leaves" if node == "all_leaves"
                 else f"{node}: {' vs '.join(taxonomy.children(node))}")
        rows.append([label] + [_with_ci(result["table3"][m].get(node)) for m in models])
    doc.table(["task", *models], rows)
    doc.heading("Table 4: per-class precision / recall / F1 (%)")
    rows = []
    for leaf in taxonomy.leaves:
        cells = []
        for m in models:
            e = result["table4"][m].get(leaf)
            cells.append("-" if e is None else " / ".join(
                fmt(e[k], percent=True) for k in ("precision", "recall", "f1")))
        rows.append([leaf, *cells])
    doc.table(["class", *models], rows)
    if result["paired_tests"]:
        doc.heading("Paired tests on fold accuracies (vs the first model)")
        doc.table(["model", "folds", "mean difference", "paired t p", "Wilcoxon p"],
                  [[t["model"], str(t["folds"]), fmt(t["mean_difference"], percent=True),
                    fmt(t["t_test_p"]), fmt(t["wilcoxon_p"])]
                   for t in result["paired_tests"]])
        doc.paragraph("With 5 folds the Wilcoxon test cannot go below p = 0.0625; read it as a "
                      "sign, not a verdict.")
    pick = result.get("one_se")
    if pick:
        doc.heading(f"One-standard-error choice (by fold {pick['metric']})")
        doc.table(["model", "mean", "standard error"],
                  [[m + (" (chosen)" if m == pick["chosen"] else "") + (
                      " (best)" if m == pick["best"] else ""), fmt(pick["means"][m]),
                    fmt(pick["standard_errors"][m])] for m in models])
        doc.paragraph(f"The folders are taken as given from the simplest model to the most "
                      f"complex; the chosen one is the simplest whose mean is within one "
                      f"standard error of the best ({fmt(pick['bound'])}).")
    for note in result["notes"]:
        doc.note(f"note: {note}")
    return doc
